//! Linear classifiers on frozen features, one per learning rate, trained side by side on the same
//! batches so that a sweep costs one pass over the data: the quick probe on feature files
//! ([`sweep`]) and the heads of the standard protocol ([`super::protocol`]).

use std::collections::HashMap;

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Linear, Module, VarBuilder, VarMap};

use super::features::{check_comparable, LabelledFeatures};
use super::knn::{accuracy, Accuracy};
use crate::nn::params;
use crate::train::optim::{Optimizer, Rule};
use crate::train::schedule;

/// A trained linear classifier and the peak learning rate it was trained with.
pub struct Probe {
    pub lr: f64,
    layer: Linear,
}

impl Probe {
    /// The five best classes of each row of `x` (`[n, dim]`, on the probe's device), best first.
    pub fn top5(&self, x: &Tensor) -> Result<Vec<Vec<u32>>> {
        let classes = self.layer.weight().dim(0)?;
        Ok(self
            .layer
            .forward(x)?
            .arg_sort_last_dim(false)?
            .narrow(D::Minus1, 0, 5.min(classes))?
            .to_vec2::<u32>()?)
    }

    /// Top-1 and top-5 accuracy on `set` (which must have the training set's classes).
    pub fn score(&self, set: &LabelledFeatures) -> Result<Accuracy> {
        let dev = self.layer.weight().device().clone();
        let mut tally = Tally::default();
        for start in (0..set.len()).step_by(4096) {
            let end = (start + 4096).min(set.len());
            let x = Tensor::from_vec(set.block(start..end), (end - start, set.dim()), &dev)?;
            tally.add(&self.top5(&x)?, &set.labels[start..end]);
        }
        Ok(tally.accuracy())
    }
}

/// Running counts of top-1 and top-5 hits.
#[derive(Default)]
pub struct Tally(Vec<(bool, bool)>);

impl Tally {
    /// Counts the predictions `top` (best first) of rows labelled `labels`.
    pub fn add(&mut self, top: &[Vec<u32>], labels: &[u32]) {
        self.0.extend(
            top.iter()
                .zip(labels)
                .map(|(t, &l)| (t.first() == Some(&l), t.contains(&l))),
        );
    }

    /// Top-1 and top-5 accuracy of everything counted.
    pub fn accuracy(&self) -> Accuracy {
        accuracy(&self.0)
    }
}

/// Linear classifiers (no BatchNorm) from `dim` features to `classes`, one per peak learning rate,
/// each with its optimiser (momentum 0.9, no weight decay) and every one initialised from the
/// same seed, trained on the same batches with a cosine schedule and no warmup.
pub struct Heads {
    heads: Vec<(Probe, Optimizer, VarMap)>,
}

impl Heads {
    /// One head per rate of `lrs` on `device`, updated by `rule`.
    pub fn new(
        dim: usize,
        classes: usize,
        lrs: &[f64],
        rule: Rule,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if lrs.is_empty() {
            return Err(Error::config("lr", "give at least one learning rate"));
        }
        if let Some(bad) = lrs.iter().find(|lr| !(lr.is_finite() && **lr > 0.0)) {
            return Err(Error::config(
                "lr",
                format!("a probe's learning rate must be positive, got {bad}"),
            ));
        }
        let mut heads = Vec::with_capacity(lrs.len());
        for &lr in lrs {
            let vars = VarMap::new();
            let vb = VarBuilder::from_varmap(&vars, DType::F32, device);
            let layer = candle_nn::linear(dim, classes, vb)?;
            params::init(&vars, seed)?;
            let opt = Optimizer::new(rule, params::trainable(&vars), 0.9, 0.0)?;
            heads.push((Probe { lr, layer }, opt, vars));
        }
        Ok(Heads { heads })
    }

