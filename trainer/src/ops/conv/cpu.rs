//! The convolution's CPU kernels (f32), image by image on the thread pool: the image's patches
//! are gathered into a per-thread buffer laid out `[c_in*k*k, ho*wo]` (im2col), and one gemm gives
//! the output planes in NCHW order. The backward gathers the patches again and runs two gemms per
//! image: `dW += dY @ patches^T` and `dPatches = W^T @ dY`, the latter scattered back onto the
//! input (col2im). Outputs narrower than 16 pixels gather and scatter through a tap table, and
//! small images are batched into groups so that each gemm stays wide.

use candle_core::{CpuStorage, Layout, Result, Shape};
use gemm::Parallelism;
use rayon::prelude::*;

use super::Geometry;
use crate::ops::cpu_storage::f32_slice;

const NAME: &str = "conv2d";
const BACKWARD_NAME: &str = "conv2d-backward";

/// `(x [n, c_in, h, w], weight [c_out, c_in, k, k]) -> y [n, c_out, ho, wo]`.
pub fn forward(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    g: Geometry,
) -> Result<(CpuStorage, Shape)> {
    let d = Dims::new(xl, wl, g)?;
    let x = f32_slice(xs, xl, NAME)?;
    let weight = f32_slice(ws, wl, NAME)?;
    let (kk, hw, chw) = (d.kk(), d.hw(), d.c * d.h * d.w);
    let (group, taps) = (d.group(), d.taps());
    let mut out = vec![0f32; d.n * d.c_out * hw];
    // Per task: the group's patch matrix [kk, ld] and, for groups of several images, its
    // output [c_out, ld] before it is scattered into NCHW planes.
    out.par_chunks_mut(group * d.c_out * hw)
        .zip(x.par_chunks(group * chw))
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(cols, staged), (y, images)| {
                let ld = images.len() / chw * hw;
                let single = ld == hw;
                let patches = d.patches(images, cols, &taps);
                let dst: &mut [f32] = if single {
                    y
                } else {
                    staged.resize(d.c_out * ld, 0.0);
                    staged
                };
                // dst [c_out, ld] = weight [c_out, kk] @ patches [kk, ld].
                matmul(
                    (d.c_out, ld, kk),
                    View {
                        data: dst,
                        rs: ld,
                        cs: 1,
                    },
                    View {
                        data: weight,
                        rs: kk,
                        cs: 1,
                    },
                    View {
                        data: patches,
                        rs: ld,
                        cs: 1,
                    },
                    false,
                );
                if !single {
                    for (j, plane) in y.chunks_exact_mut(hw).enumerate() {
                        let (img, co) = (j / d.c_out, j % d.c_out);
                        plane.copy_from_slice(&staged[co * ld + img * hw..][..hw]);
                    }
                }
            },
        );
    Ok((
        CpuStorage::F32(out),
        Shape::from((d.n, d.c_out, d.ho, d.wo)),
    ))
}

