//! Train-mode BatchNorm's CUDA kernels (`cuda.cu`, compiled to PTX by build.rs), launched on
//! Candle's stream: the statistics in one pass (one launch, plus one under SyncBN), the
//! normalisation fused with the residual add and the ReLU (one launch), and the backward in two
//! launches, where the tensor-op reference takes about ten launches forward and twenty backward,
//! each with an f32 copy kept for the backward. Data in f32, bf16 or f16 (all inputs of one
//! dtype); the statistics, parameters and packed gradients are f32, per-channel sums f64 and
//! deterministic. Each entry returns `None` where no kernel applies (another dtype, mixed dtypes,
//! a strided input, more than 2^32 elements); the op then runs its reference.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDevice;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, Layout, Result, Shape, Storage, Tensor};

use super::ncl;
use crate::dist::Collective;
use crate::ops::cuda_storage::{by_dtype, elementwise, launch, view, Elem, THREADS};
use crate::ops::portable;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/batch_norm.ptx"));
const MODULE: &str = "maskdeep-batch-norm";
/// Elements each thread of a per-channel reduction sums, at least (sets the blocks per channel).
const PER_THREAD: usize = 16;

/// Whether the kernels take these arguments: one dtype, contiguous, `(n, c, l)` indexable in
/// 32 bits (with the packed gradient's two planes and `4c` parameters).
fn applicable(args: &[(&CudaStorage, &Layout)], (n, c, l): (usize, usize, usize)) -> bool {
    let dtype = args[0].0.dtype();
    args.iter()
        .all(|(s, l)| s.dtype() == dtype && l.is_contiguous())
        && 2 * n * c * l + 4 * c < u32::MAX as usize
}

/// `(n, c, l)` as the kernels' 32-bit arguments.
fn dims32((n, c, l): (usize, usize, usize)) -> (u32, u32, u32) {
    (n as u32, c as u32, l as u32)
}

/// One block per (channel, split) for a per-channel reduction over `n * l` values.
fn per_channel((n, c, l): (usize, usize, usize)) -> LaunchConfig {
    let splits = (n * l)
        .div_ceil(THREADS as usize * PER_THREAD)
        .clamp(1, 128);
    LaunchConfig {
        grid_dim: (c as u32, splits as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Scratch of a per-channel reduction launched with `cfg`: partial sums and zeroed counters.
fn reduction_scratch(
    dev: &CudaDevice,
    cfg: &LaunchConfig,
) -> Result<(CudaSlice<f64>, CudaSlice<u32>)> {
    let (c, splits) = (cfg.grid_dim.0 as usize, cfg.grid_dim.1 as usize);
    // SAFETY: each block writes its two partial sums before the last block reads them.
    let partial = unsafe { dev.alloc::<f64>(2 * c * splits)? };
    Ok((partial, dev.alloc_zeros::<u32>(c)?))
}

/// `sums` summed over the ranks of `group`, as an f64 tensor on the device.
fn all_reduced(dev: &CudaDevice, sums: CudaSlice<f64>, group: &dyn Collective) -> Result<Tensor> {
    let len = sums.len();
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(sums, dev.clone()));
    group.all_reduce(&Tensor::from_storage(
        storage,
        len,
        BackpropOp::none(),
        false,
    ))
}

/// Calls `f` with the f64 elements of `t`.
fn with_f64<R>(t: &Tensor, f: impl FnOnce(CudaView<'_, f64>) -> Result<R>) -> Result<R> {
    portable::with_storage(t, |s: &CudaStorage, l| f(view(s, l)?))
}

/// Per-channel mean then biased variance of `x [n, c, ...]`: `[2c]` f32. With `sync`, over
/// every rank's batch.
pub fn stats(
    xs: &CudaStorage,
    xl: &Layout,
    sync: Option<&dyn Collective>,
) -> Result<Option<(CudaStorage, Shape)>> {
    let dims = ncl(xl.shape())?;
    if !applicable(&[(xs, xl)], dims) {
        return Ok(None);
    }
    by_dtype!(xs.dtype(), stats_as(xs, xl, dims, sync))
}

fn stats_as<T: Elem>(
    xs: &CudaStorage,
    xl: &Layout,
    dims: (usize, usize, usize),
    sync: Option<&dyn Collective>,
) -> Result<(CudaStorage, Shape)> {
    let dev = &xs.device;
    let (n, c, l) = dims32(dims);
    let world = sync.map_or(1, |g| g.world_size());
    let count = (dims.0 * dims.2 * world) as f64;
    let x = view::<T>(xs, xl)?;
    let cfg = per_channel(dims);
    let (mut partial, mut done) = reduction_scratch(dev, &cfg)?;
    // SAFETY: the channels' last blocks write every element of both.
    let (mut sums, mut out) =
        unsafe { (dev.alloc::<f64>(2 * dims.1)?, dev.alloc::<f32>(2 * dims.1)?) };
    launch!(
        (dev, MODULE, PTX),
        format!("bn_stats_{}", T::SUFFIX),
        cfg,
        [
            &x,
            &n,
            &c,
            &l,
            &count,
            &mut partial,
            &mut done,
            &mut sums,
            &mut out
        ]
    );
    if let Some(group) = sync {
        let global = all_reduced(dev, sums, group)?;
        with_f64(&global, |global| {
            launch!(
                (dev, MODULE, PTX),
                "bn_stats_finish",
                elementwise(dims.1),
                [&global, &c, &count, &mut out]
            );
            Ok(())
        })?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(2 * dims.1),
    ))
}

/// `(x, params [weight, bias, mean, var] f32, residual)` -> `x` normalised, plus `residual`,
/// through a ReLU when `relu`, in `x`'s dtype.
pub fn forward(
    (xs, xl): (&CudaStorage, &Layout),
    (ps, pl): (&CudaStorage, &Layout),
    residual: Option<(&CudaStorage, &Layout)>,
    relu: bool,
) -> Result<Option<(CudaStorage, Shape)>> {
    let dims = ncl(xl.shape())?;
    let mut args = vec![(xs, xl)];
    args.extend(residual);
    if !applicable(&args, dims) || !pl.is_contiguous() {
        return Ok(None);
    }
    by_dtype!(
        xs.dtype(),
        forward_as(
            (xs, xl),
            (ps, pl),
            residual.unwrap_or((xs, xl)),
            residual.is_some(),
            relu,
            dims
        )
    )
}

fn forward_as<T: Elem>(
    (xs, xl): (&CudaStorage, &Layout),
    (ps, pl): (&CudaStorage, &Layout),
    (rs, rl): (&CudaStorage, &Layout),
    has_residual: bool,
    relu: bool,
    dims: (usize, usize, usize),
) -> Result<(CudaStorage, Shape)> {
    let dev = &xs.device;
    let (n, c, l) = dims32(dims);
    let len = dims.0 * dims.1 * dims.2;
    let (x, params, r) = (view::<T>(xs, xl)?, view::<f32>(ps, pl)?, view::<T>(rs, rl)?);
    // SAFETY: the kernel writes every element.
    let mut y = unsafe { dev.alloc::<T>(len)? };
    let (has_residual, relu) = (has_residual as i32, relu as i32);
    launch!(
        (dev, MODULE, PTX),
        format!("bn_forward_{}", T::SUFFIX),
        elementwise(len),
        [&x, &params, &r, &mut y, &n, &c, &l, &has_residual, &relu]
    );
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        xl.shape().clone(),
    ))
}

