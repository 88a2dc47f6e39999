//! A convolution followed by train-mode BatchNorm (and a ReLU) as one autograd node, for the
//! ResNet layers without a residual: the convolution and the batch statistics run outside the
//! graph, and the node normalises the convolution's output, which it holds. Its backward runs the
//! BatchNorm backward and then the convolution's, so it launches the same kernels as the two
//! nodes would, but Candle's backward keeps one gradient buffer (and adds one) fewer per layer.
//! (A layer with a residual keeps two nodes: the node would need a fourth argument.)

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::BatchNormTrain;
use crate::ops::conv::{self, Geometry};
use crate::ops::portable;

/// Convolves `x [n, c_in, h, w]` with `weight [c_out, c_in, k, k]` (same dtype), normalises the
/// result with its batch statistics and `affine` (`[weight | bias]`, `[2 c_out]`, f32) and applies a
/// ReLU when `relu`. Returns the output and the batch statistics `[2 c_out]` (mean, biased
/// variance; f32, without gradient), like [`super::train`] of [`conv::conv2d`].
pub fn conv_train(
    x: &Tensor,
    weight: &Tensor,
    g: Geometry,
    affine: &Tensor,
    relu: bool,
) -> Result<(Tensor, Tensor)> {
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let conv_out = conv::conv2d_detached(&x, &weight, g)?;
    let (stats, norm) = BatchNormTrain::prepare(&conv_out, affine, relu)?;
    let node = ConvBatchNorm { g, conv_out, norm };
    Ok((x.apply_op3(&weight, affine, node)?, stats))
}

/// The node: `(x, weight, affine) -> y`, holding the convolution's output and the normalisation.
struct ConvBatchNorm {
    g: Geometry,
    conv_out: Tensor,
    norm: BatchNormTrain,
}

impl CustomOp3 for ConvBatchNorm {
    fn name(&self) -> &'static str {
        "conv2d-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _xl: &Layout,
        _weight: &CpuStorage,
        _wl: &Layout,
        _affine: &CpuStorage,
        _al: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        portable::with_storage(&self.conv_out, |s: &CpuStorage, l| {
            self.norm.cpu((s, l), None)
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _xl: &Layout,
        _weight: &candle_core::CudaStorage,
        _wl: &Layout,
        _affine: &candle_core::CudaStorage,
        _al: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        portable::with_storage(&self.conv_out, |s: &candle_core::CudaStorage, l| {
            self.norm.cuda((s, l), None)
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _affine: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dconv, daffine, _) = self.norm.grads(&self.conv_out, y, dy, false)?;
        let (dx, dweight) = conv::gradients(x, weight, &dconv, self.g)?;
        Ok((dx, Some(dweight), Some(daffine)))
    }
}
