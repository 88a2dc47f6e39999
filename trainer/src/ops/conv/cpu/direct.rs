//! The convolution as a direct AVX-512 kernel, for kernels wider than 1x1 with at least 16
//! input channels and output channels in multiples of 64: the forward of such layers, the
//! input gradient of stride-1 ones (the forward of their transposed layer, `Dims::transposed`),
//! and their weight gradient where no patch matrix is gathered for the input gradient anyway.
//!
//! A forward tile is one output pixel of [`IMAGES`] images by 64 output channels, held in 24
//! vector registers, and only the kernel taps that land inside the image are summed: at 4x4 a
//! third of a 3x3 kernel's taps overhang the padding, at 2x2 more than half, and im2col + gemm
//! multiplies all of them by zeros. The images are copied channels-last (unpadded), the weight
//! is packed once per call as `[c_out / 64, c_in, k*k, 64]`, and the accumulators of a span of
//! output pixels are staged in the L2 cache while the taps and input channels pass over them.
//! A weight-gradient tile ([`weight_gradient`]) is 64 output channels by [`IMAGES`] input
//! channels of one tap, summed over the images and the output pixels whose input pixel lies
//! inside the image. Each result is one chain of fused multiply-adds in a fixed order, so it
//! does not depend on the thread count.

use rayon::prelude::*;
use shared::cpu::Isa;

use super::{grown, transpose, with_scratch, Dims};

/// Output channels per tile: four AVX-512 vectors.
const OC: usize = 64;
/// Input channels per pass over a task's tiles: the weight block they read (64 x 64 values)
/// stays in the L1 cache.
const CB: usize = 64;
/// Images per tile: with [`OC`], 24 accumulator registers of AVX-512's 32.
const IMAGES: usize = 6;
/// Accumulators (floats) staged per pass over the taps: 256 KiB, a quarter of a Zen 4 core's
/// L2 cache.
const STAGED: usize = 64 * 1024;
/// Input values per task, when the images are small enough: 256 KiB.
const TASK_INPUT: usize = 64 * 1024;

/// Whether the forward of `d` runs here on `isa`.
pub(super) fn applies(isa: Isa, d: &Dims) -> bool {
    cfg!(target_arch = "x86_64")
        && isa.is_avx512()
        && d.c_out.is_multiple_of(OC)
        && d.c >= 16
        && d.g.k > 1
}

/// `y [n, c_out, ho, wo]` for `x [n, c, h, w]` and `weight [c_out, c, k, k]`; only where
/// [`applies`] says so.
pub(super) fn forward(isa: Isa, d: &Dims, x: &[f32], weight: &[f32]) -> Vec<f32> {
    assert!(
        applies(isa, d),
        "conv: the direct kernel needs AVX-512, c_out % 64 == 0, c_in >= 16 and k > 1"
    );
    let (chw, hw, taps) = (d.c * d.h * d.w, d.hw(), d.g.k * d.g.k);
    // [c_out / 64, c, k*k, 64]: each block of 64 output channels transposed.
    let mut packed = vec![0f32; weight.len()];
    packed
        .par_chunks_mut(OC * d.c * taps)
        .zip(weight.par_chunks(OC * d.c * taps))
        .for_each(|(dst, src)| transpose(isa, src, OC, d.c * taps, dst));
    let mut out = vec![0f32; d.n * d.c_out * hw];
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
                // SAFETY: `applies` checked that the CPU has AVX-512; `images_avx512` asserts
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
                            match tile {
                                1 => tile_avx512::<1>(x, image, w, taps * OC, depth, acc),
                                2 => tile_avx512::<2>(x, image, w, taps * OC, depth, acc),
                                3 => tile_avx512::<3>(x, image, w, taps * OC, depth, acc),
                                4 => tile_avx512::<4>(x, image, w, taps * OC, depth, acc),
                                5 => tile_avx512::<5>(x, image, w, taps * OC, depth, acc),
                                _ => tile_avx512::<IMAGES>(x, image, w, taps * OC, depth, acc),
                            }
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

/// Input channels per weight-gradient task: eight tiles.
const TASK_CHANNELS: usize = 8 * IMAGES;

/// `dweight [c_out, c, k, k]` for `x [n, c, h, w]` and `dy [n, c_out, ho, wo]`; only where
/// [`applies`] says so. A tile is 64 output channels by [`IMAGES`] input channels of one tap,
/// summed over every image and every output pixel whose input pixel lies inside the image, in
/// a fixed order; tasks hold disjoint tiles, so the result does not depend on the thread count.
pub(super) fn weight_gradient(isa: Isa, d: &Dims, x: &[f32], dy: &[f32]) -> Vec<f32> {
    assert!(
        applies(isa, d),
        "conv: the direct kernel needs AVX-512, c_out % 64 == 0, c_in >= 16 and k > 1"
    );
    let (taps, hw, plane) = (d.g.k * d.g.k, d.hw(), d.h * d.w);
    let x = pixel_major(isa, x, d.c, plane);
    let dy = pixel_major(isa, dy, d.c_out, hw);
    // Task (block, tap, first channel) -> its rows `[channels, 64]` of the packed gradient.
    let tasks: Vec<(usize, usize, usize)> = (0..d.c_out / OC)
        .flat_map(|block| {
            (0..taps).flat_map(move |t| {
                (0..d.c)
                    .step_by(TASK_CHANNELS)
                    .map(move |c0| (block, t, c0))
            })
        })
        .collect();
    let rows: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(block, t, c0)| {
            let channels = TASK_CHANNELS.min(d.c - c0);
            let mut rows = vec![0f32; channels * OC];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `applies` checked that the CPU has AVX-512; `weight_tile_avx512` asserts
            // its buffers' sizes.
            unsafe {
                weight_tile_avx512(d, (&x, &dy), (block, t, c0), &mut rows)
            };
            rows
        })
        .collect();
    // Each output channel's row `[c, k*k]` gathered from its block's tasks, which are
    // consecutive.
    let per_block = tasks.len() / (d.c_out / OC);
    let mut dw = vec![0f32; d.c_out * d.c * taps];
    dw.par_chunks_mut(d.c * taps)
        .enumerate()
        .for_each(|(co, dst)| {
            let (block, o) = (co / OC, co % OC);
            let range = block * per_block..(block + 1) * per_block;
            for (&(_, t, c0), rows) in tasks[range.clone()].iter().zip(&rows[range]) {
                for (i, row) in rows.chunks_exact(OC).enumerate() {
                    dst[(c0 + i) * taps + t] = row[o];
                }
            }
        });
    dw
}

