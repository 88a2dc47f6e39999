//! Running plain tensor code as the body of a custom op: the op's arguments are copied into fresh
//! tensors without a graph, the code runs on them, and its result becomes the op's output
//! storage. An op whose device has no kernel of its own yet (CUDA, until its kernels land) runs
//! its `reference` this way, so that the autograd graph the layers build is the same on every
//! device. The copies cost one pass over each argument and the result; nothing leaves the device.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Storage, Tensor};

/// A backend's storage as Candle's [`Storage`] holds it.
pub trait Backend: BackendStorage + Sized {
    /// Wraps the storage.
    fn into_storage(self) -> Storage;
    /// This backend's storage inside `storage`, if it is of this backend.
    fn of(storage: &Storage) -> Option<&Self>;
    /// A fresh, uninitialised buffer for `shape` elements of `dtype` on this storage's device.
    ///
    /// # Safety
    /// The caller writes every element before reading any.
    unsafe fn alloc(&self, shape: &Shape, dtype: DType) -> Result<Self>;
}

impl Backend for CpuStorage {
    fn into_storage(self) -> Storage {
        Storage::Cpu(self)
    }

    fn of(storage: &Storage) -> Option<&Self> {
        match storage {
            Storage::Cpu(s) => Some(s),
            _ => None,
        }
    }

    unsafe fn alloc(&self, shape: &Shape, dtype: DType) -> Result<Self> {
        self.device().alloc_uninit(shape, dtype)
    }
}

#[cfg(feature = "cuda")]
impl Backend for candle_core::CudaStorage {
    fn into_storage(self) -> Storage {
        Storage::Cuda(self)
    }

    fn of(storage: &Storage) -> Option<&Self> {
        match storage {
            Storage::Cuda(s) => Some(s),
            _ => None,
        }
    }

    unsafe fn alloc(&self, shape: &Shape, dtype: DType) -> Result<Self> {
        self.device().alloc_uninit(shape, dtype)
    }
}

/// A contiguous copy of `storage` seen through `layout`, on the same device.
fn contiguous_copy<S: Backend>(storage: &S, layout: &Layout) -> Result<S> {
    // SAFETY: `copy_strided_src` writes every element of the fresh buffer before it is read.
    let mut dst = unsafe { storage.alloc(layout.shape(), storage.dtype())? };
    storage.copy_strided_src(&mut dst, 0, layout)?;
    Ok(dst)
}

/// A tensor without a graph that holds a copy of a custom op's argument.
pub fn tensor<S: Backend>(storage: &S, layout: &Layout) -> Result<Tensor> {
    let copy = contiguous_copy(storage, layout)?;
    Ok(Tensor::from_storage(
        copy.into_storage(),
        layout.shape().clone(),
        BackpropOp::none(),
        false,
    ))
}

/// The contents of `t` as a custom op's output storage (a contiguous copy).
pub fn output<S: Backend>(t: &Tensor) -> Result<(S, Shape)> {
    let (storage, layout) = t.storage_and_layout();
    let Some(s) = S::of(&storage) else {
        candle_core::bail!("portable op: the result is on another device than the arguments");
    };
    Ok((contiguous_copy(s, layout)?, layout.shape().clone()))
}

/// Writes `value` into an in-place op's destination `dst`, seen through the contiguous `layout`.
pub fn assign<S: Backend>(dst: &mut S, layout: &Layout, value: &Tensor) -> Result<()> {
    if !layout.is_contiguous() || layout.shape() != value.shape() {
        candle_core::bail!("portable op: the destination is not contiguous or has another shape");
    }
    let (storage, src_layout) = value.storage_and_layout();
    let Some(s) = S::of(&storage) else {
        candle_core::bail!("portable op: the result is on another device than the destination");
    };
    s.copy_strided_src(dst, layout.start_offset(), src_layout)
}

/// Reads an op-held tensor (one that is not among the op's arguments) as this backend's storage
/// and calls `f` with it.
pub fn with_storage<S: Backend, T>(
    t: &Tensor,
    f: impl FnOnce(&S, &Layout) -> Result<T>,
) -> Result<T> {
    let (storage, layout) = t.storage_and_layout();
    let Some(s) = S::of(&storage) else {
        candle_core::bail!("op: a held tensor is on another device than the arguments");
    };
    f(s, layout)
}
