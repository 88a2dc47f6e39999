//! The optimiser and EMA updates as in-place ops on a parameter or state buffer: the kernels of
//! [`cpu`] on contiguous f32 CPU tensors, otherwise the tensor ops of [`reference`] whose result
//! is written into the buffer (see [`crate::ops::portable`]). As tensor ops, LARS costs about ten
//! passes and as many fresh buffers per parameter, 15% of a ResNet-18 step at 32 px on the CPU.
//! The optimiser and the EMA call the multi-tensor entries ([`momentum_steps`], [`adam_steps`],
//! [`blends`]): on a GPU they launch one kernel per group of up to 32 parameters (LARS: two), the
//! CUDA side's only kernels; elsewhere the per-tensor ops.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

use shared::cpu::Isa;

use crate::ops::cpu_storage::{all_f32, f32_slice, f32_slice_mut};
use crate::ops::portable::{self, Backend};

/// Tensors per multi-tensor launch on a GPU; as `CHUNK` in `cuda.cu`.
pub const CHUNK: usize = 32;

/// The launches [`momentum_steps`] makes on a GPU for parameters whose [`Param::lars`] flags are
/// `lars`: per group of [`CHUNK`], two when LARS adapts one of them (the norms, then the step),
/// else one.
pub fn momentum_launches(lars: &[bool], trust: Option<f64>) -> usize {
    lars.chunks(CHUNK)
        .map(|part| 1 + usize::from(trust.is_some() && part.contains(&true)))
        .sum()
}

/// The launches [`adam_steps`] or [`blends`] make on a GPU for `count` tensors: one per group.
pub fn single_pass_launches(count: usize) -> usize {
    count.div_ceil(CHUNK)
}

/// `dst = keep * dst + take * src` (or `src²` when `square`): the EMA target update and Adam's
/// moments (`take = 1 - keep`), and momentum SGD's step `w -= lr * m` (`keep = 1, take = -lr`).
pub struct Blend {
    pub keep: f64,
    pub take: f64,
    pub square: bool,
}

/// Momentum SGD's buffer update `m = momentum * m + ratio * (g + decay * w)`, on `m` with
/// `(w, g)`; `ratio` is LARS's `trust * |w| / |g + decay * w|` (1 where a norm is 0) when
/// `trust` is set, else 1.
pub struct Momentum {
    pub momentum: f64,
    pub decay: f64,
    pub trust: Option<f64>,
}

/// AdamW's parameter step `w -= lr * (m_hat / (sqrt(v_hat) + eps) + decay * w)`, on `w` with
/// the moments `(m, v)`; `corrections` are `1 - beta1^t` and `1 - beta2^t`.
pub struct AdamStep {
    pub lr: f64,
    pub decay: f64,
    pub corrections: (f64, f64),
    pub eps: f64,
}

impl Blend {
    /// Applies the blend to `dst` with `src`.
    pub fn apply(&self, dst: &Tensor, src: &Tensor) -> Result<()> {
        dst.inplace_op2(&src.contiguous()?, self)
    }
}

impl Momentum {
    /// Updates the momentum buffer `m` with the weight `w` and its gradient `g`.
    pub fn apply(&self, m: &Tensor, w: &Tensor, g: &Tensor) -> Result<()> {
        m.inplace_op3(&w.contiguous()?, &g.contiguous()?, self)
    }
}

impl AdamStep {
    /// Steps the weight `w` with the moments `m` and `v`.
    pub fn apply(&self, w: &Tensor, m: &Tensor, v: &Tensor) -> Result<()> {
        w.inplace_op3(&m.contiguous()?, &v.contiguous()?, self)
    }
}

/// One parameter of a multi-tensor update: the weight `w`, its state buffers (`first`: momentum
/// or Adam's first moment; `second`: Adam's second moment), its gradient `g`, its weight decay, and
/// whether LARS adapts its step.
pub struct Param<'a> {
    pub w: &'a Tensor,
    pub first: &'a Tensor,
    pub second: Option<&'a Tensor>,
    pub g: &'a Tensor,
    pub decay: f64,
    pub lars: bool,
}

/// Momentum SGD over every parameter: [`Momentum`] (LARS's ratio with coefficient `trust` for
/// the parameters marked `lars`), then `w -= lr m`. On a GPU a few launches for all parameters
/// (`cuda`'s multi-tensor kernels), elsewhere two ops per parameter. Returns the ops (launches) run.
pub fn momentum_steps(
    params: &[Param],
    momentum: f64,
    trust: Option<f64>,
    lr: f64,
) -> Result<usize> {
    #[cfg(feature = "cuda")]
    {
        let rows: Vec<cuda::Row> = params
            .iter()
            .map(|p| cuda::Row {
                buffers: [Some(p.w), Some(p.first), Some(p.g), None],
                decay: p.decay,
                trust_on: p.lars && trust.is_some(),
            })
            .collect();
        if let Some(launches) = cuda::momentum_steps(&rows, momentum, trust, lr)? {
            return Ok(launches);
        }
    }
    let step = Blend {
        keep: 1.0,
        take: -lr,
        square: false,
    };
    for p in params {
        let trust = trust.filter(|_| p.lars);
        Momentum {
            momentum,
            decay: p.decay,
            trust,
        }
        .apply(p.first, p.w, p.g)?;
        step.apply(p.w, p.first)?;
    }
    Ok(2 * params.len())
}

