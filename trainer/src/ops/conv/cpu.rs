//! The convolution's CPU kernels (f32), image by image on the thread pool: the image's patches
//! are gathered into a per-thread buffer laid out `[c_in*k*k, ho*wo]` (im2col), and one gemm gives
//! the output planes in NCHW order. The backward gathers the patches again and runs two gemms per
//! image: `dW += dY @ patches^T` and `dPatches = W^T @ dY`, the latter scattered back onto the
//! input (col2im). For the weight gradient of layers with few output channels the patches are
//! first transposed to `[ho*wo, c_in*k*k]`, the layout in which gemm reads them in place: its
//! own packing of the other layout costs more than the product itself when `c_out` is small.
//! Layers with 3x3 (or wider) kernels and fewer than 512 output channels instead gather their
//! patches a pixel per row (im2row) for narrow outputs (under 16 pixels), for every backward pass
//! and for strided forwards: the image is copied zero-padded and channels-last, each kernel row's
//! taps one contiguous run of `k * c_in` values, with the weight's entries reordered to match;
//! the weight gradient then reads them in place and the input gradient scatters whole runs.
//! Narrow outputs of layers with 512 or more output channels, and of 1x1 kernels, gather and
//! scatter through a tap table on zero-padded planes. Small images are batched into groups so
//! that each gemm stays wide. The gathers and scatters are compiled for every [`Isa`]; the
//! buffers they fill are kept per thread from call to call. On AVX2 and AVX-512, kernels wider
//! than 1x1 with at least 16 input channels and output channels in multiples of 16 skip all of
//! this for their forward, and stride-1 ones for their input gradient too: direct convolutions
//! (`direct`) keep their sums in registers and read the input in place.

use std::borrow::Cow;
use std::cell::Cell;

use candle_core::{CpuStorage, Layout, Result, Shape};
use gemm::Parallelism;
use rayon::prelude::*;
use shared::cpu::Isa;

use super::Geometry;
use crate::ops::cpu_storage::{f32_slice, zeros};

mod direct;

const NAME: &str = "conv2d";
const BACKWARD_NAME: &str = "conv2d-backward";

/// `(x [n, c_in, h, w], weight [c_out, c_in, k, k]) -> y [n, c_out, ho, wo]`.
pub fn forward(
    isa: Isa,
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    g: Geometry,
) -> Result<(CpuStorage, Shape)> {
    let d = Dims::new(xl, wl, g)?;
    let x = f32_slice(xs, xl, NAME)?;
    let weight = f32_slice(ws, wl, NAME)?;
    let shape = Shape::from((d.n, d.c_out, d.ho, d.wo));
    if direct::applies(isa, &d) {
        return Ok((CpuStorage::F32(direct::forward(isa, &d, x, weight)), shape));
    }
    let (kk, hw, chw) = (d.kk(), d.hw(), d.c * d.h * d.w);
    let order = d.order(Pass::Forward);
    let (group, taps) = (d.group(), d.taps(order));
    let weight = &*order.weight_to(isa, &d, weight);
    let mut out = zeros(d.n * d.c_out * hw);
    // Per task: the group's patch matrix [kk, ld] and, for groups of several images, its
    // output [c_out, ld] before it is scattered into NCHW planes.
    out.par_chunks_mut(group * d.c_out * hw)
        .zip(x.par_chunks(group * chw))
        .for_each(|(y, images)| {
            with_scratch(|scratch| {
                let ld = images.len() / chw * hw;
                let single = ld == hw;
                let Scratch {
                    cols,
                    staged,
                    padded,
                    ..
                } = scratch;
                let patches = d.patches(isa, order, images, cols, padded, &taps);
                let dst: &mut [f32] = if single {
                    y
                } else {
                    grown(staged, d.c_out * ld)
                };
                match order {
                    // dst^T [ld, c_out] = P [ld, kk] @ weight^T [kk, c_out], all three
                    // column-major: gemm reads the patches in place instead of packing them.
                    PatchOrder::Cols => matmul(
                        (ld, d.c_out, kk),
                        View {
                            data: dst,
                            rs: 1,
                            cs: ld,
                        },
                        View {
                            data: patches,
                            rs: 1,
                            cs: ld,
                        },
                        View {
                            data: weight,
                            rs: 1,
                            cs: kk,
                        },
                        false,
                    ),
                    // dst [c_out, ld] = weight [c_out, kk] @ P^T [kk, ld].
                    PatchOrder::Rows => matmul(
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
                            rs: 1,
                            cs: kk,
                        },
                        false,
                    ),
                }
                if !single {
                    for (j, plane) in y.chunks_exact_mut(hw).enumerate() {
                        let (img, co) = (j / d.c_out, j % d.c_out);
                        plane.copy_from_slice(&staged[co * ld + img * hw..][..hw]);
                    }
                }
            })
        });
    Ok((CpuStorage::F32(out), shape))
}

