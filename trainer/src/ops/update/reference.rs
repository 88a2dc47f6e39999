//! The updates as plain tensor ops, returning the new value of the updated tensor: the tests'
//! reference and the CUDA side until its multi-tensor kernels land. Norms and LARS's trust ratio
//! stay on the device.

use candle_core::{DType, Result, Tensor};

use super::{AdamStep, Blend, Momentum};

/// [`Blend`]'s new `dst`.
pub fn blend(op: &Blend, dst: &Tensor, src: &Tensor) -> Result<Tensor> {
    let src = if op.square { src.sqr()? } else { src.clone() };
    (dst * op.keep)? + (src * op.take)?
}

/// [`Momentum`]'s new `m`.
pub fn momentum(op: &Momentum, m: &Tensor, w: &Tensor, g: &Tensor) -> Result<Tensor> {
    let mut d = (g + (w * op.decay)?)?;
    if let Some(trust) = op.trust {
        d = d.broadcast_mul(&trust_ratio(w, &d, trust)?)?;
    }
    (m * op.momentum)? + d
}

/// [`AdamStep`]'s new `w`.
pub fn adam_step(op: &AdamStep, w: &Tensor, m: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (c1, c2) = op.corrections;
    let update = ((m / c1)? / ((v / c2)?.sqrt()? + op.eps)?)?;
    w - ((update + (w * op.decay)?)? * op.lr)?
}

/// LARS's per-tensor factor `trust * |w| / |d|`, or 1 where either norm is 0; a 1-element tensor.
fn trust_ratio(w: &Tensor, d: &Tensor, trust: f64) -> Result<Tensor> {
    let norm = |t: &Tensor| t.to_dtype(DType::F64)?.sqr()?.sum_all()?.sqrt();
    let (w_norm, d_norm) = (norm(w)?, norm(d)?);
    let both = w_norm.gt(0.0)?.mul(&d_norm.gt(0.0)?)?;
    let ratio = ((w_norm * trust)? / d_norm.maximum(1e-300)?)?;
    let one = Tensor::ones_like(&ratio)?;
    both.where_cond(&ratio, &one)?
        .to_dtype(w.dtype())?
        .reshape(1)
}
