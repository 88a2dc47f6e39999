//! The stem's max-pool on the CPU (f32), plane by plane on the thread pool: the forward takes
//! separable row then column maxima, the backward sends each output's gradient to the first
//! maximum of its window (PyTorch's rule). The forward's loops are compiled for every [`Isa`].

use candle_core::{CpuStorage, Layout, Result, Shape};
use rayon::prelude::*;
use shared::cpu::Isa;

use super::reference::out;
use crate::ops::cpu_storage::{f32_slice, zeros};

const NAME: &str = "max-pool-3x3-s2";
const BACKWARD_NAME: &str = "max-pool-3x3-s2-backward";

/// `x [n, c, h, w] -> y [n, c, ho, wo]`.
pub fn forward(isa: Isa, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let (count, h, w) = planes(l, NAME)?;
    let x = f32_slice(s, l, NAME)?;
    let (ho, wo) = (out(h), out(w));
    let mut y = zeros(count * ho * wo);
    // Separable: the max over each row's column windows, then over three such rows.
    y.par_chunks_mut(ho * wo)
        .zip(x.par_chunks(h * w))
        .for_each_init(Vec::new, |rows, (dst, plane)| {
            pool_plane(isa, dst, plane, rows, h, w)
        });
    let dims = l.shape().dims();
    Ok((CpuStorage::F32(y), Shape::from((dims[0], dims[1], ho, wo))))
}

/// `(x, dy) -> dx`: each output's gradient added at its window's first maximum.
pub fn backward(
    xs: &CpuStorage,
    xl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (count, h, w) = planes(xl, BACKWARD_NAME)?;
    let x = f32_slice(xs, xl, BACKWARD_NAME)?;
    let dy = f32_slice(gs, gl, BACKWARD_NAME)?;
    let (ho, wo) = (out(h), out(w));
    if dy.len() != count * ho * wo {
        candle_core::bail!("{}: the gradient does not fit the input", BACKWARD_NAME);
    }
    let mut dx = zeros(x.len());
    dx.par_chunks_mut(h * w)
        .zip(x.par_chunks(h * w).zip(dy.par_chunks(ho * wo)))
        .for_each(|(dst, (plane, g))| {
            for (k, &g) in g.iter().enumerate() {
                dst[argmax(plane, (h, w), (k / wo, k % wo))] += g;
            }
        });
    Ok((CpuStorage::F32(dx), xl.shape().clone()))
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
    let mut top = plane[best];
    for r in rows {
        for c in cols.clone() {
            // Selects rather than branches: which value wins depends on the data, and a branch
            // on it is mispredicted about as often as not.
            let (at, v) = (r * w + c, plane[r * w + c]);
            let better = v > top;
            best = if better { at } else { best };
            top = if better { v } else { top };
        }
    }
    best
}

shared::multiversion! {
    /// One `h x w` plane's 3x3 stride-2 maxima into `dst` (`ho x wo`), with `rows` as scratch.
    fn pool_plane(dst: &mut [f32], plane: &[f32], rows: &mut Vec<f32>, h: usize, w: usize) {
        let wo = out(w);
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
    }
}
