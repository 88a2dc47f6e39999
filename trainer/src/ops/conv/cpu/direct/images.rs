//! The direct forward of layers whose output channels come in multiples of 64. A tile is one
//! output pixel of up to six images by 64 output channels on AVX-512 or 16 on AVX2
//! (`super::vector::part`, four or two vectors), held in registers, and
//! only the kernel taps that land inside the image are summed: at 4x4 a third of a 3x3 kernel's
//! taps overhang the padding, at 2x2 more than half, and im2col + gemm multiplies all of them by
//! zeros. The images are copied channels-last (unpadded), the weight is packed once per call as
//! `[c_out / 64, c_in, k*k, 64]`, and the accumulators of a span of output pixels are staged in
//! the L2 cache while the taps and input channels pass over them.

use rayon::prelude::*;
use shared::cpu::Isa;

use super::super::{grown, transpose, with_scratch, Dims};
use super::vector::{on_vectors, part, tiles, Vector};
use super::{pixel_major, STAGED};
use crate::ops::cpu_storage::zeros;

/// Output channels per block.
pub(super) const OC: usize = 64;
/// Input channels per pass over a task's tiles: the weight block they read (64 x 64 values)
/// stays in the L1 cache.
const CB: usize = 64;
/// Input values per task, when the images are small enough: 256 KiB.
const TASK_INPUT: usize = 64 * 1024;

/// `y [n, c_out, ho, wo]` for `x [n, c, h, w]` and `weight [c_out, c, k, k]`, `c_out` a multiple
/// of 64 and the CPU with AVX2 or AVX-512 (checked by the caller, `super::forward`).
pub(super) fn forward(isa: Isa, d: &Dims, x: &[f32], weight: &[f32]) -> Vec<f32> {
    let (chw, hw, taps) = (d.c * d.h * d.w, d.hw(), d.g.k * d.g.k);
    // [c_out / 64, c, k*k, 64]: each block of 64 output channels transposed.
    let mut packed = vec![0f32; weight.len()];
    packed
        .par_chunks_mut(OC * d.c * taps)
        .zip(weight.par_chunks(OC * d.c * taps))
        .for_each(|(dst, src)| transpose(isa, src, OC, d.c * taps, dst));
    let mut out = zeros(d.n * d.c_out * hw);
    // Enough images per task that its input at least matches a quarter of the weight it
    // streams and, past that, few enough that they fit in the L2 cache beside their
    // accumulators; then as many tasks as that takes, rounded up to a multiple of the thread
    // count, of equal size.
    let threads = rayon::current_num_threads().max(1);
    let (by_cache, by_weight) = (TASK_INPUT / chw.max(1), weight.len() / (4 * chw.max(1)));
    let tasks =
        d.n.div_ceil(by_cache.max(by_weight).max(1))
            .div_ceil(threads)
            * threads;
    let per_task = d.n.div_ceil(tasks.max(1)).max(1);
    let x = pixel_major(isa, x, d.c, d.h * d.w);
    out.par_chunks_mut(per_task * d.c_out * hw)
        .zip(x.par_chunks(per_task * chw))
        .for_each(|(y, images)| {
            with_scratch(|scratch| {
                let count = images.len() / chw;
                let staged = grown(&mut scratch.staged, span(hw, count) * count * OC);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the caller checked that `isa` is AVX2 or AVX-512; `images_in_tiles`
                // asserts its buffers' sizes.
                unsafe {
                    images_in_tiles(isa, d, count, images, &packed, y, staged)
                };
            })
        });
    out
}

/// Output pixels per pass over the taps for `count` images: as many as [`STAGED`] holds.
fn span(hw: usize, count: usize) -> usize {
    (STAGED / (count * OC).max(1)).min(hw).max(1)
}

