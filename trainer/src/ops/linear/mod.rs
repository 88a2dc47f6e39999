//! The fully connected layer of the heads, `y = x @ weight^T + bias`, as one autograd node on
//! every device (Candle's `Linear` makes four: the weight's transpose, the matmul, the bias's
//! broadcast and the add, each with its own gradient buffers in the backward). The forward runs
//! the gemm of [`cpu`] on the CPU in f32, otherwise the tensor ops of [`reference`] inside the node
//! (see [`crate::ops::portable`]; on CUDA that is cuBLAS's matmul and one add). The backward is
//! three tensor ops on any device: two matmuls and a column sum.

pub mod cpu;
pub mod reference;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::ops::cpu_storage::all_f32;
use crate::ops::portable::{self, Backend};

/// `x [n, in] @ weight^T + bias` with `weight [out, in]` and `bias [out]`: `[n, out]`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (_, inputs) = x.dims2()?;
    let (outputs, weight_inputs) = weight.dims2()?;
    if weight_inputs != inputs || bias.dims() != [outputs] {
        candle_core::bail!(
            "linear: input {:?}, weight {:?} and bias {:?} do not fit together",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Linear)
}

/// The node: `(x, weight, bias) -> y`.
struct Linear;

impl Linear {
    fn portable<S: Backend>(&self, args: [(&S, &Layout); 3]) -> Result<(S, Shape)> {
        let [x, w, b] = args.map(|(s, l)| portable::tensor(s, l));
        portable::output(&reference::forward(&x?, &w?, &b?)?)
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if all_f32(&[xs, ws, bs]) {
            cpu::forward((xs, xl), (ws, wl), (bs, bl))
        } else {
            self.portable([(xs, xl), (ws, wl), (bs, bl)])
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.portable([(xs, xl), (ws, wl), (bs, bl)])
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = reference::backward(x, weight, dy, x.track_op())?;
        Ok((dx, Some(dw), Some(db)))
    }
}
