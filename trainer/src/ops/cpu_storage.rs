//! Reading a custom op's CPU arguments.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result};

/// The contiguous f32 data of a CPU tensor argument of op `op`.
pub fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("{op}: needs contiguous f32 input"),
    }
}

/// The contiguous f32 data of an in-place op's CPU destination `op`, writable.
pub fn f32_slice_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("{op}: needs a contiguous f32 destination"),
    }
}

/// Whether every storage holds f32, the CPU kernels' dtype (others take the op's reference).
pub fn all_f32(storages: &[&CpuStorage]) -> bool {
    storages.iter().all(|s| s.dtype() == DType::F32)
}