    /// One update of every head on features `x` (`[n, dim]`) labelled `y` (u32 `[n]`): step
    /// `step` of `total` of the cosine schedule from each head's rate.
    pub fn step(&mut self, x: &Tensor, y: &Tensor, step: u64, total: u64) -> Result<()> {
        let x = x.detach();
        for (probe, opt, _) in &mut self.heads {
            let loss = candle_nn::loss::cross_entropy(&probe.layer.forward(&x)?, y)?;
            let rate = schedule::learning_rate(probe.lr, 0.0, step, 0, total);
            opt.step(&loss.backward()?, rate)?;
        }
        Ok(())
    }

    /// The heads, in the order of their rates.
    pub fn probes(&self) -> impl Iterator<Item = &Probe> {
        self.heads.iter().map(|(p, _, _)| p)
    }

    /// Every head's weights and optimiser state as named tensors (`<i>.<name>`), for checkpoints.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (_, opt, vars)) in self.heads.iter().enumerate() {
            for (name, var) in params::sorted(vars) {
                out.insert(format!("{i}.{name}"), var.as_tensor().copy()?);
            }
            for (name, t) in opt.state()? {
                out.insert(format!("{i}.opt.{name}"), t);
            }
        }
        Ok(out)
    }

    /// Restores what [`Self::state`] saved; every tensor must be there with the right shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        for (i, (_, opt, vars)) in self.heads.iter_mut().enumerate() {
            for (name, var) in params::sorted(vars) {
                let key = format!("{i}.{name}");
                let t = state
                    .get(&key)
                    .ok_or_else(|| Error::Run(format!("the probe checkpoint lacks `{key}`")))?;
                var.set(&t.to_device(var.device())?)?;
            }
            let prefix = format!("{i}.opt.");
            let own: HashMap<String, Tensor> = state
                .iter()
                .filter_map(|(k, t)| Some((k.strip_prefix(&prefix)?.to_string(), t.clone())))
                .collect();
            opt.load_state(&own)?;
        }
        Ok(())
    }

    /// The trained heads.
    pub fn into_probes(self) -> Vec<Probe> {
        self.heads.into_iter().map(|(p, _, _)| p).collect()
    }
}

/// The quick probe: one linear classifier per peak learning rate of `lrs`, trained on frozen
/// `train` features side by side on the same batches: SGD with momentum 0.9, batches of 256, a
/// cosine schedule over `epochs`, no weight decay, every head initialised from `seed`.
pub fn train_probes(
    train: &LabelledFeatures,
    epochs: usize,
    lrs: &[f64],
    seed: u64,
) -> Result<Vec<Probe>> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let dev = Device::Cpu;
    let dim = train.dim();
    let mut heads = Heads::new(dim, train.classes.len(), lrs, Rule::Sgd, seed, &dev)?;
    let n = train.len();
    let batch = 256.min(n).max(1);
    let total = (epochs * n.div_ceil(batch)) as u64;
    let labels = Tensor::new(train.labels.as_slice(), &dev)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut step = 0u64;
    for _ in 0..epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(batch) {
            let x = Tensor::from_vec(train.gather(chunk), (chunk.len(), dim), &dev)?;
            let y = labels.index_select(&Tensor::new(chunk, &dev)?, 0)?;
            heads.step(&x, &y, step, total)?;
            step += 1;
        }
    }
    Ok(heads.into_probes())
}

/// One probe per rate of `lrs` trained on `train` and scored on `val`: (rate, accuracy) each.
pub fn sweep(
    train: &LabelledFeatures,
    val: &LabelledFeatures,
    epochs: usize,
    lrs: &[f64],
    seed: u64,
) -> Result<Vec<(Probe, Accuracy)>> {
    check_comparable(train, val)?;
    train_probes(train, epochs, lrs, seed)?
        .into_iter()
        .map(|p| {
            let acc = p.score(val)?;
            Ok((p, acc))
        })
        .collect()
}

/// The entry of `results` with the best top-1 (the smaller rate on a tie): the one a sweep
/// chooses on val.
pub fn best(results: &[(Probe, Accuracy)]) -> Option<&(Probe, Accuracy)> {
    results.iter().max_by(|a, b| {
        a.1.top1
            .total_cmp(&b.1.top1)
            .then(b.0.lr.total_cmp(&a.0.lr))
    })
}