/// `(x, dy, y)` with `params` = `[weight, bias, mean, var]` -> `[dx | dresidual (when residual)
/// | dweight | dbias | 2c zeros]`, flat f32, as the CPU kernel packs them. With `sync`, the input
/// gradient uses every rank's gradient sums; the parameters' gradients stay this rank's own.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    y: (&CudaStorage, &Layout),
    params: (&CudaStorage, &Layout),
    relu: bool,
    residual: bool,
    sync: Option<&dyn Collective>,
) -> Result<Option<(CudaStorage, Shape)>> {
    let dims = ncl(x.1.shape())?;
    if !applicable(&[x, dy, y], dims) || !params.1.is_contiguous() {
        return Ok(None);
    }
    by_dtype!(
        x.0.dtype(),
        backward_as([x, dy, y], params, (relu, residual), sync, dims)
    )
}

fn backward_as<T: Elem>(
    [(xs, xl), (gs, gl), (ys, yl)]: [(&CudaStorage, &Layout); 3],
    (ps, pl): (&CudaStorage, &Layout),
    (relu, residual): (bool, bool),
    sync: Option<&dyn Collective>,
    dims: (usize, usize, usize),
) -> Result<(CudaStorage, Shape)> {
    let dev = &xs.device;
    let (n, c, l) = dims32(dims);
    let len = dims.0 * dims.1 * dims.2;
    let world = sync.map_or(1, |g| g.world_size());
    let count = (dims.0 * dims.2 * world) as f64;
    let (x, dy, y) = (view::<T>(xs, xl)?, view::<T>(gs, gl)?, view::<T>(ys, yl)?);
    let params = view::<f32>(ps, pl)?;
    let relu_flag = relu as i32;
    let cfg = per_channel(dims);
    let (mut partial, mut done) = reduction_scratch(dev, &cfg)?;
    // SAFETY: the channels' last blocks write every element.
    let mut local = unsafe { dev.alloc::<f64>(2 * dims.1)? };
    launch!(
        (dev, MODULE, PTX),
        format!("bn_grad_sums_{}", T::SUFFIX),
        cfg,
        [
            &x,
            &dy,
            &y,
            &params,
            &n,
            &c,
            &l,
            &relu_flag,
            &mut partial,
            &mut done,
            &mut local
        ]
    );
    let global = match sync {
        Some(group) => Some(all_reduced(dev, local.clone(), group)?),
        None => None,
    };
    let planes = if residual { 2 * len } else { len };
    // SAFETY: the kernel writes every element.
    let mut out = unsafe { dev.alloc::<f32>(planes + 4 * dims.1)? };
    let residual_flag = residual as i32;
    let mut input_grad = |global: CudaView<'_, f64>| -> Result<()> {
        launch!(
            (dev, MODULE, PTX),
            format!("bn_input_grad_{}", T::SUFFIX),
            elementwise(len),
            [
                &x,
                &dy,
                &y,
                &params,
                &local,
                &global,
                &n,
                &c,
                &l,
                &count,
                &relu_flag,
                &residual_flag,
                &mut out
            ]
        );
        Ok(())
    };
    match &global {
        Some(global) => with_f64(global, input_grad)?,
        None => input_grad(local.slice(..))?,
    }
    let total = out.len();
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(total),
    ))
}