/// `planes [n, c, len]` as `[n, len, c]`.
fn pixel_major(isa: Isa, planes: &[f32], c: usize, len: usize) -> Vec<f32> {
    let mut out = vec![0f32; planes.len()];
    out.par_chunks_mut(c * len)
        .zip(planes.par_chunks(c * len))
        .for_each(|(dst, src)| transpose(isa, src, c, len, dst));
    out
}

/// Rows `c0..c0 + rows.len() / 64` of one tap's weight gradient for output channels
/// `block * 64..`, into `rows` (`[channels, 64]`), from channels-last `x [n, h, w, c]` and
/// `dy [n, ho, wo, c_out]`.
///
/// # Safety
/// The CPU must have AVX-512 (F).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn weight_tile_avx512(
    d: &Dims,
    (x, dy): (&[f32], &[f32]),
    (block, t, c0): (usize, usize, usize),
    rows: &mut [f32],
) {
    let channels = rows.len() / OC;
    assert!(
        x.len() == d.n * d.h * d.w * d.c
            && dy.len() == d.n * d.hw() * d.c_out
            && (block + 1) * OC <= d.c_out
            && c0 + channels <= d.c
            && t < d.g.k * d.g.k,
        "conv: direct weight-gradient buffers of the wrong size"
    );
    // Images per pass over the tiles: their 64 output channels of dY (256 bytes a pixel) stay
    // in the L2 cache while every tile reads them.
    let per_pass = (STAGED / (OC * d.hw()).max(1)).max(1);
    for start in (0..d.n).step_by(per_pass) {
        let images = start..(start + per_pass).min(d.n);
        let mut first = 0;
        while first < channels {
            let tile = (channels - first).min(IMAGES);
            let acc = rows[first * OC..].as_mut_ptr();
            let at = (block * OC, c0 + first);
            let images = images.clone();
            // SAFETY: the tile's channels and output channels lie inside `x`'s and `dy`'s
            // pixels (asserted above); its accumulators are `tile` rows of `rows`.
            match tile {
                1 => weight_sums_avx512::<1>(d, (x, dy), images, at, t, acc),
                2 => weight_sums_avx512::<2>(d, (x, dy), images, at, t, acc),
                3 => weight_sums_avx512::<3>(d, (x, dy), images, at, t, acc),
                4 => weight_sums_avx512::<4>(d, (x, dy), images, at, t, acc),
                5 => weight_sums_avx512::<5>(d, (x, dy), images, at, t, acc),
                _ => weight_sums_avx512::<IMAGES>(d, (x, dy), images, at, t, acc),
            }
            first += tile;
        }
    }
}

/// `acc[j][o] += sum over images and valid output pixels of x[.., input pixel, ci + j] *
/// dy[.., pixel, co + o]` for tap `t`, `acc` being `T` rows of 64 values.
///
/// # Safety
/// The CPU must have AVX-512 (F); `images` must be inside the batch, `co + 64 <= c_out`,
/// `ci + T <= c`, and `acc` must hold `T * 64` values.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn weight_sums_avx512<const T: usize>(
    d: &Dims,
    (x, dy): (&[f32], &[f32]),
    images: std::ops::Range<usize>,
    (co, ci): (usize, usize),
    t: usize,
    acc: *mut f32,
) {
    use std::arch::x86_64::*;
    const V: usize = OC / 16;
    let (k, s) = (d.g.k, d.g.stride);
    let (ki, kj) = (t / k, t % k);
    let (lo, hi, first) = d.columns(kj);
    let mut sums: [[__m512; V]; T] =
        std::array::from_fn(|j| std::array::from_fn(|q| _mm512_loadu_ps(acc.add(j * OC + q * 16))));
    // No output column reads this kernel column inside the image: nothing to add.
    let images = if lo < hi { images } else { 0..0 };
    for image in images {
        for oh in 0..d.ho {
            let Some(ih) = d.input_row(oh, ki) else {
                continue;
            };
            let mut g = dy[((image * d.ho + oh) * d.wo + lo) * d.c_out + co..].as_ptr();
            let mut v = x[((image * d.h + ih) * d.w + first) * d.c + ci..].as_ptr();
            for _ in lo..hi {
                let grads: [__m512; V] = std::array::from_fn(|q| _mm512_loadu_ps(g.add(q * 16)));
                for (j, sum) in sums.iter_mut().enumerate() {
                    let value = _mm512_set1_ps(*v.add(j));
                    for (a, &gv) in sum.iter_mut().zip(&grads) {
                        *a = _mm512_fmadd_ps(value, gv, *a);
                    }
                }
                g = g.add(d.c_out);
                v = v.add(s * d.c);
            }
        }
    }
    for (j, sum) in sums.iter().enumerate() {
        for (q, &a) in sum.iter().enumerate() {
            _mm512_storeu_ps(acc.add(j * OC + q * 16), a);
        }
    }
}
