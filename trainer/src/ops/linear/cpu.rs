//! The linear layer's CPU forward in f32: one gemm over all of Candle's threads (the same call,
//! strides and thread count as Candle's matmul, so the products round the same), then the bias.

use candle_core::{CpuStorage, Layout, Result, Shape};
use gemm::Parallelism;

use crate::ops::cpu_storage::{f32_slice, zeros};

/// `x [n, in] @ weight [out, in]^T + bias [out]`, contiguous f32 arguments.
pub fn forward(
    (xs, xl): (&CpuStorage, &Layout),
    (ws, wl): (&CpuStorage, &Layout),
    (bs, bl): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (x, w, b) = (
        f32_slice(xs, xl, "linear")?,
        f32_slice(ws, wl, "linear")?,
        f32_slice(bs, bl, "linear")?,
    );
    let (n, k) = xl.shape().dims2()?;
    let m = b.len();
    if x.len() != n * k || w.len() != m * k {
        candle_core::bail!("linear: the arguments' sizes do not fit together");
    }
    let mut y = zeros(n * m);
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    if n > 0 && m > 0 && k > 0 {
        // SAFETY: `y` holds n x m elements (row stride m), `x` n x k (row stride k) and the
        // transposed `w` k x m (column stride k); the sizes were checked above, and `y` is a fresh
        // buffer that overlaps neither input.
        unsafe {
            gemm::gemm(
                n,
                m,
                k,
                y.as_mut_ptr(),
                1,
                m as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        }
    }
    for row in y.chunks_exact_mut(m.max(1)) {
        for (v, bias) in row.iter_mut().zip(b) {
            *v += bias;
        }
    }
    Ok((CpuStorage::F32(y), Shape::from((n, m))))
}