/// `(x, weight, dy) -> [dx (empty unless need_dx), dweight]`, flat.
pub fn backward(
    (xs, xl): (&CpuStorage, &Layout),
    (ws, wl): (&CpuStorage, &Layout),
    (gs, gl): (&CpuStorage, &Layout),
    g: Geometry,
    need_dx: bool,
) -> Result<(CpuStorage, Shape)> {
    let d = Dims::new(xl, wl, g)?;
    let x = f32_slice(xs, xl, BACKWARD_NAME)?;
    let weight = f32_slice(ws, wl, BACKWARD_NAME)?;
    let dy = f32_slice(gs, gl, BACKWARD_NAME)?;
    let (kk, hw, chw, c_out) = (d.kk(), d.hw(), d.c * d.h * d.w, d.c_out);
    let (group, taps) = (d.group(), d.taps());
    // The weight gradient is appended after the input gradient: room for both up front.
    let mut dx = Vec::with_capacity(d.n * chw + c_out * kk);
    dx.resize(if need_dx { d.n * chw } else { 0 }, 0f32);
    let dx_groups: Vec<Option<&mut [f32]>> = if need_dx {
        dx.chunks_mut(group * chw).map(Some).collect()
    } else {
        (0..d.n.div_ceil(group)).map(|_| None).collect()
    };
    // A fixed split of the groups over the pool's threads, each task accumulating its own
    // weight gradient, summed in task order: the result does not depend on scheduling.
    let per_task = dx_groups
        .len()
        .div_ceil(rayon::current_num_threads().max(1));
    let partials: Vec<Vec<f32>> = dx_groups
        .into_par_iter()
        .enumerate()
        .chunks(per_task)
        .map(|tasks| {
            let (mut cols, mut staged, mut dcols) = (Vec::new(), Vec::new(), Vec::new());
            let mut dw = vec![0f32; c_out * kk];
            for (i, dx_group) in tasks {
                let first = i * group;
                let count = group.min(d.n - first);
                let (ld, single) = (count * hw, count == 1);
                let images = &x[first * chw..(first + count) * chw];
                let dy_group = &dy[first * c_out * hw..(first + count) * c_out * hw];
                let patches = d.patches(images, &mut cols, &taps);
                // dY as [c_out, ld]: the group's planes side by side.
                let dy_mat: &[f32] = if single {
                    dy_group
                } else {
                    staged.resize(c_out * ld, 0.0);
                    for (j, plane) in dy_group.chunks_exact(hw).enumerate() {
                        let (img, co) = (j / c_out, j % c_out);
                        staged[co * ld + img * hw..][..hw].copy_from_slice(plane);
                    }
                    &staged
                };
                // dW [c_out, kk] += dY [c_out, ld] @ patches^T [ld, kk].
                matmul(
                    (c_out, kk, ld),
                    View {
                        data: &mut dw[..],
                        rs: kk,
                        cs: 1,
                    },
                    View {
                        data: dy_mat,
                        rs: ld,
                        cs: 1,
                    },
                    View {
                        data: patches,
                        rs: 1,
                        cs: ld,
                    },
                    true,
                );
                let Some(dx_group) = dx_group else {
                    continue;
                };
                // dPatches [kk, ld] = W^T [kk, c_out] @ dY [c_out, ld].
                let weight_t_dy = |dst: &mut [f32]| {
                    matmul(
                        (kk, ld, c_out),
                        View {
                            data: dst,
                            rs: ld,
                            cs: 1,
                        },
                        View {
                            data: weight,
                            rs: 1,
                            cs: kk,
                        },
                        View {
                            data: dy_mat,
                            rs: ld,
                            cs: 1,
                        },
                        false,
                    )
                };
                if single && d.pointwise() {
                    // A pointwise kernel's patch gradient is the input gradient itself.
                    weight_t_dy(dx_group);
                } else {
                    dcols.resize(kk * ld, 0.0);
                    weight_t_dy(&mut dcols);
                    for (j, dx_img) in dx_group.chunks_exact_mut(chw).enumerate() {
                        d.col2im(&dcols, ld, j * hw, dx_img, &taps);
                    }
                }
            }
            dw
        })
        .collect();
    let mut partials = partials.into_iter();
    let mut dw = partials.next().unwrap_or_else(|| vec![0f32; c_out * kk]);
    for part in partials {
        dw.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
    }
    dx.extend_from_slice(&dw);
    let len = dx.len();
    Ok((CpuStorage::F32(dx), Shape::from(len)))
}

/// Sizes of one convolution.
#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    c_out: usize,
    ho: usize,
    wo: usize,
    g: Geometry,
}

impl Dims {
    fn new(x: &Layout, weight: &Layout, g: Geometry) -> Result<Self> {
        let (n, c, h, w) = x.shape().dims4()?;
        let (c_out, c_w, kh, kw) = weight.shape().dims4()?;
        if c_w != c || kh != g.k || kw != g.k {
            candle_core::bail!(
                "conv: weight {:?} does not fit input {:?} with kernel {}",
                weight.shape(),
                x.shape(),
                g.k
            );
        }
        Ok(Dims {
            n,
            c,
            h,
            w,
            c_out,
            ho: g.out(h),
            wo: g.out(w),
            g,
        })
    }

    /// Rows of an image's patch matrix.
    fn kk(&self) -> usize {
        self.c * self.g.k * self.g.k
    }

    /// Output pixels per plane (columns of the patch matrix).
    fn hw(&self) -> usize {
        self.ho * self.wo
    }

    /// A 1x1, stride-1, unpadded kernel: an image is its own patch matrix.
    fn pointwise(&self) -> bool {
        self.g.k == 1 && self.g.stride == 1 && self.g.padding == 0
    }

