//! 2-D convolution without bias, as ResNets use it: one autograd node on every device.
//!
//! The node's forward and backward each pick their kernel from the storage they get: on the CPU
//! in f32 the im2col + gemm kernels of [`cpu`] (Candle's own convolution sends the input gradient
//! through a plain `conv_transpose2d` loop, and building it from Candle ops costs a zero-fill and
//! an add per op and per gradient in Candle's backward); on CUDA with the `cudnn` feature cuDNN's
//! forward and backward calls (`cuda`); otherwise the tensor ops of [`reference`], run inside the
//! node (see [`crate::ops::portable`]). The input image needs no gradient and gets none.

pub mod cpu;
#[cfg(feature = "cudnn")]
pub mod cuda;
pub mod reference;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use shared::cpu::Isa;

use crate::ops::cpu_storage::all_f32;
use crate::ops::portable::{self, Backend};

/// Kernel size, stride and padding (square).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Geometry {
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Geometry {
    /// Output size along a dimension of `n`.
    pub fn out(&self, n: usize) -> usize {
        (n + 2 * self.padding - self.k) / self.stride + 1
    }
}

/// Convolves `x [n, c_in, h, w]` with `weight [c_out, c_in, k, k]` of the same dtype.
pub fn conv2d(x: &Tensor, weight: &Tensor, g: Geometry) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, Conv2d { g })
}

/// The convolution of [`conv2d`] without a graph node, for a fused node that holds it.
pub(crate) fn conv2d_detached(x: &Tensor, weight: &Tensor, g: Geometry) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&weight.contiguous()?, &Conv2d { g })
}

/// The gradients of `x` (when it takes part in the graph) and of `weight` for the output
/// gradient `dy`.
pub(crate) fn gradients(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    g: Geometry,
) -> Result<(Option<Tensor>, Tensor)> {
    let need_dx = x.track_op();
    let back = Conv2dBackward { g, need_dx };
    let out = x.apply_op3_no_bwd(weight, &dy.contiguous()?, &back)?;
    let dx_len = if need_dx { x.elem_count() } else { 0 };
    let dx = if need_dx {
        Some(out.narrow(0, 0, dx_len)?.reshape(x.shape())?)
    } else {
        None
    };
    let dw = out
        .narrow(0, dx_len, weight.elem_count())?
        .reshape(weight.shape())?;
    Ok((dx, dw))
}

/// The node: `(x, weight) -> y`.
struct Conv2d {
    g: Geometry,
}

impl Conv2d {
    fn portable<S: Backend>(&self, xs: &S, xl: &Layout, ws: &S, wl: &Layout) -> Result<(S, Shape)> {
        let (x, w) = (portable::tensor(xs, xl)?, portable::tensor(ws, wl)?);
        portable::output(&reference::forward(&x, &w, self.g)?)
    }
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if all_f32(&[xs, ws]) {
            cpu::forward(Isa::active(), xs, xl, ws, wl, self.g)
        } else {
            self.portable(xs, xl, ws, wl)
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        #[cfg(feature = "cudnn")]
        if let Some(out) = cuda::forward((xs, xl), (ws, wl), self.g)? {
            return Ok(out);
        }
        self.portable(xs, xl, ws, wl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = gradients(x, weight, dy, self.g)?;
        Ok((dx, Some(dw)))
    }
}

/// The backward: `(x, weight, dy) -> [dx (empty unless need_dx), dweight]`, flat.
struct Conv2dBackward {
    g: Geometry,
    need_dx: bool,
}

impl Conv2dBackward {
    fn portable<S: Backend>(&self, args: [(&S, &Layout); 3]) -> Result<(S, Shape)> {
        let [x, w, dy] = args.map(|(s, l)| portable::tensor(s, l));
        portable::output(&reference::backward(&x?, &w?, &dy?, self.g, self.need_dx)?)
    }
}

impl CustomOp3 for Conv2dBackward {
    fn name(&self) -> &'static str {
        "conv2d-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if all_f32(&[xs, ws, gs]) {
            cpu::backward(
                Isa::active(),
                (xs, xl),
                (ws, wl),
                (gs, gl),
                self.g,
                self.need_dx,
            )
        } else {
            self.portable([(xs, xl), (ws, wl), (gs, gl)])
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        #[cfg(feature = "cudnn")]
        if let Some(out) = cuda::backward((xs, xl), (ws, wl), (gs, gl), self.g, self.need_dx)? {
            return Ok(out);
        }
        self.portable([(xs, xl), (ws, wl), (gs, gl)])
    }
}
