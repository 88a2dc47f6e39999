//! Train-mode batch normalisation over `[batch, channels, ...]`, optionally followed by a
//! residual add and a ReLU, in f32 whatever the input dtype (so that it serves mixed precision).
//!
//! One autograd node on every device: the normalisation, whose arguments are the input, the affine
//! parameters `[weight | bias]` (and the residual). The batch statistics come from an op without a
//! gradient of its own (the normalisation's backward accounts for them) and travel inside the node
//! with the parameters, packed as `[weight | bias | mean | var]`. The statistics stay on the device
//! as a tensor, for the running averages; nothing is read back to the host. Each op picks its
//! kernel from the storage it gets: the fused kernels of [`cpu`] on the CPU in f32, those of `cuda`
//! (feature `cuda`) on a GPU in f32, bf16 or f16, otherwise the tensor ops of [`reference`] run
//! inside the op (see [`crate::ops::portable`]). Inside a [`sync_bn::Scope`] the statistics and
//! the backward sum their per-channel sums over the ranks (SyncBN). [`conv_train`] makes one node
//! of a convolution and its BatchNorm.

mod after_conv;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;

pub use after_conv::conv_train;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use shared::cpu::Isa;

use crate::dist::sync_bn;
use crate::ops::cpu_storage::all_f32;
use crate::ops::portable::{self, Backend};

/// The variance's epsilon (PyTorch's default).
pub const EPS: f64 = 1e-5;

/// `(n, c, l)` of a `[n, c, ...]` shape.
fn ncl(shape: &Shape) -> Result<(usize, usize, usize)> {
    let dims = shape.dims();
    if dims.len() < 2 || dims[0] * dims[1] == 0 {
        candle_core::bail!("batch norm: needs a non-empty [n, c, ...] input, got {dims:?}");
    }
    Ok((dims[0], dims[1], shape.elem_count() / (dims[0] * dims[1])))
}

/// Normalises `x [n, c, ...]` with its batch statistics and the affine parameters `affine`
/// (`[weight | bias]`, `[2c]`, f32), adds `residual` (shaped like `x`) when given and applies a
/// ReLU when `relu`. Returns the output (`x`'s dtype and shape) and the batch statistics `[2c]`
/// (mean, then biased variance; f32, without gradient).
pub fn train(
    x: &Tensor,
    affine: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<(Tensor, Tensor)> {
    let x = x.contiguous()?;
    if let Some(r) = residual {
        if r.shape() != x.shape() {
            candle_core::bail!("batch norm: the residual's shape differs from the input's");
        }
    }
    let (stats, op) = BatchNormTrain::prepare(&x, affine, relu)?;
    let y = match residual {
        Some(r) => x.apply_op3(affine, &r.contiguous()?, op)?,
        None => x.apply_op2(affine, op)?,
    };
    Ok((y, stats))
}

/// `x -> [mean, biased variance]`, `[2c]` f32.
struct BatchStats;

impl BatchStats {
    fn portable<S: Backend>(&self, s: &S, l: &Layout) -> Result<(S, Shape)> {
        let x = portable::tensor(s, l)?;
        let stats = match sync_bn::current() {
            Some(group) => reference::synced_stats(&x, group.as_ref())?,
            None => reference::stats(&x)?,
        };
        portable::output(&stats)
    }
}

impl CustomOp1 for BatchStats {
    fn name(&self) -> &'static str {
        "batch-norm-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if all_f32(&[s]) {
            cpu::stats(Isa::active(), s, l, sync_bn::current().as_deref())
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
        match cuda::stats(s, l, sync_bn::current().as_deref())? {
            Some(out) => Ok(out),
            None => self.portable(s, l),
        }
    }
}

/// `(x, affine)` or `(x, affine, residual)` -> the output, with `params` (`[weight | bias | mean |
/// var]`, `[4c]`; Candle's ops take at most three arguments) held by the op.
struct BatchNormTrain {
    relu: bool,
    params: Tensor,
}

impl BatchNormTrain {
    /// The batch statistics of the contiguous `x` and the node that normalises it with them and
    /// `affine` (both computed outside the graph: the node's gradient for `affine` is the first
    /// half of the packed one).
    fn prepare(x: &Tensor, affine: &Tensor, relu: bool) -> Result<(Tensor, Self)> {
        let (_, c, _) = ncl(x.shape())?;
        if affine.dims() != [2 * c] {
            candle_core::bail!(
                "batch norm: affine parameters {:?} for {c} channels (want [{}])",
                affine.dims(),
                2 * c
            );
        }
        let stats = x.apply_op1_no_bwd(&BatchStats)?;
        let params = Tensor::cat(&[&affine.detach(), &stats], 0)?;
        Ok((stats, BatchNormTrain { relu, params }))
    }