    /// The input row that kernel row `ki` reads for output row `oh`, if inside the image.
    fn input_row(&self, oh: usize, ki: usize) -> Option<usize> {
        (oh * self.g.stride + ki)
            .checked_sub(self.g.padding)
            .filter(|&r| r < self.h)
    }

    /// For kernel column `kj`: the output columns `lo..hi` whose input column
    /// `ow * stride + kj - padding` is inside the image, and that input column for `lo`.
    fn columns(&self, kj: usize) -> (usize, usize, usize) {
        let Geometry {
            stride, padding, ..
        } = self.g;
        let lo = padding.saturating_sub(kj).div_ceil(stride);
        let hi = ((self.w + padding).saturating_sub(kj))
            .div_ceil(stride)
            .min(self.wo)
            .max(lo);
        (lo, hi, (lo * stride + kj).saturating_sub(padding))
    }

    /// Stride 1 with output planes the size of the input: each patch row is one shifted block
    /// of an input plane, up to the columns that wrap around the plane's edges.
    fn same_size(&self) -> bool {
        self.g.stride == 1 && self.ho == self.h && self.wo == self.w
    }

    /// Output planes narrower than this gather and scatter through a tap table (per-row copies
    /// would be mostly loop overhead).
    const NARROW: usize = 16;

    /// For narrow outputs, the tap table `[k*k, ho*wo]`: the input index (within a plane) that
    /// each kernel tap reads for each output pixel, or `u32::MAX` (outside any plane) where it
    /// reads padding. Empty for wider outputs.
    fn taps(&self) -> Vec<u32> {
        if self.wo >= Self::NARROW {
            return Vec::new();
        }
        let Geometry { k, stride, padding } = self.g;
        let inside =
            |o: usize, t: usize, n: usize| (o * stride + t).checked_sub(padding).filter(|&i| i < n);
        let mut taps = Vec::with_capacity(k * k * self.hw());
        for (ki, kj) in (0..k * k).map(|t| (t / k, t % k)) {
            for (oh, ow) in (0..self.hw()).map(|o| (o / self.wo, o % self.wo)) {
                taps.push(match (inside(oh, ki, self.h), inside(ow, kj, self.w)) {
                    (Some(ih), Some(iw)) => (ih * self.w + iw) as u32,
                    _ => u32::MAX,
                });
            }
        }
        taps
    }

    /// Images per gemm: enough that a gemm has a few hundred columns when the planes are small,
    /// but no fewer groups than pool threads.
    fn group(&self) -> usize {
        const COLUMNS: usize = 512;
        let threads = rayon::current_num_threads().max(1);
        COLUMNS
            .div_ceil(self.hw())
            .min(self.n.div_ceil(threads))
            .max(1)
    }

    /// Gathers image `img` (`[c, h, w]`) into columns `at..at + ho*wo` of `cols` (`[kk, ld]`),
    /// zeros where the kernel overhangs the padding. Every entry of those columns is written.
    fn im2col(&self, img: &[f32], cols: &mut [f32], ld: usize, at: usize, taps: &[u32]) {
        let (k, s, p) = (self.g.k, self.g.stride, self.g.padding);
        let (h, w, wo, hw) = (self.h, self.w, self.wo, self.hw());
        for (r, row) in cols.chunks_exact_mut(ld).enumerate() {
            let row = &mut row[at..at + hw];
            let (ci, ki, kj) = (r / (k * k), r / k % k, r % k);
            let plane = &img[ci * h * w..(ci + 1) * h * w];
            if !taps.is_empty() {
                let taps = &taps[(r % (k * k)) * hw..][..hw];
                for (d, &t) in row.iter_mut().zip(taps) {
                    *d = plane.get(t as usize).copied().unwrap_or(0.0);
                }
                continue;
            }
            let (lo, hi, first) = self.columns(kj);
            if self.same_size() {
                // row[i] = plane[i + shift] on the valid output rows, then the wrapped columns
                // and the rows above and below the image are zeroed.
                let shift = (ki * w + kj) as isize - (p * w + p) as isize;
                let bottom = (h + p).saturating_sub(ki).min(h) * w;
                let top = (p.saturating_sub(ki) * w).min(bottom);
                let start = top.max((-shift).max(0) as usize).min(bottom);
                let end = bottom.min((hw as isize - shift).max(0) as usize).max(start);
                row[..start].fill(0.0);
                row[end..].fill(0.0);
                if start < end {
                    let from = (start as isize + shift) as usize;
                    row[start..end].copy_from_slice(&plane[from..from + end - start]);
                }
                for line in row[top..bottom].chunks_exact_mut(w) {
                    line[..lo].fill(0.0);
                    line[hi..].fill(0.0);
                }
                continue;
            }
            for (oh, dst) in row.chunks_exact_mut(wo).enumerate() {
                let Some(ih) = self.input_row(oh, ki) else {
                    dst.fill(0.0);
                    continue;
                };
                let src = &plane[ih * w..(ih + 1) * w];
                dst[..lo].fill(0.0);
                dst[hi..].fill(0.0);
                for (d, &v) in dst[lo..hi].iter_mut().zip(src[first..].iter().step_by(s)) {
                    *d = v;
                }
            }
        }
    }