/// `(x, weight, dy) -> [dx (empty unless need_dx), dweight]`, flat.
pub fn backward(
    isa: Isa,
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
    // The input gradient of a stride-1 layer is the convolution of dY with the weight flipped
    // and its channels swapped (the transposed layer).
    let direct_dx = d
        .transposed()
        .filter(|t| need_dx && direct::applies(isa, t));
    let weight_only = || {
        if direct::applies(isa, &d) {
            direct::weight_gradient(isa, &d, x, dy)
        } else {
            gradients(isa, &d, x, weight, dy, false)
        }
    };
    let out = match direct_dx {
        Some(t) => {
            let mut dx = direct::forward(isa, &t, dy, &d.flipped(weight));
            dx.extend_from_slice(&weight_only());
            dx
        }
        None if !need_dx => weight_only(),
        None => gradients(isa, &d, x, weight, dy, true),
    };
    let len = out.len();
    Ok((CpuStorage::F32(out), Shape::from(len)))
}

/// `[dx (empty unless need_dx), dweight]` of `d` through the patch matrices, flat.
fn gradients(isa: Isa, d: &Dims, x: &[f32], weight: &[f32], dy: &[f32], need_dx: bool) -> Vec<f32> {
    let (kk, hw, chw, c_out) = (d.kk(), d.hw(), d.c * d.h * d.w, d.c_out);
    let order = d.order(Pass::Backward);
    let (group, taps) = (d.group(), d.taps(order));
    let weight = &*order.weight_to(isa, d, weight);
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
            with_scratch(|scratch| {
                let Scratch {
                    cols,
                    staged,
                    dcols,
                    padded,
                    transposed,
                } = scratch;
                let mut dw = vec![0f32; c_out * kk];
                for (i, dx_group) in tasks {
                    let first = i * group;
                    let count = group.min(d.n - first);
                    let (ld, single) = (count * hw, count == 1);
                    let images = &x[first * chw..(first + count) * chw];
                    let dy_group = &dy[first * c_out * hw..(first + count) * c_out * hw];
                    let patches = d.patches(isa, order, images, cols, padded, &taps);
                    // dY as [c_out, ld]: the group's planes side by side.
                    let dy_mat: &[f32] = if single {
                        dy_group
                    } else {
                        let staged = grown(staged, c_out * ld);
                        for (j, plane) in dy_group.chunks_exact(hw).enumerate() {
                            let (img, co) = (j / c_out, j % c_out);
                            staged[co * ld + img * hw..][..hw].copy_from_slice(plane);
                        }
                        staged
                    };
                    // The patches as P^T [kk, ld] with kk contiguous, where gemm reads them in
                    // place: gathered so, or transposed when there are few output channels.
                    let entries_by_pixels = match order {
                        PatchOrder::Rows => Some(patches),
                        PatchOrder::Cols if c_out < TRANSPOSE_BELOW => {
                            let rows = grown(transposed, kk * ld);
                            transpose(isa, patches, kk, ld, rows);
                            Some(&*rows)
                        }
                        PatchOrder::Cols => None,
                    };
                    if let Some(rows) = entries_by_pixels {
                        // dW^T [kk, c_out] += P^T [kk, ld] @ dY^T [ld, c_out].
                        matmul(
                            (kk, c_out, ld),
                            View {
                                data: &mut dw[..],
                                rs: 1,
                                cs: kk,
                            },
                            View {
                                data: rows,
                                rs: 1,
                                cs: kk,
                            },
                            View {
                                data: dy_mat,
                                rs: 1,
                                cs: ld,
                            },
                            true,
                        );
                    } else {
                        // dW [c_out, kk] += dY [c_out, ld] @ P [ld, kk].
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
                    }
                    let Some(dx_group) = dx_group else {
                        continue;
                    };
                    // dP^T [kk, ld] = W^T [kk, c_out] @ dY [c_out, ld], laid out as the patches.
                    let weight_t_dy = |dst: &mut [f32]| {
                        matmul(
                            (kk, ld, c_out),
                            order.entries_by_pixels(dst, ld, kk),
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
                        let dcols = grown(dcols, kk * ld);
                        weight_t_dy(dcols);
                        for (j, dx_img) in dx_group.chunks_exact_mut(chw).enumerate() {
                            match order {
                                PatchOrder::Cols => {
                                    col2im(isa, d, dcols, ld, j * hw, dx_img, &taps, padded)
                                }
                                PatchOrder::Rows => row2im(isa, d, dcols, j * hw, dx_img, padded),
                            }
                        }
                    }
                }
                dw
            })
        })
        .collect();
    let mut partials = partials.into_iter();
    let mut dw = partials.next().unwrap_or_else(|| vec![0f32; c_out * kk]);
    for part in partials {
        dw.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
    }
    dx.extend_from_slice(&order.weight_from(isa, d, &dw));
    dx
}

