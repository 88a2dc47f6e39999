//! Train-mode BatchNorm as plain tensor ops in f32, on any device and dtype: the tests'
//! reference and the CUDA side until its fused kernels land. The backward is autograd's
//! gradient of the textbook forward, the statistics being functions of the input.

use candle_core::{DType, Result, Tensor, Var};

use super::EPS;
use crate::dist::Collective;

/// `x [n, c, ...]` as f32 `[n, c, l]`.
fn ncl_f32(x: &Tensor) -> Result<Tensor> {
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    x.to_dtype(DType::F32)?.reshape((n, c, ()))
}

/// Per-channel mean then biased variance: `[2c]` f32.
pub fn stats(x: &Tensor) -> Result<Tensor> {
    let x = ncl_f32(x)?;
    let mean = x.mean_keepdim(2)?.mean_keepdim(0)?;
    let var = x
        .broadcast_sub(&mean)?
        .sqr()?
        .mean_keepdim(2)?
        .mean_keepdim(0)?;
    Tensor::cat(&[mean.flatten_all()?, var.flatten_all()?], 0)
}

/// `(x - mean) * weight / sqrt(var + eps) + bias` over `[n, c, l]` f32, with per-channel `[c]`
/// tensors.
fn normalise(x: &Tensor, w: &Tensor, b: &Tensor, mean: &Tensor, var: &Tensor) -> Result<Tensor> {
    let c = w.elem_count();
    let per_channel = |t: &Tensor| t.reshape((1, c, 1));
    let scale = per_channel(w)?.broadcast_div(&(per_channel(var)? + EPS)?.sqrt()?)?;
    x.broadcast_sub(&per_channel(mean)?)?
        .broadcast_mul(&scale)?
        .broadcast_add(&per_channel(b)?)
}

/// The forward with the statistics in `params` = `[weight, bias, mean, var]`; `x`'s dtype out.
pub fn forward(
    x: &Tensor,
    params: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    let p = |i: usize| params.narrow(0, i * c, c);
    let mut y = normalise(&ncl_f32(x)?, &p(0)?, &p(1)?, &p(2)?, &p(3)?)?;
    if let Some(r) = residual {
        y = (y + ncl_f32(r)?)?;
    }
    if relu {
        y = y.relu()?;
    }
    y.to_dtype(x.dtype())?.reshape(x.shape())
}

/// `[dx | dresidual (when residual) | dweight | dbias | 2c zeros]` in f32, flat, as the CPU kernel
/// packs them; `y` is the forward's output (for the ReLU's mask).
pub fn backward(
    x: &Tensor,
    dy: &Tensor,
    y: &Tensor,
    params: &Tensor,
    relu: bool,
    residual: bool,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    let mut g = ncl_f32(dy)?;
    if relu {
        g = (g * ncl_f32(y)?.gt(0.0)?.to_dtype(DType::F32)?)?;
    }
    let xv = Var::from_tensor(&ncl_f32(x)?)?;
    let w = Var::from_tensor(&params.narrow(0, 0, c)?)?;
    let b = Var::from_tensor(&params.narrow(0, c, c)?)?;
    let xt = xv.as_tensor();
    let mean = xt.mean_keepdim(2)?.mean_keepdim(0)?;
    let var = xt
        .broadcast_sub(&mean)?
        .sqr()?
        .mean_keepdim(2)?
        .mean_keepdim(0)?;
    let out = normalise(
        xt,
        w.as_tensor(),
        b.as_tensor(),
        &mean.flatten_all()?,
        &var.flatten_all()?,
    )?;
    let grads = (out * &g)?.sum_all()?.backward()?;
    let grad = |v: &Var| -> Result<Tensor> {
        match grads.get(v.as_tensor()) {
            Some(t) => t.flatten_all(),
            None => v.as_tensor().zeros_like()?.flatten_all(),
        }
    };
    let mut parts = vec![grad(&xv)?];
    if residual {
        parts.push(g.flatten_all()?);
    }
    parts.extend([
        grad(&w)?,
        grad(&b)?,
        Tensor::zeros(2 * c, DType::F32, x.device())?,
    ]);
    Tensor::cat(&parts, 0)
}

/// [`stats`] over the batches of every rank of `group` (SyncBN): the per-channel sums are
/// all-reduced, then the squared deviations from the global mean.
pub fn synced_stats(x: &Tensor, group: &dyn Collective) -> Result<Tensor> {
    let x = ncl_f32(x)?;
    let (n, _, l) = x.dims3()?;
    let count = (n * l * group.world_size()) as f64;
    let channel_sums =
        |t: &Tensor| -> Result<Tensor> { group.all_reduce(&t.sum_keepdim(2)?.sum_keepdim(0)?) };
    let mean = (channel_sums(&x)? / count)?;
    let var = (channel_sums(&x.broadcast_sub(&mean)?.sqr()?)? / count)?;
    Tensor::cat(&[mean.flatten_all()?, var.flatten_all()?], 0)
}

/// [`backward`] over the batches of every rank of `group` (SyncBN), by the closed form: the input
/// gradient uses the gradient sums of the global batch, the parameters' gradients are this rank's
/// own. `(x, dy, y)` as in [`backward`], `(relu, residual)` the forward's.
pub fn synced_backward(
    (x, dy, y): (&Tensor, &Tensor, &Tensor),
    params: &Tensor,
    (relu, residual): (bool, bool),
    group: &dyn Collective,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    let x = ncl_f32(x)?;
    let (n, _, l) = x.dims3()?;
    let count = (n * l * group.world_size()) as f64;
    let mut g = ncl_f32(dy)?;
    if relu {
        g = (g * ncl_f32(y)?.gt(0.0)?.to_dtype(DType::F32)?)?;
    }
    let p = |i: usize| params.narrow(0, i * c, c)?.reshape((1, c, 1));
    let inv = (p(3)? + EPS)?.sqrt()?.recip()?;
    let x_hat = x.broadcast_sub(&p(2)?)?.broadcast_mul(&inv)?;
    let channel_sum = |t: &Tensor| t.sum_keepdim(2)?.sum_keepdim(0);
    let (s, sx) = (channel_sum(&g)?, channel_sum(&(&g * &x_hat)?)?);
    let global = group.all_reduce(&Tensor::cat(&[&s, &sx], 0)?)?;
    let (mean_g, mean_gx) = (
        (global.narrow(0, 0, 1)? / count)?,
        (global.narrow(0, 1, 1)? / count)?,
    );
    let dx = g
        .broadcast_sub(&mean_g)?
        .sub(&x_hat.broadcast_mul(&mean_gx)?)?
        .broadcast_mul(&p(0)?.broadcast_mul(&inv)?)?;
    let mut parts = vec![dx.flatten_all()?];
    if residual {
        parts.push(g.flatten_all()?);
    }
    parts.extend([
        sx.flatten_all()?,
        s.flatten_all()?,
        Tensor::zeros(2 * c, DType::F32, x.device())?,
    ]);
    Tensor::cat(&parts, 0)
}
