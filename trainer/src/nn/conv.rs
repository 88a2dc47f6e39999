//! The convolution layer: a bias-free weight and its geometry, over [`crate::ops::conv`].

use candle_core::{DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::ops::conv::{conv2d, Geometry};

/// A bias-free convolution with square kernel, stride and padding. The weight stays f32 (the
/// master copy); under mixed precision it is cast to the input's dtype.
pub struct Conv {
    weight: Tensor,
    geometry: Geometry,
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
            geometry: Geometry { k, stride, padding },
        })
    }

    /// Convolves `[batch, c_in, H, W]` input.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d(x, &self.weight_as(x.dtype())?, self.geometry)
    }

    /// The weight in `dtype` (the master copy itself in f32).
    pub fn weight_as(&self, dtype: DType) -> Result<Tensor> {
        self.weight.to_dtype(dtype)
    }

    /// Output and input channels.
    pub fn channels(&self) -> (usize, usize) {
        let dims = self.weight.dims();
        (dims[0], dims[1])
    }

    /// Kernel size, stride and padding.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }
}
