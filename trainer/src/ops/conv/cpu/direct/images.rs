//! The direct forward of layers whose output channels come in multiples of 64. A tile is one
//! output pixel of [`IMAGES`] images by 64 output channels, held in 24 vector registers, and
//! only the kernel taps that land inside the image are summed: at 4x4 a third of a 3x3 kernel's
//! taps overhang the padding, at 2x2 more than half, and im2col + gemm multiplies all of them by
//! zeros. The images are copied channels-last (unpadded), the weight is packed once per call as
//! `[c_out / 64, c_in, k*k, 64]`, and the accumulators of a span of output pixels are staged in
//! the L2 cache while the taps and input channels pass over them.

use rayon::prelude::*;
use shared::cpu::Isa;

use super::super::{grown, transpose, with_scratch, Dims};
use super::{pixel_major, STAGED};
use crate::ops::cpu_storage::zeros;

/// Output channels per tile: four AVX-512 vectors.
pub(super) const OC: usize = 64;
/// Input channels per pass over a task's tiles: the weight block they read (64 x 64 values)
/// stays in the L1 cache.
const CB: usize = 64;
/// Images per tile: with [`OC`], 24 accumulator registers of AVX-512's 32.
const IMAGES: usize = 6;
/// Input values per task, when the images are small enough: 256 KiB.
const TASK_INPUT: usize = 64 * 1024;

/// `y [n, c_out, ho, wo]` for `x [n, c, h, w]` and `weight [c_out, c, k, k]`, `c_out` a multiple
/// of 64 and the CPU with AVX-512 (checked by the caller, `super::forward`).
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
                // SAFETY: the caller checked that the CPU has AVX-512; `images_avx512` asserts
                // its buffers' sizes.
                unsafe {
                    images_avx512(d, count, images, &packed, y, staged)
                };
            })
        });
    out
}

/// Output pixels per pass over the taps for `count` images: as many as [`STAGED`] holds.
fn span(hw: usize, count: usize) -> usize {
    (STAGED / (count * OC).max(1)).min(hw).max(1)
}

/// The outputs `y [count, c_out, ho, wo]` of `count` channels-last images `x [count, h, w, c]`,
/// through `staged` (`[span, count, 64]`: a span of output pixels for one block of output
/// channels at a time).
///
/// # Safety
/// The CPU must have AVX-512 (F).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn images_avx512(
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
                    for (pixel, acc) in pixels.clone().zip(staged.chunks_exact_mut(count * OC)) {
                        let (oh, ow) = (pixel / d.wo, pixel % d.wo);
                        let Some(ih) = d.input_row(oh, ki) else {
                            continue;
                        };
                        let Some(iw) = (ow * s + kj).checked_sub(p).filter(|&i| i < d.w) else {
                            continue;
                        };
                        let at = (ih * d.w + iw) * c + c0;
                        let mut first = 0;
                        while first < count {
                            let x = x[first * image + at..].as_ptr();
                            let acc = acc[first * OC..].as_mut_ptr();
                            // SAFETY (each call): image `first + j` of the tile reads `depth`
                            // channels from `at`, inside its own `image` values (ih, iw are
                            // inside the image and c0 + depth <= c); the weight rows end at
                            // row `(c0 + depth - 1) * taps + t` of the block's `c * taps`; the
                            // tile's accumulators are rows `first..first + tile` of the pixel's
                            // `count`.
                            let tile = (count - first).min(IMAGES);
                            by_length!(tile, [1, 2, 3, 4, 5, 6], |T| tile_avx512::<T>(
                                x,
                                image,
                                w,
                                taps * OC,
                                depth,
                                acc
                            ));
                            first += tile;
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

/// `acc[j] += sum over i < depth of x[j * image + i] * w[i * w_stride..][..64]` for the `T`
/// images of a tile, `acc` being `T` rows of 64 values.
///
/// # Safety
/// The CPU must have AVX-512 (F), and every address named above must be inside its buffer.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn tile_avx512<const T: usize>(
    x: *const f32,
    image: usize,
    w: *const f32,
    w_stride: usize,
    depth: usize,
    acc: *mut f32,
) {
    use std::arch::x86_64::*;
    const V: usize = OC / 16;
    let mut sums: [[__m512; V]; T] =
        std::array::from_fn(|j| std::array::from_fn(|v| _mm512_loadu_ps(acc.add(j * OC + v * 16))));
    for i in 0..depth {
        let row = w.add(i * w_stride);
        let weights: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(row.add(v * 16)));
        for (j, sum) in sums.iter_mut().enumerate() {
            let value = _mm512_set1_ps(*x.add(j * image + i));
            for (s, &wv) in sum.iter_mut().zip(&weights) {
                *s = _mm512_fmadd_ps(value, wv, *s);
            }
        }
    }
    for (j, sum) in sums.iter().enumerate() {
        for (v, &s) in sum.iter().enumerate() {
            _mm512_storeu_ps(acc.add(j * OC + v * 16), s);
        }
    }
}
