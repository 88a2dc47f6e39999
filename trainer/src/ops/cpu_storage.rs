//! Reading a custom op's CPU arguments, and allocating its outputs.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result};
use rayon::prelude::*;

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

/// Outputs at least this long are zeroed by the thread pool.
const PARALLEL_ZEROS: usize = 1 << 16;

/// `len` zeros for an op's output, written by the thread pool when there are many: one thread
/// clearing megabytes would leave the others waiting.
pub fn zeros(len: usize) -> Vec<f32> {
    if len < PARALLEL_ZEROS {
        return vec![0.0; len];
    }
    let mut v = Vec::with_capacity(len);
    v.par_extend(rayon::iter::repeat_n(0f32, len));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_are_as_many_as_asked_on_either_side_of_the_parallel_threshold() {
        for len in [
            0,
            1,
            PARALLEL_ZEROS - 1,
            PARALLEL_ZEROS,
            3 * PARALLEL_ZEROS + 5,
        ] {
            let v = zeros(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == 0.0), "len {len}");
        }
    }
}
