//! 2-D convolution without bias, as ResNets use it. The weight stays f32 (the master copy); under
//! mixed precision it is cast to the input's dtype for the product.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// A bias-free convolution with square kernel, stride and padding.
pub struct Conv {
    weight: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv {
    /// Creates `weight` of shape `[c_out, c_in, k, k]` under `vb`.
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get_with_hints((c_out, c_in, k, k), "weight", Init::Const(0.0))?;
        Ok(Conv {
            weight,
            stride,
            padding,
        })
    }

    /// Convolves `[batch, c_in, H, W]` input.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.to_dtype(x.dtype())?;
        x.conv2d(&w, self.padding, self.stride, 1, 1)
    }
}
