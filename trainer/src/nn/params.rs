//! The parameters of a network: a Candle `VarMap` plus the rules this project applies to it —
//! which entries are trained (BatchNorm running statistics are not) and a seeded initialisation.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Whether `name` is a BatchNorm buffer (running statistics), not a trained parameter.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

/// Whether `name` is exempt from weight decay and LARS adaptation: biases and BatchNorm parameters
/// (every rank-1 parameter here).
pub fn is_exempt(var: &Var) -> bool {
    var.as_tensor().rank() <= 1
}

/// All entries of `map`, sorted by name.
pub fn sorted(map: &VarMap) -> Vec<(String, Var)> {
    let data = map.data().lock().expect("var map lock");
    let mut all: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// The trained parameters of `map`, sorted by name.
pub fn trainable(map: &VarMap) -> Vec<(String, Var)> {
    sorted(map)
        .into_iter()
        .filter(|(name, _)| !is_buffer(name))
        .collect()
}

/// Sets every entry of `map` from `seed` alone, in name order: convolution weights He-normal over
/// fan-out (torchvision's ResNet init), linear weights uniform in +-1/sqrt(fan_in) (PyTorch's
/// default), BatchNorm scales and running variances 1, biases and running means 0.
pub fn init(map: &VarMap, seed: u64) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (name, var) in sorted(map) {
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let values: Vec<f32> = match dims.len() {
            4 => {
                let fan_out = dims[0] * dims[2] * dims[3];
                let normal = Normal::new(0.0, (2.0 / fan_out as f32).sqrt()).expect("finite std");
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            }
            2 => {
                let bound = 1.0 / (dims[1] as f32).sqrt();
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            }
            _ => {
                let one = name.ends_with("running_var") || name.ends_with("weight");
                vec![if one { 1.0 } else { 0.0 }; n]
            }
        };
        var.set(&Tensor::from_vec(values, dims, &Device::Cpu)?.to_device(var.device())?)?;
    }
    Ok(())
}

/// Copies every entry of `from` into the entry of the same name in `to` (which must have them all).
pub fn copy_all(from: &VarMap, to: &VarMap) -> Result<()> {
    let to_data = to.data().lock().expect("var map lock");
    for (name, var) in sorted(from) {
        let Some(dst) = to_data.get(&name) else {
            candle_core::bail!("no parameter `{name}` to copy into");
        };
        dst.set(var.as_tensor())?;
    }
    Ok(())
}

/// Total number of scalars in the trained parameters.
pub fn count(map: &VarMap) -> usize {
    trainable(map).iter().map(|(_, v)| v.elem_count()).sum()
}

/// An f32 zero tensor shaped like `var`.
pub fn zeros_like(var: &Var) -> Result<Tensor> {
    Tensor::zeros(var.dims(), DType::F32, var.device())
}
