//! A linear probe on frozen features.

use crate::error::Result;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Linear, Module, VarBuilder, VarMap};

use super::features::{check_comparable, LabelledFeatures};
use super::knn::{accuracy, Accuracy};
use crate::nn::params;
use crate::train::optim::{Optimizer, Rule};
use crate::train::schedule;

/// A linear classifier (no BatchNorm) trained on frozen `train` features with SGD (momentum 0.9,
/// batches of 256, cosine learning rate from `lr`, no weight decay) for `epochs`, scored on `val`.
pub fn linear_probe(
    train: &LabelledFeatures,
    val: &LabelledFeatures,
    epochs: usize,
    lr: f64,
    seed: u64,
) -> Result<Accuracy> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    check_comparable(train, val)?;
    let dev = Device::Cpu;
    let classes = train.classes.len();
    let dim = train.dim();
    let vars = VarMap::new();
    let layer: Linear = candle_nn::linear(
        dim,
        classes,
        VarBuilder::from_varmap(&vars, DType::F32, &dev),
    )?;
    params::init(&vars, seed)?;
    let mut opt = Optimizer::new(Rule::Sgd, params::trainable(&vars), 0.9, 0.0)?;
    let n = train.len();
    let batch = 256.min(n);
    let steps_per_epoch = n.div_ceil(batch);
    let total = (epochs * steps_per_epoch) as u64;
    let labels = Tensor::new(train.labels.as_slice(), &dev)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut step = 0u64;
    for _ in 0..epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(batch) {
            let x = Tensor::from_vec(train.gather(chunk), (chunk.len(), dim), &dev)?;
            let y = labels.index_select(&Tensor::new(chunk, &dev)?, 0)?;
            let loss = candle_nn::loss::cross_entropy(&layer.forward(&x)?, &y)?;
            let rate = schedule::learning_rate(lr, 0.0, step, 0, total);
            opt.step(&loss.backward()?, rate)?;
            step += 1;
        }
    }
    let mut top = Vec::with_capacity(val.len());
    for start in (0..val.len()).step_by(4096) {
        let end = (start + 4096).min(val.len());
        let x = Tensor::from_vec(val.block(start..end), (end - start, dim), &dev)?;
        top.extend(
            layer
                .forward(&x)?
                .arg_sort_last_dim(false)?
                .narrow(D::Minus1, 0, 5.min(classes))?
                .to_vec2::<u32>()?,
        );
    }
    let scored: Vec<(bool, bool)> = top
        .iter()
        .zip(&val.labels)
        .map(|(t, &l)| (t[0] == l, t.contains(&l)))
        .collect();
    Ok(accuracy(&scored))
}