on_vectors! {
    /// The outputs `y [count, c_out, ho, wo]` of `count` channels-last images
    /// `x [count, h, w, c]`, through `staged` (`[span, count, 64]`: a span of output pixels for
    /// one block of output channels at a time).
    unsafe fn images_in_tiles<V>(
        d: &Dims,
        count: usize,
        x: &[f32],
        packed: &[f32],
        y: &mut [f32],
        staged: &mut [f32],
    ) {
        let (k, s, p) = (d.g.k, d.g.stride, d.g.padding);
        let (c, taps, hw, image) = (d.c, k * k, d.hw(), d.h * d.w * d.c);
        let span = span(hw, count);
        let part = part::<V>(OC);
        assert!(
            x.len() == count * image
                && packed.len() == d.c_out * c * taps
                && y.len() == count * d.c_out * hw
                && staged.len() >= span * count * OC,
            "conv: direct kernel buffers of the wrong size"
        );
        for (block, weights) in packed.chunks_exact(c * taps * OC).enumerate() {
            for start in (0..hw).step_by(span) {
                let pixels = start..(start + span).min(hw);
                let staged = &mut staged[..pixels.len() * count * OC];
                staged.fill(0.0);
                for t in 0..taps {
                    let (ki, kj) = (t / k, t % k);
                    for c0 in (0..c).step_by(CB) {
                        let depth = CB.min(c - c0);
                        // Weight rows c0.. of tap t, one every `taps * OC` values.
                        let w = weights[(c0 * taps + t) * OC..].as_ptr();
                        for (pixel, acc) in pixels.clone().zip(staged.chunks_exact_mut(count * OC))
                        {
                            let (oh, ow) = (pixel / d.wo, pixel % d.wo);
                            let Some(ih) = d.input_row(oh, ki) else {
                                continue;
                            };
                            let Some(iw) = (ow * s + kj).checked_sub(p).filter(|&i| i < d.w)
                            else {
                                continue;
                            };
                            let at = (ih * d.w + iw) * c + c0;
                            for p0 in (0..OC).step_by(part) {
                                for run in tiles::<V>(count, part / V::LANES) {
                                    let (first, end) = (run.start, run.end);
                                    let x = x[first * image + at..].as_ptr();
                                    let acc = acc[first * OC + p0..].as_mut_ptr();
                                    // SAFETY (each call): image `first + j` of the tile reads
                                    // `depth` channels from `at`, inside its own `image` values
                                    // (ih, iw are inside the image and c0 + depth <= c); the
                                    // weight rows end at row `(c0 + depth - 1) * taps + t` of the
                                    // block's `c * taps`, and their columns `p0..p0 + part` lie
                                    // inside its 64; the tile's accumulators are columns
                                    // `p0..p0 + part` of rows `first..end` of the pixel's
                                    // `count`.
                                    let len = end - first;
                                    let (w, w_stride) = (w.add(p0), taps * OC);
                                    let data = (x, image, w, w_stride, depth);
                                    match part / V::LANES {
                                        2 => by_length!(len, [1, 2, 3, 4, 5, 6], |T| {
                                            tile_sums::<V, T, 2>(data, acc)
                                        }),
                                        _ => by_length!(len, [1, 2, 3, 4, 5, 6], |T| {
                                            tile_sums::<V, T, 4>(data, acc)
                                        }),
                                    }
                                }
                            }
                        }
                    }
                }
                for (pixel, rows) in pixels.zip(staged.chunks_exact(count * OC)) {
                    for (img, row) in rows.chunks_exact(OC).enumerate() {
                        let planes = &mut y[(img * d.c_out + block * OC) * hw + pixel..];
                        for (o, &v) in row.iter().enumerate() {
                            planes[o * hw] = v;
                        }
                    }
                }
            }
        }
    }
}

/// `acc[j] += sum over i < depth of x[j * image + i] * w[i * w_stride..][..N * LANES]` for the
/// `T` images of a tile, `acc` being `T` rows [`OC`] apart.
///
/// # Safety
/// The CPU must have the set `V` belongs to, and every address named above must be inside its
/// buffer.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_sums<V: Vector, const T: usize, const N: usize>(
    (x, image, w, w_stride, depth): (*const f32, usize, *const f32, usize, usize),
    acc: *mut f32,
) {
    let lanes = V::LANES;
    let mut sums: [[V; N]; T] =
        std::array::from_fn(|j| std::array::from_fn(|v| V::load(acc.add(j * OC + v * lanes))));
    for i in 0..depth {
        let row = w.add(i * w_stride);
        let weights: [V; N] = std::array::from_fn(|v| V::load(row.add(v * lanes)));
        for (j, sum) in sums.iter_mut().enumerate() {
            let value = V::splat(*x.add(j * image + i));
            for (s, &wv) in sum.iter_mut().zip(&weights) {
                *s = s.mul_add(value, wv);
            }
        }
    }
    for (j, sum) in sums.iter().enumerate() {
        for (v, &s) in sum.iter().enumerate() {
            s.store(acc.add(j * OC + v * lanes));
        }
    }
}
