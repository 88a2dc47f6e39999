//! The direct weight gradient. A tile is one block of 16, 32 or 64 output channels by up to
//! [`CHANNELS`]`[V]` input channels of one tap, held in vector registers and summed over a
//! chunk of images and every output pixel whose input pixel lies inside the image. Tasks are
//! (block, tap, input channels, image chunk); the chunks' sums are added in order, and chunks
//! are a fixed number of images, so the result does not depend on the thread count.

use rayon::prelude::*;
use shared::cpu::Isa;

use super::super::Dims;
use super::{block_width, pixel_major, STAGED};

/// Input channels per tile for `V` vectors (16 output channels each) per channel: 24
/// accumulator registers of AVX-512's 32 with four or two vectors, 16 with one.
const CHANNELS: [usize; 5] = [0, 16, 12, 0, 6];
/// Input channels per task.
const TASK_CHANNELS: usize = 48;
/// Images per task: enough tasks to share among the threads when a layer has few taps and
/// channels.
const TASK_IMAGES: usize = 32;

/// `dweight [c_out, c, k, k]` for `x [n, c, h, w]` and `dy [n, c_out, ho, wo]`, `c_out` a
/// multiple of 16 and the CPU with AVX-512 (checked by the caller, `super::weight_gradient`).
pub(super) fn weight_gradient(isa: Isa, d: &Dims, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (oc, taps, hw, plane) = (block_width(d.c_out), d.g.k * d.g.k, d.hw(), d.h * d.w);
    let x = pixel_major(isa, x, d.c, plane);
    let dy = pixel_major(isa, dy, d.c_out, hw);
    // Task (block, tap, first channel, first image) -> its rows `[channels, oc]` of the packed
    // gradient, the image chunks of one tile side by side.
    let tasks: Vec<(usize, usize, usize, usize)> = (0..d.c_out / oc)
        .flat_map(|block| {
            (0..taps).flat_map(move |t| {
                (0..d.c).step_by(TASK_CHANNELS).flat_map(move |c0| {
                    (0..d.n)
                        .step_by(TASK_IMAGES)
                        .map(move |n0| (block, t, c0, n0))
                })
            })
        })
        .collect();
    let chunks = d.n.div_ceil(TASK_IMAGES);
    let mut rows: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(block, t, c0, n0)| {
            let channels = TASK_CHANNELS.min(d.c - c0);
            let images = n0..(n0 + TASK_IMAGES).min(d.n);
            let mut rows = vec![0f32; channels * oc];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the caller checked that the CPU has AVX-512; `task_avx512` asserts its
            // buffers' sizes.
            unsafe {
                task_avx512(d, oc, (&x, &dy), (block, t, c0), images, &mut rows)
            };
            rows
        })
        .collect();
    // Each tile's image chunks added in order.
    let rows: Vec<Vec<f32>> = rows
        .par_chunks_mut(chunks)
        .map(|parts| {
            let (sum, rest) = parts
                .split_first_mut()
                .expect("a tile has one chunk or more");
            for part in rest.iter() {
                for (s, &v) in sum.iter_mut().zip(part) {
                    *s += v;
                }
            }
            std::mem::take(sum)
        })
        .collect();
    // Each output channel's row `[c, k*k]` gathered from its block's tiles, which are
    // consecutive.
    let tiles: Vec<(usize, usize)> = tasks
        .iter()
        .step_by(chunks)
        .map(|&(_, t, c0, _)| (t, c0))
        .collect();
    let per_block = tiles.len() / (d.c_out / oc);
    let mut dw = vec![0f32; d.c_out * d.c * taps];
    dw.par_chunks_mut(d.c * taps)
        .enumerate()
        .for_each(|(co, dst)| {
            let (block, o) = (co / oc, co % oc);
            let range = block * per_block..(block + 1) * per_block;
            for (&(t, c0), rows) in tiles[range.clone()].iter().zip(&rows[range]) {
                for (i, row) in rows.chunks_exact(oc).enumerate() {
                    dst[(c0 + i) * taps + t] = row[o];
                }
            }
        });
    dw
}

/// Rows `c0..c0 + rows.len() / oc` of one tap's weight gradient for output channels
/// `block * oc..`, summed over `images`, into `rows` (`[channels, oc]`), from channels-last
/// `x [n, h, w, c]` and `dy [n, ho, wo, c_out]`.
///
/// # Safety
/// The CPU must have AVX-512 (F).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn task_avx512(
    d: &Dims,
    oc: usize,
    (x, dy): (&[f32], &[f32]),
    (block, t, c0): (usize, usize, usize),
    images: std::ops::Range<usize>,
    rows: &mut [f32],
) {
    let channels = rows.len() / oc;
    assert!(
        x.len() == d.n * d.h * d.w * d.c
            && dy.len() == d.n * d.hw() * d.c_out
            && matches!(oc, 16 | 32 | 64)
            && (block + 1) * oc <= d.c_out
            && c0 + channels <= d.c
            && images.end <= d.n
            && t < d.g.k * d.g.k,
        "conv: direct weight-gradient buffers of the wrong size"
    );
    let vectors = oc / 16;
    // Images per pass over the tiles: their block of dY stays in the L2 cache while every tile
    // reads it.
    let per_pass = (STAGED / (oc * d.hw()).max(1)).max(1);
    for start in images.clone().step_by(per_pass) {
        let pass = start..(start + per_pass).min(images.end);
        let mut first = 0;
        while first < channels {
            let tile = (channels - first).min(CHANNELS[vectors]);
            let acc = rows[first * oc..].as_mut_ptr();
            let at = (block * oc, c0 + first);
            let (pass, data) = (pass.clone(), (x, dy));
            // SAFETY (each call): the tile's channels and output channels lie inside `x`'s
            // and `dy`'s pixels (asserted above); its accumulators are `tile` rows of `rows`.
            match vectors {
                1 => by_length!(
                    tile,
                    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
                    |T| sums_avx512::<T, 1>(d, data, pass, at, t, acc)
                ),
                2 => by_length!(tile, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], |T| {
                    sums_avx512::<T, 2>(d, data, pass, at, t, acc)
                }),
                _ => by_length!(tile, [1, 2, 3, 4, 5, 6], |T| sums_avx512::<T, 4>(
                    d, data, pass, at, t, acc
                )),
            }
            first += tile;
        }
    }
}

/// `acc[j][o] += sum over images and valid output pixels of x[.., input pixel, ci + j] *
/// dy[.., pixel, co + o]` for tap `t`, `acc` being `T` rows of `16 * V` values.
///
/// # Safety
/// The CPU must have AVX-512 (F); `images` must be inside the batch, `co + 16 * V <= c_out`,
/// `ci + T <= c`, and `acc` must hold `T * 16 * V` values.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn sums_avx512<const T: usize, const V: usize>(
    d: &Dims,
    (x, dy): (&[f32], &[f32]),
    images: std::ops::Range<usize>,
    (co, ci): (usize, usize),
    t: usize,
    acc: *mut f32,
) {
    use std::arch::x86_64::*;
    let oc = 16 * V;
    let (k, s) = (d.g.k, d.g.stride);
    let (ki, kj) = (t / k, t % k);
    let (lo, hi, first) = d.columns(kj);
    let mut sums: [[__m512; V]; T] =
        std::array::from_fn(|j| std::array::from_fn(|q| _mm512_loadu_ps(acc.add(j * oc + q * 16))));
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
            _mm512_storeu_ps(acc.add(j * oc + q * 16), a);
        }
    }
}