    fn portable<S: Backend>(
        &self,
        (xs, xl): (&S, &Layout),
        residual: Option<(&S, &Layout)>,
    ) -> Result<(S, Shape)> {
        let x = portable::tensor(xs, xl)?;
        let params = portable::with_storage(&self.params, |s: &S, l| portable::tensor(s, l))?;
        let r = residual.map(|(s, l)| portable::tensor(s, l)).transpose()?;
        portable::output(&reference::forward(&x, &params, r.as_ref(), self.relu)?)
    }

    fn cpu(
        &self,
        x: (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let kernel = portable::with_storage(&self.params, |ps: &CpuStorage, pl| {
            let mut storages = vec![x.0, ps];
            storages.extend(residual.map(|r| r.0));
            all_f32(&storages)
                .then(|| cpu::forward(Isa::active(), x, (ps, pl), residual, self.relu))
                .transpose()
        })?;
        match kernel {
            Some(out) => Ok(out),
            None => self.portable(x, residual),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        x: (&candle_core::CudaStorage, &Layout),
        residual: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let kernel = portable::with_storage(&self.params, |ps: &candle_core::CudaStorage, pl| {
            cuda::forward(x, (ps, pl), residual, self.relu)
        })?;
        match kernel {
            Some(out) => Ok(out),
            None => self.portable(x, residual),
        }
    }

    /// The gradients of `x`, of the affine parameters and (when `residual`) of the residual.
    fn grads(
        &self,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        residual: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let back = BatchNormBackward {
            relu: self.relu,
            residual,
            params: self.params.clone(),
        };
        let out = x.apply_op3_no_bwd(&dy.contiguous()?, y, &back)?;
        let len = x.elem_count();
        let plane = |i: usize| -> Result<Tensor> {
            out.narrow(0, i * len, len)?
                .reshape(x.shape())?
                .to_dtype(x.dtype())
        };
        let planes = if residual { 2 } else { 1 };
        // The packed gradient's second half (the statistics') is zero.
        let daffine = out.narrow(0, planes * len, self.params.elem_count() / 2)?;
        Ok((plane(0)?, daffine, residual.then(|| plane(1)).transpose()?))
    }
}

impl CustomOp2 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        _affine: &CpuStorage,
        _affine_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu((xs, xl), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        _affine: &candle_core::CudaStorage,
        _affine_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda((xs, xl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _affine: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, daffine, _) = self.grads(x, y, dy, false)?;
        Ok((Some(dx), Some(daffine)))
    }
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        _affine: &CpuStorage,
        _affine_layout: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu((xs, xl), Some((rs, rl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        _affine: &candle_core::CudaStorage,
        _affine_layout: &Layout,
        rs: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda((xs, xl), Some((rs, rl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _affine: &Tensor,
        _residual: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, daffine, dres) = self.grads(x, y, dy, true)?;
        Ok((Some(dx), Some(daffine), dres))
    }
}

/// `(x, dy, y)` -> `[dx | dresidual (when residual) | dweight | dbias | 2c zeros]`, f32, with the
/// packed parameters held by the op (a fourth input; Candle's ops take at most three).
struct BatchNormBackward {
    relu: bool,
    residual: bool,
    params: Tensor,
}

impl BatchNormBackward {
    fn portable<S: Backend>(&self, args: [(&S, &Layout); 3]) -> Result<(S, Shape)> {
        let [x, dy, y] = args.map(|(s, l)| portable::tensor(s, l));
        let params = portable::with_storage(&self.params, |s: &S, l| portable::tensor(s, l))?;
        let (x, dy, y) = (x?, dy?, y?);
        let out = match sync_bn::current() {
            Some(group) => reference::synced_backward(
                (&x, &dy, &y),
                &params,
                (self.relu, self.residual),
                group.as_ref(),
            )?,
            None => reference::backward(&x, &dy, &y, &params, self.relu, self.residual)?,
        };
        portable::output(&out)
    }
}

impl CustomOp3 for BatchNormBackward {
    fn name(&self) -> &'static str {
        "batch-norm-train-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if !all_f32(&[xs, gs, ys]) {
            return self.portable([(xs, xl), (gs, gl), (ys, yl)]);
        }
        portable::with_storage(&self.params, |ps: &CpuStorage, pl| {
            cpu::backward(
                Isa::active(),
                (xs, xl),
                (gs, gl),
                (ys, yl),
                (ps, pl),
                self.relu,
                self.residual,
                sync_bn::current().as_deref(),
            )
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let kernel = portable::with_storage(&self.params, |ps: &candle_core::CudaStorage, pl| {
            cuda::backward(
                (xs, xl),
                (gs, gl),
                (ys, yl),
                (ps, pl),
                self.relu,
                self.residual,
                sync_bn::current().as_deref(),
            )
        })?;
        match kernel {
            Some(out) => Ok(out),
            None => self.portable([(xs, xl), (gs, gl), (ys, yl)]),
        }
    }
}