/// Output channels from which the weight gradient reads the patches as they are gathered: with
/// this many, gemm's packing is cheap beside the product (measured with gemm's AVX-512 kernels;
/// `BENCHMARKS.md`, issue 23).
const TRANSPOSE_BELOW: usize = 512;

/// Output channels from which patches stay a channel per row (see [`Dims::order`]): with this
/// many, reordering the weight and gemm's packing cost more than gathering a pixel per row saves
/// (measured with gemm's AVX-512 kernels; `BENCHMARKS.md`, issue 23, session 18).
const ROWS_BELOW: usize = 512;

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

    /// For a stride-1 convolution, the one that maps its output gradient to its input gradient:
    /// channels swapped, padding `k - 1 - padding`, with the weight of [`Dims::flipped`].
    fn transposed(&self) -> Option<Dims> {
        let Geometry { k, stride, padding } = self.g;
        let padding = (k - 1).checked_sub(padding).filter(|_| stride == 1)?;
        Some(Dims {
            n: self.n,
            c: self.c_out,
            h: self.ho,
            w: self.wo,
            c_out: self.c,
            ho: self.h,
            wo: self.w,
            g: Geometry { k, stride, padding },
        })
    }

    /// The weight `[c_out, c, k, k]` as `[c, c_out, k, k]` with each kernel turned half a turn.
    fn flipped(&self, weight: &[f32]) -> Vec<f32> {
        let taps = self.g.k * self.g.k;
        let mut out = vec![0f32; weight.len()];
        out.par_chunks_mut(self.c_out * taps)
            .enumerate()
            .for_each(|(ci, filters)| {
                for (co, dst) in filters.chunks_exact_mut(taps).enumerate() {
                    let kernel = &weight[(co * self.c + ci) * taps..][..taps];
                    for (d, &v) in dst.iter_mut().rev().zip(kernel) {
                        *d = v;
                    }
                }
            });
        out
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
        self.inside(kj, self.w, self.wo)
    }

    /// For kernel row `ki`: the output rows `lo..hi` whose input row is inside the image, and
    /// that input row for `lo` (as [`Dims::columns`], along the other axis).
    fn rows(&self, ki: usize) -> (usize, usize, usize) {
        self.inside(ki, self.h, self.ho)
    }

    /// Along an axis of `input` pixels and `output` outputs: the outputs `lo..hi` whose input
    /// `o * stride + tap - padding` is inside the image, and that input for `lo`.
    fn inside(&self, tap: usize, input: usize, output: usize) -> (usize, usize, usize) {
        let Geometry {
            stride, padding, ..
        } = self.g;
        let lo = padding.saturating_sub(tap).div_ceil(stride);
        let hi = ((input + padding).saturating_sub(tap))
            .div_ceil(stride)
            .min(output)
            .max(lo);
        (lo, hi, (lo * stride + tap).saturating_sub(padding))
    }

    /// Stride 1 with output planes the size of the input: each patch row is one shifted block
    /// of an input plane, up to the columns that wrap around the plane's edges.
    fn same_size(&self) -> bool {
        self.g.stride == 1 && self.ho == self.h && self.wo == self.w
    }

    /// Output planes narrower than this gather their patches a pixel per row ([`im2row`]) or,
    /// in the channel-per-row order, through a tap table on zero-padded planes: runs along a
    /// plane's row would be a few values long.
    const NARROW: usize = 16;

    /// How `pass` lays out this convolution's patch matrices. Kernels wider than 1x1 with fewer
    /// than [`ROWS_BELOW`] output channels gather a pixel per row for narrow outputs, for every
    /// backward pass (the weight gradient then reads the patches in place) and for strided
    /// forwards; stride-1 forwards on wide planes copy whole shifted planes a channel per row
    /// instead, and a 1x1 kernel's runs would be only `c_in` long.
    fn order(&self, pass: Pass) -> PatchOrder {
        let rows = self.g.k > 1
            && self.c_out < ROWS_BELOW
            && (self.wo < Self::NARROW || pass == Pass::Backward || self.g.stride > 1);
        if rows {
            PatchOrder::Rows
        } else {
            PatchOrder::Cols
        }
    }

    /// Rows and columns of a plane padded on every side.
    fn padded_size(&self) -> (usize, usize) {
        let p = self.g.padding;
        (self.h + 2 * p, self.w + 2 * p)
    }

    /// For narrow outputs gathered a channel per row, the tap table `[k*k, ho*wo]`: the index
    /// within a padded plane (see [`Dims::pad`]) that each kernel tap reads for each output
    /// pixel. Empty otherwise.
    fn taps(&self, order: PatchOrder) -> Vec<u32> {
        if self.wo >= Self::NARROW || order == PatchOrder::Rows {
            return Vec::new();
        }
        let Geometry { k, stride, .. } = self.g;
        let (hp, wp) = self.padded_size();
        let mut taps = Vec::with_capacity(k * k * self.hw());
        for (ki, kj) in (0..k * k).map(|t| (t / k, t % k)) {
            for (oh, ow) in (0..self.hw()).map(|o| (o / self.wo, o % self.wo)) {
                taps.push(((oh * stride + ki) * wp + ow * stride + kj) as u32);
            }
        }
        // The gathers and scatters index without bounds checks: checked once here.
        assert!(
            taps.iter().all(|&t| (t as usize) < hp * wp),
            "conv: tap table outside the padded plane"
        );
        taps
    }

    /// Image `img` (`[c, h, w]`) with `padding` zeros around each plane, in `padded`.
    fn pad<'a>(&self, img: &[f32], padded: &'a mut Vec<f32>) -> &'a [f32] {
        let p = self.g.padding;
        let (hp, wp) = self.padded_size();
        let padded = grown(padded, self.c * hp * wp);
        for (dst, src) in padded
            .chunks_exact_mut(hp * wp)
            .zip(img.chunks_exact(self.h * self.w))
        {
            dst[..p * wp].fill(0.0);
            dst[(p + self.h) * wp..].fill(0.0);
            for (line, src) in dst[p * wp..(p + self.h) * wp]
                .chunks_exact_mut(wp)
                .zip(src.chunks_exact(self.w))
            {
                line[..p].fill(0.0);
                line[p..p + self.w].copy_from_slice(src);
                line[p + self.w..].fill(0.0);
            }
        }
        padded
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

    /// The patch matrix of `count` consecutive images, `count*ho*wo` pixels, in `order`: built
    /// in `cols`, or the image itself for a single image under a pointwise kernel.
    fn patches<'a>(
        &self,
        isa: Isa,
        order: PatchOrder,
        images: &'a [f32],
        cols: &'a mut Vec<f32>,
        padded: &mut Vec<f32>,
        taps: &[u32],
    ) -> &'a [f32] {
        let chw = self.c * self.h * self.w;
        let ld = images.len() / chw * self.hw();
        if ld == self.hw() && self.pointwise() {
            return images;
        }
        let cols = grown(cols, self.kk() * ld);
        for (j, img) in images.chunks_exact(chw).enumerate() {
            let at = j * self.hw();
            match order {
                PatchOrder::Cols => im2col(isa, self, img, cols, ld, at, taps, padded),
                PatchOrder::Rows => {
                    let padded = channels_last(isa, self, img, padded);
                    im2row(isa, self, padded, cols, at)
                }
            }
        }
        cols
    }
}

