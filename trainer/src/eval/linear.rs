//! A quick linear probe on frozen features: one linear classifier per learning rate, trained side
//! by side in one pass over the features, so that a sweep costs one read of the data.

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
    /// Top-1 and top-5 accuracy on `set` (which must have the training set's classes).
    pub fn score(&self, set: &LabelledFeatures) -> Result<Accuracy> {
        let dev = Device::Cpu;
        let classes = self.layer.weight().dim(0)?;
        let mut top = Vec::with_capacity(set.len());
        for start in (0..set.len()).step_by(4096) {
            let end = (start + 4096).min(set.len());
            let x = Tensor::from_vec(set.block(start..end), (end - start, set.dim()), &dev)?;
            top.extend(
                self.layer
                    .forward(&x)?
                    .arg_sort_last_dim(false)?
                    .narrow(D::Minus1, 0, 5.min(classes))?
                    .to_vec2::<u32>()?,
            );
        }
        let scored: Vec<(bool, bool)> = top
            .iter()
            .zip(&set.labels)
            .map(|(t, &l)| (t[0] == l, t.contains(&l)))
            .collect();
        Ok(accuracy(&scored))
    }
}

/// Linear classifiers (no BatchNorm) trained on frozen `train` features, one per peak learning
/// rate of `lrs`, side by side on the same batches: SGD with momentum 0.9, batches of 256, a
/// cosine schedule over `epochs`, no weight decay, every head initialised from `seed`.
pub fn train_probes(
    train: &LabelledFeatures,
    epochs: usize,
    lrs: &[f64],
    seed: u64,
) -> Result<Vec<Probe>> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    if let Some(bad) = lrs.iter().find(|lr| !(lr.is_finite() && **lr > 0.0)) {
        return Err(Error::config(
            "lr",
            format!("a probe's learning rate must be positive, got {bad}"),
        ));
    }
    let dev = Device::Cpu;
    let (classes, dim) = (train.classes.len(), train.dim());
    let mut heads = Vec::with_capacity(lrs.len());
    for &lr in lrs {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
        let layer = candle_nn::linear(dim, classes, vb)?;
        params::init(&vars, seed)?;
        let opt = Optimizer::new(Rule::Sgd, params::trainable(&vars), 0.9, 0.0)?;
        heads.push((Probe { lr, layer }, opt));
    }
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
            for (probe, opt) in &mut heads {
                let loss = candle_nn::loss::cross_entropy(&probe.layer.forward(&x)?, &y)?;
                let rate = schedule::learning_rate(probe.lr, 0.0, step, 0, total);
                opt.step(&loss.backward()?, rate)?;
            }
            step += 1;
        }
    }
    Ok(heads.into_iter().map(|(probe, _)| probe).collect())
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
