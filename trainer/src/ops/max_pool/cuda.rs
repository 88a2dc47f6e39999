//! The stem max-pool's CUDA kernels (`cuda.cu`, compiled to PTX by build.rs): one launch forward
//! and one backward, where the tensor-op reference takes some twenty nodes' worth of launches.
//! f32, bf16 and f16; `None` where no kernel applies (another dtype, mixed dtypes, a strided
//! argument, more than 2^32 elements), and the op then runs its reference.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{CudaStorage, Layout, Result, Shape};

use super::reference::out;
use crate::ops::cuda_storage::{by_dtype, elementwise, launch, view, Elem};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/max_pool.ptx"));
const MODULE: &str = "maskdeep-max-pool";

/// `(planes, h, w)` of a `[n, c, h, w]` argument the kernels take, with the other arguments.
fn planes(args: &[(&CudaStorage, &Layout)]) -> Option<(usize, usize, usize)> {
    let (s0, l0) = args[0];
    let same = args
        .iter()
        .all(|(s, l)| s.dtype() == s0.dtype() && l.is_contiguous());
    match l0.shape().dims() {
        &[n, c, h, w] if same && n * c * h * w > 0 && n * c * h * w < u32::MAX as usize => {
            Some((n * c, h, w))
        }
        _ => None,
    }
}

/// The pool of `x [n, c, h, w]`.
pub fn forward(xs: &CudaStorage, xl: &Layout) -> Result<Option<(CudaStorage, Shape)>> {
    match planes(&[(xs, xl)]) {
        Some(dims) => by_dtype!(xs.dtype(), forward_as(xs, xl, dims)),
        None => Ok(None),
    }
}

fn forward_as<T: Elem>(
    xs: &CudaStorage,
    xl: &Layout,
    (count, h, w): (usize, usize, usize),
) -> Result<(CudaStorage, Shape)> {
    let dev = &xs.device;
    let x = view::<T>(xs, xl)?;
    let (ho, wo) = (out(h), out(w));
    // SAFETY: the kernel writes every element.
    let mut y = unsafe { dev.alloc::<T>(count * ho * wo)? };
    let (p, h32, w32) = (count as u32, h as u32, w as u32);
    launch!(
        (dev, MODULE, PTX),
        format!("max_pool_forward_{}", T::SUFFIX),
        elementwise(count * ho * wo),
        [&x, &mut y, &p, &h32, &w32]
    );
    let dims = xl.shape().dims();
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        Shape::from((dims[0], dims[1], ho, wo)),
    ))
}

/// The gradient of `x` for the output gradient `dy`.
pub fn backward(
    (xs, xl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
) -> Result<Option<(CudaStorage, Shape)>> {
    let Some((count, h, w)) = planes(&[(xs, xl), (gs, gl)]) else {
        return Ok(None);
    };
    if gl.shape().elem_count() != count * out(h) * out(w) {
        candle_core::bail!("max-pool backward (cuda): the gradient does not fit the input");
    }
    by_dtype!(xs.dtype(), backward_as((xs, xl), (gs, gl), (count, h, w)))
}

fn backward_as<T: Elem>(
    (xs, xl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    (count, h, w): (usize, usize, usize),
) -> Result<(CudaStorage, Shape)> {
    let dev = &xs.device;
    let (x, dy) = (view::<T>(xs, xl)?, view::<T>(gs, gl)?);
    // SAFETY: the kernel writes every element.
    let mut dx = unsafe { dev.alloc::<T>(count * h * w)? };
    let (p, h32, w32) = (count as u32, h as u32, w as u32);
    launch!(
        (dev, MODULE, PTX),
        format!("max_pool_backward_{}", T::SUFFIX),
        elementwise(count * h * w),
        [&x, &dy, &mut dx, &p, &h32, &w32]
    );
    Ok((
        CudaStorage::wrap_cuda_slice(dx, dev.clone()),
        xl.shape().clone(),
    ))
}
