//! The parameters of a network: a Candle `VarMap` plus the rules this project applies to it —
//! which entries are trained (BatchNorm running statistics are not), a seeded initialisation, and
//! the names files use. Inside, a BatchNorm keeps its scale and shift as one `affine` parameter
//! (`[weight | bias]`, so that its autograd node takes one tensor for both); every file (checkpoints,
//! exports, parity cases) holds them as PyTorch's `weight` and `bias`.

use std::collections::HashMap;
use std::path::Path;

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

/// The name part of a BatchNorm's packed `[weight | bias]` parameter.
const AFFINE: &str = ".affine";

/// `name` split around `part` where it is a whole part (`X.affine` or `X.affine.first`).
fn split_at_part<'a>(name: &'a str, part: &str) -> Option<(&'a str, &'a str)> {
    name.match_indices(part).find_map(|(i, _)| {
        let rest = &name[i + part.len()..];
        (rest.is_empty() || rest.starts_with('.')).then(|| (&name[..i], rest))
    })
}

/// `tensors` under PyTorch's names: each packed BatchNorm `affine` (also inside an optimiser
/// buffer's name) becomes its `weight` and `bias` halves.
pub fn to_external(tensors: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::with_capacity(tensors.len());
    for (name, t) in tensors {
        let Some((head, tail)) = split_at_part(&name, AFFINE) else {
            out.insert(name, t);
            continue;
        };
        let c = t.elem_count() / 2;
        out.insert(format!("{head}.weight{tail}"), t.narrow(0, 0, c)?);
        out.insert(format!("{head}.bias{tail}"), t.narrow(0, c, c)?);
    }
    Ok(out)
}

/// The inverse of [`to_external`]: each `weight` and `bias` of the same rank-1 shape (a
/// BatchNorm's; every other weight has a higher rank) are packed back into its `affine`.
pub fn to_internal(mut tensors: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let pairs: Vec<(String, String, String)> = tensors
        .iter()
        .filter(|(_, t)| t.rank() == 1)
        .filter_map(|(name, t)| {
            let (head, tail) = split_at_part(name, ".weight")?;
            let bias = format!("{head}.bias{tail}");
            (tensors.get(&bias)?.dims() == t.dims())
                .then(|| (name.clone(), bias, format!("{head}{AFFINE}{tail}")))
        })
        .collect();
    for (weight, bias, affine) in pairs {
        let (w, b) = (tensors.remove(&weight), tensors.remove(&bias));
        if let (Some(w), Some(b)) = (w, b) {
            tensors.insert(affine, Tensor::cat(&[&w, &b], 0)?);
        }
    }
    Ok(tensors)
}

/// Every entry of `map`, under PyTorch's names (see [`to_external`]).
pub fn external(map: &VarMap) -> Result<HashMap<String, Tensor>> {
    let mut tensors = HashMap::new();
    for (name, var) in sorted(map) {
        // A copy: the CPU kernels update the parameters in place.
        tensors.insert(name, var.as_tensor().copy()?);
    }
    to_external(tensors)
}

/// Writes `map` to the safetensors file `path` under PyTorch's names.
pub fn save(map: &VarMap, path: &Path) -> Result<()> {
    candle_core::safetensors::save(&external(map)?, path)
}

/// Sets every entry of `map` from the safetensors file `path` (written by [`save`]); each must be
/// there with its shape.
pub fn load(map: &VarMap, path: &Path) -> Result<()> {
    let device = sorted(map)
        .first()
        .map_or(Device::Cpu, |(_, v)| v.device().clone());
    let tensors = to_internal(candle_core::safetensors::load(path, &device)?)?;
    for (name, var) in sorted(map) {
        let Some(t) = tensors.get(&name) else {
            candle_core::bail!("{} lacks `{name}`", path.display());
        };
        if t.dims() != var.dims() {
            candle_core::bail!(
                "`{name}` in {} has shape {:?}, the model's is {:?}",
                path.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Sets every entry of `map` from `seed` alone, in name order: convolution weights He-normal over
/// fan-out (torchvision's ResNet init), linear weights uniform in +-1/sqrt(fan_in) (PyTorch's
/// default), BatchNorm scales and running variances 1, biases, BatchNorm shifts and running
/// means 0.
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
            _ if name.ends_with(AFFINE) => {
                let c = n / 2;
                (0..n).map(|i| if i < c { 1.0 } else { 0.0 }).collect()
            }
            _ => {
                let one = name.ends_with("running_var");
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
