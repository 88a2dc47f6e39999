//! torchvision's stem max-pool: kernel 3, stride 2, padding 1, over `[n, c, h, w]`, as one
//! autograd node on every device: the kernels of [`cpu`] on the CPU in f32, those of `cuda`
//! (feature `cuda`) on a GPU in f32, bf16 or f16, otherwise the tensor ops of [`reference`] run
//! inside the node (see [`crate::ops::portable`]).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use shared::cpu::Isa;

use crate::ops::cpu_storage::all_f32;
use crate::ops::portable::{self, Backend};

/// The pool of `x`, whose values must be non-negative (it follows a ReLU): the reference pads
/// with zeros, which then gives the same maxima as -inf padding.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPool)
}

/// The node: `x -> y`.
struct MaxPool;

impl MaxPool {
    fn portable<S: Backend>(&self, s: &S, l: &Layout) -> Result<(S, Shape)> {
        portable::output(&reference::forward(&portable::tensor(s, l)?)?)
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if all_f32(&[s]) {
            cpu::forward(Isa::active(), s, l)
        } else {
            self.portable(s, l)
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        match cuda::forward(s, l)? {
            Some(out) => Ok(out),
            None => self.portable(s, l),
        }
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&dy.contiguous()?, &MaxPoolBackward)?,
        ))
    }
}

/// The backward: `(x, dy) -> dx`.
struct MaxPoolBackward;

impl MaxPoolBackward {
    fn portable<S: Backend>(&self, x: (&S, &Layout), dy: (&S, &Layout)) -> Result<(S, Shape)> {
        let x = portable::tensor(x.0, x.1)?;
        let dy = portable::tensor(dy.0, dy.1)?;
        portable::output(&reference::backward(&x, &dy)?)
    }
}

impl CustomOp2 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if all_f32(&[xs, gs]) {
            cpu::backward(xs, xl, gs, gl)
        } else {
            self.portable((xs, xl), (gs, gl))
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        match cuda::backward((xs, xl), (gs, gl))? {
            Some(out) => Ok(out),
            None => self.portable((xs, xl), (gs, gl)),
        }
    }
}