    /// The patch matrix `[kk, count*ho*wo]` of `count` consecutive images: built in `cols`, or
    /// the image itself for a single image under a pointwise kernel.
    fn patches<'a>(&self, images: &'a [f32], cols: &'a mut Vec<f32>, taps: &[u32]) -> &'a [f32] {
        let chw = self.c * self.h * self.w;
        let ld = images.len() / chw * self.hw();
        if ld == self.hw() && self.pointwise() {
            return images;
        }
        cols.resize(self.kk() * ld, 0.0);
        for (j, img) in images.chunks_exact(chw).enumerate() {
            self.im2col(img, cols, ld, j * self.hw(), taps);
        }
        cols
    }

    /// The adjoint of [`Dims::im2col`]: adds columns `at..at + ho*wo` of `cols` (`[kk, ld]`) onto
    /// image `img`.
    fn col2im(&self, cols: &[f32], ld: usize, at: usize, img: &mut [f32], taps: &[u32]) {
        let (k, s) = (self.g.k, self.g.stride);
        let (h, w, wo, hw) = (self.h, self.w, self.wo, self.hw());
        for (r, row) in cols.chunks_exact(ld).enumerate() {
            let row = &row[at..at + hw];
            let (ci, ki, kj) = (r / (k * k), r / k % k, r % k);
            let plane = &mut img[ci * h * w..(ci + 1) * h * w];
            if !taps.is_empty() {
                let taps = &taps[(r % (k * k)) * hw..][..hw];
                for (&v, &t) in row.iter().zip(taps) {
                    if let Some(d) = plane.get_mut(t as usize) {
                        *d += v;
                    }
                }
                continue;
            }
            let (lo, hi, first) = self.columns(kj);
            for (oh, src) in row.chunks_exact(wo).enumerate() {
                let Some(ih) = self.input_row(oh, ki) else {
                    continue;
                };
                let dst = &mut plane[ih * w..(ih + 1) * w];
                if s == 1 {
                    for (d, &v) in dst[first..].iter_mut().zip(&src[lo..hi]) {
                        *d += v;
                    }
                } else {
                    for (d, &v) in dst[first..].iter_mut().step_by(s).zip(&src[lo..hi]) {
                        *d += v;
                    }
                }
            }
        }
    }
}

/// A matrix view for [`matmul`]: its elements, row stride and column stride.
struct View<S> {
    data: S,
    rs: usize,
    cs: usize,
}

impl<S: AsRef<[f32]>> View<S> {
    /// Whether every element of a `rows x cols` matrix lies inside `data`.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.as_ref().len()
    }
}

/// `dst[m, n] (+)= lhs[m, k] @ rhs[k, n]` on the calling thread; `accumulate` adds to `dst`.
/// Panics if a view reaches outside its slice.
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: View<&mut [f32]>,
    lhs: View<&[f32]>,
    rhs: View<&[f32]>,
    accumulate: bool,
) {
    assert!(
        dst.fits(m, n) && lhs.fits(m, k) && rhs.fits(k, n),
        "matmul: a {m}x{k} @ {k}x{n} view reaches outside its data"
    );
    // SAFETY: every element the three views address lies inside its slice (checked above), and
    // `dst` is borrowed mutably, so it overlaps neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            dst.cs as isize,
            dst.rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}
