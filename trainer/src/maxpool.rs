//! torchvision's stem max-pool: kernel 3, stride 2, padding 1, over `[n, c, h, w]`.
//!
//! On CPU (f32) one autograd node, plane by plane on the thread pool: the forward takes separable
//! row then column maxima, the backward sends each output's gradient to the first maximum of its
//! window (PyTorch's rule). Elsewhere it is built from shifted strided views and `maximum`
//! (Candle's pools have no backward for kernel != stride), some twenty graph nodes over the
//! network's largest activation.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_storage::f32_slice;

/// The pool of `x`, whose values must be non-negative (it follows a ReLU): the view-based path
/// pads with zeros, which then gives the same maxima as -inf padding.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(MaxPool)
    } else {
        max_pool_3x3_s2_views(x)
    }
}

/// The pool built from views (the path off the CPU; the CPU kernel's test reference).
pub fn max_pool_3x3_s2_views(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (ho, wo) = (out(h), out(w));
    // Padded so that every shift 0..3 can take 2*out rows: 1 before, the rest after.
    let x = x
        .pad_with_zeros(2, 1, 2 * ho + 1 - h)?
        .pad_with_zeros(3, 1, 2 * wo + 1 - w)?;
    let rows = max_of_shifts(&x, 2, ho)?;
    max_of_shifts(&rows, 3, wo)
}

/// Max over shifts 0, 1, 2 along `dim` of every second element, `out` elements each.
fn max_of_shifts(x: &Tensor, dim: usize, out: usize) -> Result<Tensor> {
    let mut best: Option<Tensor> = None;
    for shift in 0..3 {
        let s = x.narrow(dim, shift, 2 * out)?;
        let mut dims = s.dims().to_vec();
        dims[dim] = out;
        dims.insert(dim + 1, 2);
        let s = s.reshape(dims)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)?;
        best = Some(match best {
            None => s,
            Some(b) => b.maximum(&s)?,
        });
    }
    Ok(best.expect("three shifts"))
}

/// Output size along a dimension of `n`.
fn out(n: usize) -> usize {
    (n - 1) / 2 + 1
}

/// The plane geometry of a `[n, c, h, w]` layout: (planes, h, w).
fn planes(layout: &Layout, op: &str) -> Result<(usize, usize, usize)> {
    match layout.shape().dims() {
        &[n, c, h, w] if n * c * h * w > 0 => Ok((n * c, h, w)),
        dims => candle_core::bail!("{op}: needs a non-empty [n, c, h, w] input, got {dims:?}"),
    }
}

/// For output `(i, j)` of an `h x w` plane: the flat index of the window's first maximum.
fn argmax(plane: &[f32], (h, w): (usize, usize), (i, j): (usize, usize)) -> usize {
    let rows = (2 * i).saturating_sub(1)..(2 * i + 2).min(h);
    let cols = (2 * j).saturating_sub(1)..(2 * j + 2).min(w);
    let mut best = rows.start * w + cols.start;
    for r in rows {
        for c in cols.clone() {
            if plane[r * w + c] > plane[best] {
                best = r * w + c;
            }
        }
    }
    best
}

struct MaxPool;

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (count, h, w) = planes(l, self.name())?;
        let x = f32_slice(s, l, self.name())?;
        let (ho, wo) = (out(h), out(w));
        let mut y = vec![0f32; count * ho * wo];
        // Separable: the max over each row's column windows, then over three such rows.
        y.par_chunks_mut(ho * wo)
            .zip(x.par_chunks(h * w))
            .for_each_init(Vec::new, |rows, (dst, plane)| {
                rows.clear();
                for line in plane.chunks_exact(w) {
                    rows.extend((0..wo).map(|j| {
                        let right = (2 * j + 1).min(w - 1);
                        let m = line[2 * j].max(line[right]);
                        if j > 0 {
                            m.max(line[2 * j - 1])
                        } else {
                            m
                        }
                    }));
                }
                for (i, out) in dst.chunks_exact_mut(wo).enumerate() {
                    let at = |r: usize| &rows[r * wo..(r + 1) * wo];
                    let (mid, below) = (at(2 * i), at((2 * i + 1).min(h - 1)));
                    for (j, o) in out.iter_mut().enumerate() {
                        *o = mid[j].max(below[j]);
                    }
                    if i > 0 {
                        for (o, &v) in out.iter_mut().zip(at(2 * i - 1)) {
                            *o = o.max(v);
                        }
                    }
                }
            });
        let dims = l.shape().dims();
        Ok((CpuStorage::F32(y), Shape::from((dims[0], dims[1], ho, wo))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&grad.contiguous()?, &MaxPoolBackward)?,
        ))
    }
}

/// `(x, dy) -> dx`: each output's gradient added at its window's first maximum.
struct MaxPoolBackward;

impl CustomOp2 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (count, h, w) = planes(xl, self.name())?;
        let x = f32_slice(xs, xl, self.name())?;
        let dy = f32_slice(gs, gl, self.name())?;
        let (ho, wo) = (out(h), out(w));
        if dy.len() != count * ho * wo {
            candle_core::bail!("{}: the gradient does not fit the input", self.name());
        }
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w).zip(dy.par_chunks(ho * wo)))
            .for_each(|(dst, (plane, g))| {
                for (k, &g) in g.iter().enumerate() {
                    dst[argmax(plane, (h, w), (k / wo, k % wo))] += g;
                }
            });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}
