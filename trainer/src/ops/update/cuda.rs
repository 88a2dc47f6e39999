//! The updates' CUDA kernels (`cuda.cu`, compiled to PTX by build.rs), in place on contiguous
//! f32 buffers: one launch per update (two for LARS: its norms, then the step, with the trust
//! ratio kept on the device). Each returns `false` where its kernel does not apply (another
//! dtype, a strided argument, more than 2^32 elements), and the op then runs its reference.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaViewMut, LaunchConfig, PushKernelArg};
use candle_core::{CudaStorage, DType, Layout, Result};

use super::{AdamStep, Blend, Momentum};
use crate::ops::cuda_storage::{elementwise, launch, view, THREADS};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/update.ptx"));
const MODULE: &str = "maskdeep-update";

/// The element count the kernels run over, if every argument is contiguous f32 of one length
/// that 32 bits index.
fn length(dst: (&CudaStorage, &Layout), args: &[(&CudaStorage, &Layout)]) -> Option<u32> {
    let n = dst.1.shape().elem_count();
    let fits = std::iter::once(dst)
        .chain(args.iter().copied())
        .all(|(s, l)| s.dtype() == DType::F32 && l.is_contiguous() && l.shape().elem_count() == n);
    (fits && n < u32::MAX as usize).then_some(n as u32)
}

/// The destination's f32 elements, writable.
fn view_mut<'a>(s: &'a mut CudaStorage, l: &Layout) -> Result<CudaViewMut<'a, f32>> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::msg("an update kernel got a strided destination"))?;
    Ok(s.as_cuda_slice_mut::<f32>()?.slice_mut(start..end))
}

/// [`Blend`] on `dst` with `src`.
pub fn blend(
    op: &Blend,
    (ds, dl): (&mut CudaStorage, &Layout),
    src: (&CudaStorage, &Layout),
) -> Result<bool> {
    let Some(n) = length((ds, dl), &[src]) else {
        return Ok(false);
    };
    let dev = ds.device.clone();
    let s = view::<f32>(src.0, src.1)?;
    let mut d = view_mut(ds, dl)?;
    let (keep, take, square) = (op.keep as f32, op.take as f32, op.square as i32);
    launch!(
        (dev, MODULE, PTX),
        "update_blend",
        elementwise(n as usize),
        [&mut d, &s, &n, &keep, &take, &square]
    );
    Ok(true)
}

/// [`Momentum`] on the buffer `m` with the weight `w` and its gradient `g`.
pub fn momentum(
    op: &Momentum,
    (ms, ml): (&mut CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
) -> Result<bool> {
    let Some(n) = length((ms, ml), &[(ws, wl), (gs, gl)]) else {
        return Ok(false);
    };
    let dev = ms.device.clone();
    let (w, g) = (view::<f32>(ws, wl)?, view::<f32>(gs, gl)?);
    let (momentum, decay) = (op.momentum as f32, op.decay as f32);
    let ratio = match op.trust {
        None => None,
        Some(trust) => {
            let blocks = (n as usize).div_ceil(THREADS as usize * 16).clamp(1, 256);
            // SAFETY: every block writes its partial sums, the last block the sums and ratio.
            let (mut partial, mut sums, mut ratio) = unsafe {
                (
                    dev.alloc::<f64>(2 * blocks)?,
                    dev.alloc::<f64>(2)?,
                    dev.alloc::<f32>(1)?,
                )
            };
            let mut done = dev.alloc_zeros::<u32>(1)?;
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(
                (dev, MODULE, PTX),
                "update_trust_ratio",
                cfg,
                [
                    &w,
                    &g,
                    &n,
                    &decay,
                    &trust,
                    &mut partial,
                    &mut done,
                    &mut sums,
                    &mut ratio
                ]
            );
            Some(ratio)
        }
    };
    let has_ratio = ratio.is_some() as i32;
    let mut m = view_mut(ms, ml)?;
    match &ratio {
        Some(r) => launch!(
            (dev, MODULE, PTX),
            "update_momentum",
            elementwise(n as usize),
            [&mut m, &w, &g, &n, &momentum, &decay, r, &has_ratio]
        ),
        // The ratio argument is not read: any f32 buffer stands in.
        None => launch!(
            (dev, MODULE, PTX),
            "update_momentum",
            elementwise(n as usize),
            [&mut m, &w, &g, &n, &momentum, &decay, &w, &has_ratio]
        ),
    }
    Ok(true)
}

/// [`AdamStep`] on the weight `w` with the moments `m` and `v`.
pub fn adam_step(
    op: &AdamStep,
    (ws, wl): (&mut CudaStorage, &Layout),
    (ms, ml): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
) -> Result<bool> {
    let Some(n) = length((ws, wl), &[(ms, ml), (vs, vl)]) else {
        return Ok(false);
    };
    let dev = ws.device.clone();
    let (m, v) = (view::<f32>(ms, ml)?, view::<f32>(vs, vl)?);
    let mut w = view_mut(ws, wl)?;
    let (c1, c2) = op.corrections;
    let [lr, decay, c1, c2, eps] = [op.lr, op.decay, c1, c2, op.eps].map(|x| x as f32);
    launch!(
        (dev, MODULE, PTX),
        "update_adam",
        elementwise(n as usize),
        [&mut w, &m, &v, &n, &lr, &decay, &c1, &c2, &eps]
    );
    Ok(true)
}
