//! Reading a custom op's CPU arguments.

use candle_core::{CpuStorage, Layout, Result};

/// The contiguous f32 data of a CPU tensor argument of op `op`.
pub fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("{op}: needs contiguous f32 input"),
    }
}
