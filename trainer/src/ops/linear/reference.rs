//! The linear layer as plain tensor ops, on any device and dtype: the tests' reference, the
//! forward where no kernel of its own applies, and the backward everywhere.

use candle_core::{Result, Tensor};

/// `x @ weight^T + bias`.
pub fn forward(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.matmul(&weight.t()?)?.broadcast_add(bias)
}

/// The gradients of `x` (when `need_dx`), of `weight` and of `bias` for the output gradient `dy`.
pub fn backward(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    need_dx: bool,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let dx = need_dx.then(|| dy.matmul(weight)).transpose()?;
    let dw = dy.t()?.matmul(x)?;
    Ok((dx, dw, dy.sum(0)?))
}