/// AdamW over every parameter (each with its `second` moment): both moments with `betas`, then
/// [`AdamStep`] `op` with each parameter's own decay (`op.decay` is not used). On a GPU one launch
/// per group of parameters (`cuda`), elsewhere three ops per parameter.
pub fn adam_steps(params: &[Param], betas: (f64, f64), op: &AdamStep) -> Result<usize> {
    #[cfg(feature = "cuda")]
    {
        let rows: Vec<cuda::Row> = params
            .iter()
            .map(|p| cuda::Row {
                buffers: [Some(p.w), Some(p.first), Some(p.g), p.second],
                decay: p.decay,
                trust_on: false,
            })
            .collect();
        if params.iter().all(|p| p.second.is_some()) {
            if let Some(launches) = cuda::adam_steps(&rows, betas, op)? {
                return Ok(launches);
            }
        }
    }
    let moment = |keep: f64, square| Blend {
        keep,
        take: 1.0 - keep,
        square,
    };
    for p in params {
        let Some(second) = p.second else {
            candle_core::bail!("AdamW needs a second moment for every parameter");
        };
        moment(betas.0, false).apply(p.first, p.g)?;
        moment(betas.1, true).apply(second, p.g)?;
        AdamStep {
            decay: p.decay,
            ..*op
        }
        .apply(p.w, p.first, second)?;
    }
    Ok(3 * params.len())
}

/// [`Blend`] of every `(dst, src)` pair (the EMA target update): on a GPU one launch per group of
/// pairs, elsewhere one op per pair.
pub fn blends(pairs: &[(&Tensor, &Tensor)], op: &Blend) -> Result<usize> {
    #[cfg(feature = "cuda")]
    {
        let rows: Vec<cuda::Row> = pairs
            .iter()
            .map(|&(dst, src)| cuda::Row {
                buffers: [Some(dst), Some(src), None, None],
                decay: 0.0,
                trust_on: false,
            })
            .collect();
        if let Some(launches) = cuda::blends(&rows, op)? {
            return Ok(launches);
        }
    }
    for (dst, src) in pairs {
        op.apply(dst, src)?;
    }
    Ok(pairs.len())
}

/// The in-place op's portable side: `dst = f(dst, args)` with tensor ops.
fn portable_update<S: Backend, const N: usize>(
    dst: &mut S,
    dl: &Layout,
    args: [(&S, &Layout); N],
    f: impl FnOnce(&Tensor, [Tensor; N]) -> Result<Tensor>,
) -> Result<()> {
    let current = portable::tensor(&*dst, dl)?;
    let args = args
        .map(|(s, l)| portable::tensor(s, l))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let args: [Tensor; N] = args.try_into().expect("N arguments");
    let value = f(&current, args)?;
    portable::assign(dst, dl, &value)
}

impl InplaceOp2 for Blend {
    fn name(&self) -> &'static str {
        "blend"
    }

    fn cpu_fwd(
        &self,
        ds: &mut CpuStorage,
        dl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        if !all_f32(&[ds, ss]) {
            return portable_update(ds, dl, [(ss, sl)], |d, [s]| reference::blend(self, d, &s));
        }
        let src = f32_slice(ss, sl, self.name())?;
        cpu::blend(
            Isa::active(),
            self,
            f32_slice_mut(ds, dl, self.name())?,
            src,
        );
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ds: &mut candle_core::CudaStorage,
        dl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        portable_update(ds, dl, [(ss, sl)], |d, [s]| reference::blend(self, d, &s))
    }
}

impl InplaceOp3 for Momentum {
    fn name(&self) -> &'static str {
        "momentum"
    }

    fn cpu_fwd(
        &self,
        ms: &mut CpuStorage,
        ml: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        if !all_f32(&[ms, ws, gs]) {
            return portable_update(ms, ml, [(ws, wl), (gs, gl)], |m, [w, g]| {
                reference::momentum(self, m, &w, &g)
            });
        }
        let w = f32_slice(ws, wl, self.name())?;
        let g = f32_slice(gs, gl, self.name())?;
        cpu::momentum(
            Isa::active(),
            self,
            f32_slice_mut(ms, ml, self.name())?,
            w,
            g,
        );
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ms: &mut candle_core::CudaStorage,
        ml: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        portable_update(ms, ml, [(ws, wl), (gs, gl)], |m, [w, g]| {
            reference::momentum(self, m, &w, &g)
        })
    }
}

impl InplaceOp3 for AdamStep {
    fn name(&self) -> &'static str {
        "adam-step"
    }

    fn cpu_fwd(
        &self,
        ws: &mut CpuStorage,
        wl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        if !all_f32(&[ws, ms, vs]) {
            return portable_update(ws, wl, [(ms, ml), (vs, vl)], |w, [m, v]| {
                reference::adam_step(self, w, &m, &v)
            });
        }
        let m = f32_slice(ms, ml, self.name())?;
        let v = f32_slice(vs, vl, self.name())?;
        cpu::adam_step(
            Isa::active(),
            self,
            f32_slice_mut(ws, wl, self.name())?,
            m,
            v,
        );
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ws: &mut candle_core::CudaStorage,
        wl: &Layout,
        ms: &candle_core::CudaStorage,
        ml: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<()> {
        portable_update(ws, wl, [(ms, ml), (vs, vl)], |w, [m, v]| {
            reference::adam_step(self, w, &m, &v)
        })
    }
}
