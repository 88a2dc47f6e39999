//! The optimiser's and the EMA's multi-tensor CUDA kernels (`cuda.cu`, compiled to PTX by
//! build.rs), in place on contiguous f32 buffers: one launch per group of up to [`CHUNK`]
//! parameters (two for LARS: per-tensor norms, then the step, with the trust ratios kept on the
//! device), the buffers' addresses passed in the kernel's arguments. Each entry returns `None`
//! where its kernels do not apply (tensors off the GPU, another dtype, a strided argument, more
//! than 2^32 elements), and the caller runs the per-tensor ops.

use candle_core::cuda_backend::cudarc::driver::{
    DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Device, Result, Storage, Tensor};

use super::CHUNK;
use super::{AdamStep, Blend};
use crate::ops::cuda_storage::{launch, view, THREADS};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/update.ptx"));
const MODULE: &str = "maskdeep-update";

/// One launch's tensors, passed by value as the kernel's first argument (as `Chunk` in
/// `cuda.cu`): up to four buffers per tensor, its length, weight decay and whether LARS adapts it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Chunk {
    a: [u64; CHUNK],
    b: [u64; CHUNK],
    c: [u64; CHUNK],
    d: [u64; CHUNK],
    len: [u32; CHUNK],
    decay: [f32; CHUNK],
    trust_on: [u32; CHUNK],
    count: u32,
}

// SAFETY: a plain C struct of integers and floats, laid out as the kernels' `Chunk`.
unsafe impl DeviceRepr for Chunk {}

/// One tensor of a multi-tensor update: its buffers in the kernel's `a, b, c, d` order (the
/// first one is the updated weight or target), its weight decay and whether LARS adapts it.
pub struct Row<'a> {
    pub buffers: [Option<&'a Tensor>; 4],
    pub decay: f64,
    pub trust_on: bool,
}

/// The device of `rows` if every buffer is a contiguous f32 CUDA tensor on it, of its row's
/// length, which 32 bits index.
fn multi_device(rows: &[Row]) -> Option<CudaDevice> {
    let first = rows.first()?.buffers[0]?;
    let Device::Cuda(dev) = first.device() else {
        return None;
    };
    let fits = rows.iter().all(|row| {
        let n = row.buffers[0].map_or(0, |t| t.elem_count());
        n < u32::MAX as usize
            && row.buffers.iter().flatten().all(|t| {
                t.dtype() == DType::F32
                    && t.elem_count() == n
                    && t.layout().is_contiguous()
                    && t.device().same_device(first.device())
            })
    });
    fits.then(|| dev.clone())
}

/// Launches `launch` once per run of up to [`CHUNK`] rows, with the rows' buffer addresses;
/// `None` (nothing launched) where [`multi_device`] refuses the rows, else the launches made.
fn chunked(
    rows: &[Row],
    mut launch: impl FnMut(&CudaDevice, &Chunk, &[Row]) -> Result<usize>,
) -> Result<Option<usize>> {
    let Some(dev) = multi_device(rows) else {
        return Ok(None);
    };
    let stream = dev.cuda_stream();
    let mut launches = 0;
    for part in rows.chunks(CHUNK) {
        let tensors: Vec<(usize, usize, &Tensor)> = part
            .iter()
            .enumerate()
            .flat_map(|(r, row)| {
                (row.buffers.iter().enumerate()).filter_map(move |(b, t)| t.map(|t| (r, b, t)))
            })
            .collect();
        let guards: Vec<_> = tensors
            .iter()
            .map(|(_, _, t)| t.storage_and_layout())
            .collect();
        let views = guards
            .iter()
            .map(|(storage, layout)| match &**storage {
                Storage::Cuda(s) => view::<f32>(s, layout),
                _ => candle_core::bail!("a multi-tensor update got a tensor off the GPU"),
            })
            .collect::<Result<Vec<_>>>()?;
        // The guards record each buffer's use on the stream when dropped, after the launch.
        let pointers: Vec<_> = views.iter().map(|v| v.device_ptr(&stream)).collect();
        let mut chunk = Chunk {
            a: [0; CHUNK],
            b: [0; CHUNK],
            c: [0; CHUNK],
            d: [0; CHUNK],
            len: [0; CHUNK],
            decay: [0.0; CHUNK],
            trust_on: [0; CHUNK],
            count: part.len() as u32,
        };
        for ((r, b, t), (pointer, _)) in tensors.iter().zip(&pointers) {
            let slot = [&mut chunk.a, &mut chunk.b, &mut chunk.c, &mut chunk.d];
            slot.into_iter().nth(*b).expect("four buffers")[*r] = *pointer;
            chunk.len[*r] = t.elem_count() as u32;
        }
        for (r, row) in part.iter().enumerate() {
            chunk.decay[r] = row.decay as f32;
            chunk.trust_on[r] = row.trust_on as u32;
        }
        launches += launch(&dev, &chunk, part)?;
        drop(pointers);
    }
    Ok(Some(launches))
}

