//! The convolution as plain tensor ops, on any device and dtype: the tests' reference and the
//! CUDA side until the cuDNN kernels land. The forward is Candle's convolution (cuDNN when built
//! with the `cudnn` feature). The backward is made of forward convolutions too, which cuDNN
//! serves, where Candle's own backward sends the input gradient through `conv_transpose2d`, a
//! naive kernel on CUDA: the input gradient is the output gradient spread out by the stride
//! (zeros in between) convolved with the flipped, transposed kernel; the weight gradient is the
//! input convolved with the output gradient as kernel (dilated by the stride).

use candle_core::{Result, Tensor};

use super::Geometry;

/// `y = conv(x, weight)`.
pub fn forward(x: &Tensor, weight: &Tensor, g: Geometry) -> Result<Tensor> {
    x.conv2d(weight, g.padding, g.stride, 1, 1)
}

/// `[dx (when need_dx), dweight]` flattened into one vector, as the CPU kernel packs them.
pub fn backward(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    g: Geometry,
    need_dx: bool,
) -> Result<Tensor> {
    let dw = weight_grad(x, dy, g)?.flatten_all()?;
    if !need_dx {
        return Ok(dw);
    }
    let (_, _, h, w) = x.dims4()?;
    let dx = input_grad(dy, weight, (h, w), g)?.flatten_all()?;
    Tensor::cat(&[dx, dw], 0)
}

/// `dx` of shape `[n, c_in, h, w]` from `dy` `[n, c_out, ho, wo]`.
pub fn input_grad(
    dy: &Tensor,
    weight: &Tensor,
    (h, w): (usize, usize),
    g: Geometry,
) -> Result<Tensor> {
    let Geometry { k, stride, padding } = g;
    if padding >= k {
        candle_core::bail!("conv2d: padding {padding} >= kernel {k}");
    }
    let (n, c_out, ho, wo) = dy.dims4()?;
    let spread = if stride == 1 {
        dy.clone()
    } else {
        // Rows and columns the forward's rounding-down skipped at the end stay zero.
        let rows = (ho - 1) * stride + 1 + (h + 2 * padding - k) % stride;
        let cols = (wo - 1) * stride + 1 + (w + 2 * padding - k) % stride;
        dy.unsqueeze(3)?
            .unsqueeze(5)?
            .pad_with_zeros(3, 0, stride - 1)?
            .pad_with_zeros(5, 0, stride - 1)?
            .reshape((n, c_out, ho * stride, wo * stride))?
            .narrow(2, 0, rows)?
            .narrow(3, 0, cols)?
            .contiguous()?
    };
    let flipped = weight.transpose(0, 1)?.contiguous()?.flip(&[2, 3])?;
    spread.conv2d(&flipped, k - 1 - padding, 1, 1, 1)
}

/// `dW` of shape `[c_out, c_in, k, k]`.
pub fn weight_grad(x: &Tensor, dy: &Tensor, g: Geometry) -> Result<Tensor> {
    let Geometry { k, stride, padding } = g;
    let dw = x
        .transpose(0, 1)?
        .contiguous()?
        .conv2d(&dy.transpose(0, 1)?.contiguous()?, padding, 1, stride, 1)?
        .transpose(0, 1)?;
    // Input rows the forward's rounding-down skipped give extra taps: not part of the kernel.
    dw.narrow(2, 0, k)?.narrow(3, 0, k)?.contiguous()
}