/// The pass a patch matrix is gathered for.
#[derive(Clone, Copy, PartialEq)]
enum Pass {
    Forward,
    Backward,
}

/// The layout of a patch matrix `P [pixels, kk]`, `kk = c_in*k*k` entries per pixel.
#[derive(Clone, Copy, PartialEq)]
enum PatchOrder {
    /// `[kk, pixels]`, entries ordered `(c_in, ki, kj)` as in the weight (im2col).
    Cols,
    /// `[pixels, kk]`, entries ordered `(ki, kj, c_in)` (im2row); the weight is reordered to
    /// match.
    Rows,
}

impl PatchOrder {
    /// `P^T [kk, ld]` as a gemm view of `data`.
    fn entries_by_pixels<S>(self, data: S, ld: usize, kk: usize) -> View<S> {
        match self {
            PatchOrder::Cols => View {
                data,
                rs: ld,
                cs: 1,
            },
            PatchOrder::Rows => View {
                data,
                rs: 1,
                cs: kk,
            },
        }
    }

    /// The weight `[c_out, c_in, k, k]` with its entries in this order.
    fn weight_to<'a>(self, isa: Isa, d: &Dims, weight: &'a [f32]) -> Cow<'a, [f32]> {
        match self {
            PatchOrder::Cols => Cow::Borrowed(weight),
            PatchOrder::Rows => Cow::Owned(reorder(isa, weight, d.c, d.g.k * d.g.k)),
        }
    }

    /// A weight gradient with its entries in this order, back in `[c_out, c_in, k, k]`.
    fn weight_from<'a>(self, isa: Isa, d: &Dims, dw: &'a [f32]) -> Cow<'a, [f32]> {
        match self {
            PatchOrder::Cols => Cow::Borrowed(dw),
            PatchOrder::Rows => Cow::Owned(reorder(isa, dw, d.g.k * d.g.k, d.c)),
        }
    }
}