/// A grid of `blocks` blocks per tensor over a chunk's tensors, each block striding over its
/// tensor.
fn per_tensor(blocks: usize, count: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, count, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks per tensor: enough for the chunk's largest tensor at 16 elements per thread, at most 128.
fn blocks_for(part: &[Row]) -> usize {
    let largest = part
        .iter()
        .filter_map(|r| r.buffers[0].map(|t| t.elem_count()))
        .max()
        .unwrap_or(1);
    largest.div_ceil(THREADS as usize * 16).clamp(1, 128)
}

/// Momentum SGD over `rows` (`[w, m, g]`): `m = momentum m + r (g + decay w)`, `w -= lr m`, with
/// LARS's ratio `r` (coefficient `trust`) for rows marked `trust_on`, else 1. `None` where the
/// rows are not all on one GPU in contiguous f32.
pub fn momentum_steps(
    rows: &[Row],
    momentum: f64,
    trust: Option<f64>,
    lr: f64,
) -> Result<Option<usize>> {
    let (momentum, lr) = (momentum as f32, lr as f32);
    chunked(rows, |dev, chunk, part| {
        let cfg = per_tensor(blocks_for(part), chunk.count);
        let count = part.len();
        let Some(trust) = trust.filter(|_| part.iter().any(|r| r.trust_on)) else {
            let none = 0i32;
            // SAFETY: the kernel does not read the ratio without has_ratio.
            let unused = unsafe { dev.alloc::<f32>(1)? };
            launch!(
                (dev, MODULE, PTX),
                "multi_momentum_step",
                cfg,
                [chunk, &momentum, &lr, &unused, &none]
            );
            return Ok(1);
        };
        let splits = cfg.grid_dim.0 as usize;
        // SAFETY: every block writes its partial sums, each tensor's last block its sums and ratio.
        let (mut partial, mut sums, mut ratio) = unsafe {
            (
                dev.alloc::<f64>(2 * count * splits)?,
                dev.alloc::<f64>(2 * count)?,
                dev.alloc::<f32>(count)?,
            )
        };
        let mut done = dev.alloc_zeros::<u32>(count)?;
        launch!(
            (dev, MODULE, PTX),
            "multi_trust_ratio",
            cfg,
            [
                chunk,
                &trust,
                &mut partial,
                &mut done,
                &mut sums,
                &mut ratio
            ]
        );
        let with = 1i32;
        launch!(
            (dev, MODULE, PTX),
            "multi_momentum_step",
            cfg,
            [chunk, &momentum, &lr, &ratio, &with]
        );
        Ok(2)
    })
}

/// `dst = keep dst + take src` over `rows` (`[dst, src]`): the EMA target update.
pub fn blends(rows: &[Row], op: &Blend) -> Result<Option<usize>> {
    let (keep, take) = (op.keep as f32, op.take as f32);
    chunked(rows, |dev, chunk, part| {
        let cfg = per_tensor(blocks_for(part), chunk.count);
        launch!(
            (dev, MODULE, PTX),
            "multi_blend",
            cfg,
            [chunk, &keep, &take]
        );
        Ok(1)
    })
}

/// AdamW over `rows` (`[w, m, g, v]`): both moments (`betas`) and the step of `op` (whose
/// `decay` each row overrides).
pub fn adam_steps(rows: &[Row], betas: (f64, f64), op: &AdamStep) -> Result<Option<usize>> {
    let (c1, c2) = op.corrections;
    let [b1, take1, b2, take2, lr, c1, c2, eps] = [
        betas.0,
        1.0 - betas.0,
        betas.1,
        1.0 - betas.1,
        op.lr,
        c1,
        c2,
        op.eps,
    ]
    .map(|x| x as f32);
    chunked(rows, |dev, chunk, part| {
        let cfg = per_tensor(blocks_for(part), chunk.count);
        launch!(
            (dev, MODULE, PTX),
            "multi_adam",
            cfg,
            [chunk, &b1, &take1, &b2, &take2, &lr, &c1, &c2, &eps]
        );
        Ok(1)
    })
}