/// Each row of `[rows, outer * inner]` with its `[outer, inner]` entries transposed to `[inner,
/// outer]` (by [`transpose`]).
fn reorder(isa: Isa, w: &[f32], outer: usize, inner: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for (dst, src) in out
        .chunks_exact_mut(outer * inner)
        .zip(w.chunks_exact(outer * inner))
    {
        transpose(isa, src, outer, inner, dst);
    }
    out
}

/// `buffer`'s first `len` elements, growing it if shorter. What it held before is left in place:
/// callers overwrite every element they read.
fn grown(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// The buffers a task fills on its way through a convolution, kept per thread from call to call.
#[derive(Default)]
struct Scratch {
    /// The patch matrix.
    cols: Vec<f32>,
    /// A group's output or output gradient as one `[c_out, ld]` matrix.
    staged: Vec<f32>,
    /// The patch matrix's gradient.
    dcols: Vec<f32>,
    /// One image, zero-padded: channels-last (im2row) or as padded planes (tap tables).
    padded: Vec<f32>,
    /// The patch matrix transposed, `[ld, kk]` (weight gradient).
    transposed: Vec<f32>,
}

thread_local! {
    static SCRATCH: Cell<Scratch> = Cell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch buffers (fresh ones if `f` runs inside another call).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    let mut scratch = SCRATCH.take();
    let result = f(&mut scratch);
    SCRATCH.set(scratch);
    result
}

shared::multiversion! {
    /// Gathers image `img` (`[c, h, w]`) into columns `at..at + ho*wo` of `cols` (`[kk, ld]`),
    /// zeros where the kernel overhangs the padding. Every entry of those columns is written.
    #[allow(clippy::too_many_arguments)]
    fn im2col(
        d: &Dims,
        img: &[f32],
        cols: &mut [f32],
        ld: usize,
        at: usize,
        taps: &[u32],
        padded: &mut Vec<f32>,
    ) {
        let (k, s, p) = (d.g.k, d.g.stride, d.g.padding);
        let (h, w, wo, hw) = (d.h, d.w, d.wo, d.hw());
        if !taps.is_empty() {
            let (hp, wp) = d.padded_size();
            let padded = d.pad(img, padded);
            for (r, row) in cols.chunks_exact_mut(ld).enumerate() {
                let plane = &padded[r / (k * k) * hp * wp..][..hp * wp];
                let taps = &taps[(r % (k * k)) * hw..][..hw];
                for (d, &t) in row[at..at + hw].iter_mut().zip(taps) {
                    // SAFETY: every tap lies inside a padded plane (asserted in `Dims::taps`).
                    *d = unsafe { *plane.get_unchecked(t as usize) };
                }
            }
            return;
        }
        for (r, row) in cols.chunks_exact_mut(ld).enumerate() {
            let row = &mut row[at..at + hw];
            let (ci, ki, kj) = (r / (k * k), r / k % k, r % k);
            let plane = &img[ci * h * w..(ci + 1) * h * w];
            let (lo, hi, first) = d.columns(kj);
            if d.same_size() {
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
                let Some(ih) = d.input_row(oh, ki) else {
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
}

shared::multiversion! {
    /// The adjoint of [`im2col`]: adds columns `at..at + ho*wo` of `cols` (`[kk, ld]`) onto
    /// image `img`.
    #[allow(clippy::too_many_arguments)]
    fn col2im(
        d: &Dims,
        cols: &[f32],
        ld: usize,
        at: usize,
        img: &mut [f32],
        taps: &[u32],
        padded: &mut Vec<f32>,
    ) {
        let (k, s, p) = (d.g.k, d.g.stride, d.g.padding);
        let (h, w, wo, hw) = (d.h, d.w, d.wo, d.hw());
        if !taps.is_empty() {
            // Scattered onto zeroed padded planes, whose insides are then added to the image.
            let (hp, wp) = d.padded_size();
            let padded = grown(padded, d.c * hp * wp);
            padded.fill(0.0);
            for (r, row) in cols.chunks_exact(ld).enumerate() {
                let plane = &mut padded[r / (k * k) * hp * wp..][..hp * wp];
                let taps = &taps[(r % (k * k)) * hw..][..hw];
                for (&v, &t) in row[at..at + hw].iter().zip(taps) {
                    // SAFETY: every tap lies inside a padded plane (asserted in `Dims::taps`).
                    unsafe { *plane.get_unchecked_mut(t as usize) += v };
                }
            }
            for (dst, src) in img.chunks_exact_mut(h * w).zip(padded.chunks_exact(hp * wp)) {
                for (line, src) in dst.chunks_exact_mut(w).zip(src[p * wp..].chunks_exact(wp)) {
                    for (d, &v) in line.iter_mut().zip(&src[p..p + w]) {
                        *d += v;
                    }
                }
            }
            return;
        }
        for (r, row) in cols.chunks_exact(ld).enumerate() {
            let row = &row[at..at + hw];
            let (ci, ki, kj) = (r / (k * k), r / k % k, r % k);
            let plane = &mut img[ci * h * w..(ci + 1) * h * w];
            let (lo, hi, first) = d.columns(kj);
            for (oh, src) in row.chunks_exact(wo).enumerate() {
                let Some(ih) = d.input_row(oh, ki) else {
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

shared::multiversion! {
    /// Gathers an image from its zero-padded channels-last copy `padded` ([`channels_last`])
    /// into rows `at..at + ho*wo` of `rows` (`[ld, kk]`, entries ordered `(ki, kj, c)`): a
    /// kernel row's taps for one pixel are one contiguous run of `k*c` values there.
    fn im2row(d: &Dims, padded: &[f32], rows: &mut [f32], at: usize) {
        let (k, s, c, kk) = (d.g.k, d.g.stride, d.c, d.kk());
        let wp = d.padded_size().1;
        let run = k * c;
        for (o, row) in rows[at * kk..(at + d.hw()) * kk]
            .chunks_exact_mut(kk)
            .enumerate()
        {
            let (oh, ow) = (o / d.wo, o % d.wo);
            for (ki, dst) in row.chunks_exact_mut(run).enumerate() {
                let from = ((oh * s + ki) * wp + ow * s) * c;
                dst.copy_from_slice(&padded[from..from + run]);
            }
        }
    }
}

shared::multiversion! {
    /// The adjoint of [`im2row`]: adds rows `at..at + ho*wo` of `rows` (`[ld, kk]`) onto image
    /// `img`, through zeroed channels-last planes in `padded`.
    fn row2im(d: &Dims, rows: &[f32], at: usize, img: &mut [f32], padded: &mut Vec<f32>) {
        let (k, s, c, kk, p) = (d.g.k, d.g.stride, d.c, d.kk(), d.g.padding);
        let (hp, wp) = d.padded_size();
        let padded = grown(padded, hp * wp * c);
        padded.fill(0.0);
        let run = k * c;
        for (o, row) in rows[at * kk..(at + d.hw()) * kk].chunks_exact(kk).enumerate() {
            let (oh, ow) = (o / d.wo, o % d.wo);
            for (ki, src) in row.chunks_exact(run).enumerate() {
                let from = ((oh * s + ki) * wp + ow * s) * c;
                for (a, &v) in padded[from..from + run].iter_mut().zip(src) {
                    *a += v;
                }
            }
        }
        for (ci, plane) in img.chunks_exact_mut(d.h * d.w).enumerate() {
            for (ih, line) in plane.chunks_exact_mut(d.w).enumerate() {
                let pixels = &padded[((ih + p) * wp + p) * c..];
                for (x, pixel) in line.iter_mut().zip(pixels.chunks(c)) {
                    *x += pixel[ci];
                }
            }
        }
    }
}

/// Image `img` (`[c, h, w]`) as `[h + 2p, w + 2p, c]` with zeros around, in `padded`: each
/// image row's `[c, w]` slab transposed into place, the border zeroed.
fn channels_last<'a>(isa: Isa, d: &Dims, img: &[f32], padded: &'a mut Vec<f32>) -> &'a [f32] {
    let (c, p) = (d.c, d.g.padding);
    let (hp, wp) = d.padded_size();
    let padded = grown(padded, hp * wp * c);
    let (top, bottom) = (p * wp * c, (p + d.h) * wp * c);
    padded[..top].fill(0.0);
    padded[bottom..].fill(0.0);
    for (ih, row) in padded[top..bottom].chunks_exact_mut(wp * c).enumerate() {
        row[..p * c].fill(0.0);
        row[(p + d.w) * c..].fill(0.0);
        let slab = Strided {
            data: &img[ih * d.w..],
            stride: d.h * d.w,
        };
        transpose_strided(isa, slab, (c, d.w), &mut row[p * c..], c);
    }
    padded
}

/// `dst [cols, rows] = src [rows, cols]^T`, both row-major.
fn transpose(isa: Isa, src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    assert!(src.len() >= rows * cols && dst.len() >= rows * cols);
    let src = Strided {
        data: src,
        stride: cols,
    };
    transpose_strided(isa, src, (rows, cols), dst, rows);
}

/// Rows of a matrix `stride` values apart in `data`.
#[derive(Clone, Copy)]
struct Strided<'a> {
    data: &'a [f32],
    stride: usize,
}

/// `dst[j * dst_stride + i] = src[i][j]` for the `rows x cols` matrix `src`: in 8x8 blocks held
/// in registers where the set has AVX2, element by element otherwise (the same values either
/// way: nothing is computed).
fn transpose_strided(
    isa: Isa,
    src: Strided,
    (rows, cols): (usize, usize),
    dst: &mut [f32],
    dst_stride: usize,
) {
    assert!(
        rows == 0
            || cols == 0
            || ((rows - 1) * src.stride + cols <= src.data.len()
                && (cols - 1) * dst_stride + rows <= dst.len()
                && cols <= src.stride
                && rows <= dst_stride),
        "transpose: a {rows}x{cols} matrix outside its buffers"
    );
    let (full_rows, full_cols) = (rows / 8 * 8, cols / 8 * 8);
    let mut done = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if isa.is_avx2() || isa.is_avx512() {
        // SAFETY: the CPU has AVX2 (an `Isa` names only sets it has), and every element of both
        // matrices lies inside its buffer (asserted above).
        unsafe { transpose_blocks(src, (full_rows, full_cols), dst, dst_stride) };
        done = (full_rows, full_cols);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    let scalar = |(rs, cs): (std::ops::Range<usize>, std::ops::Range<usize>), dst: &mut [f32]| {
        for r in rs {
            for c in cs.clone() {
                dst[c * dst_stride + r] = src.data[r * src.stride + c];
            }
        }
    };
    scalar((0..done.0, done.1..cols), dst);
    scalar((done.0..rows, 0..cols), dst);
}

/// The `full_rows x full_cols` top-left part of [`transpose_strided`] (multiples of 8), in 8x8
/// blocks held in registers.
///
/// # Safety
/// The CPU must have AVX2, and every element of both matrices must lie inside its buffer.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_blocks(
    src: Strided,
    (full_rows, full_cols): (usize, usize),
    dst: &mut [f32],
    dst_stride: usize,
) {
    use std::arch::x86_64::*;
    for r in (0..full_rows).step_by(8) {
        for c in (0..full_cols).step_by(8) {
            let from = src.data.as_ptr().add(r * src.stride + c);
            let to = dst.as_mut_ptr().add(c * dst_stride + r);
            let row = |i: usize| _mm256_loadu_ps(from.add(i * src.stride));
            let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
            let (r4, r5, r6, r7) = (row(4), row(5), row(6), row(7));
            // Pairs of rows interleaved, then pairs of pairs: each 128-bit lane holds four
            // columns of four rows; the lanes are then joined across the two halves.
            let unpack = |a, b| (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
            let shuffle = |a, b| {
                (
                    _mm256_shuffle_ps::<0x44>(a, b),
                    _mm256_shuffle_ps::<0xEE>(a, b),
                )
            };
            let ((t0, t1), (t2, t3)) = (unpack(r0, r1), unpack(r2, r3));
            let ((t4, t5), (t6, t7)) = (unpack(r4, r5), unpack(r6, r7));
            let ((u0, u1), (u2, u3)) = (shuffle(t0, t2), shuffle(t1, t3));
            let ((u4, u5), (u6, u7)) = (shuffle(t4, t6), shuffle(t5, t7));
            // Output row i joins the low halves of u_i and u_{i+4}; row i + 4 their high halves.
            for (i, (lo, hi)) in [(u0, u4), (u1, u5), (u2, u6), (u3, u7)]
                .into_iter()
                .enumerate()
            {
                _mm256_storeu_ps(
                    to.add(i * dst_stride),
                    _mm256_permute2f128_ps::<0x20>(lo, hi),
                );
                _mm256_storeu_ps(
                    to.add((i + 4) * dst_stride),
                    _mm256_permute2f128_ps::<0x31>(lo, hi),
                );
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
