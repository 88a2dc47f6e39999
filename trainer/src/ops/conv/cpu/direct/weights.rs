//! The direct weight gradient. A tile is part of a block of 16, 32 or 64 output channels
//! (`super::vector::part`: up to 64 on AVX-512, 16 on AVX2) by as many input channels of one tap
//! as the set's registers hold (`super::vector::tiles`), summed in registers over a chunk of
//! images and every output pixel whose input pixel lies inside the image. Tasks are (block,
//! tap, input channels, image chunk); the chunks' sums are added in order, and chunks are a
//! fixed number of images, so the result depends neither on the thread count nor on the
//! instruction set.

use rayon::prelude::*;
use shared::cpu::Isa;

use super::super::{transpose, Dims};
use super::vector::{on_vectors, part, tiles, Vector};
use super::{block_width, pixel_major, STAGED};

/// Input channels per task.
const TASK_CHANNELS: usize = 48;
/// Images per task: enough tasks to share among the threads when a layer has few taps and
/// channels.
const TASK_IMAGES: usize = 32;

/// `dweight [c_out, c, k, k]` for `x [n, c, h, w]` and `dy [n, c_out, ho, wo]`, `c_out` a
/// multiple of 16 and the CPU with AVX2 or AVX-512 (checked by the caller,
/// `super::weight_gradient`).
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
            // SAFETY: the caller checked that `isa` is AVX2 or AVX-512; `task` asserts its
            // buffers' sizes.
            unsafe {
                task(isa, d, oc, (&x, &dy), (block, t, c0), images, &mut rows)
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
    // Each block's tiles (tap-major, then channel chunks, as `tasks`) laid out as `[c, k*k, oc]`
    // and transposed into the block's rows of `dweight`, `[oc, c, k*k]`: element by element,
    // the writes would fall on few cache sets where the rows are a multiple of 2 KiB apart.
    let c_tasks = d.c.div_ceil(TASK_CHANNELS);
    let per_block = taps * c_tasks;
    let row_len = d.c * taps;
    let mut dw = vec![0f32; d.c_out * row_len];
    dw.par_chunks_mut(oc * row_len)
        .zip(rows.par_chunks(per_block))
        .for_each(|(dst, tiles)| {
            let mut staged = vec![0f32; row_len * oc];
            for (tile, rows) in tiles.iter().enumerate() {
                let (t, c0) = (tile / c_tasks, tile % c_tasks * TASK_CHANNELS);
                for (i, row) in rows.chunks_exact(oc).enumerate() {
                    staged[((c0 + i) * taps + t) * oc..][..oc].copy_from_slice(row);
                }
            }
            transpose(isa, &staged, row_len, oc, dst);
        });
    dw
}

on_vectors! {
    /// Rows `c0..c0 + rows.len() / oc` of one tap's weight gradient for output channels
    /// `block * oc..`, summed over `images`, into `rows` (`[channels, oc]`), from channels-last
    /// `x [n, h, w, c]` and `dy [n, ho, wo, c_out]`.
    unsafe fn task<V>(
        d: &Dims,
        oc: usize,
        data: (&[f32], &[f32]),
        at: (usize, usize, usize),
        images: std::ops::Range<usize>,
        rows: &mut [f32],
    ) {
        let ((x, dy), (block, t, c0)) = (data, at);
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
        let part = part::<V>(oc);
        let vectors = part / V::LANES;
        // Images per pass over the tiles: their block of dY stays in the L2 cache while every
        // tile reads it.
        let per_pass = (STAGED / (oc * d.hw()).max(1)).max(1);
        for start in images.clone().step_by(per_pass) {
            let pass = start..(start + per_pass).min(images.end);
            for p0 in (0..oc).step_by(part) {
                for run in tiles::<V>(channels, vectors) {
                    let (first, end) = (run.start, run.end);
                    let len = end - first;
                    let acc = Rows {
                        at: rows[first * oc + p0..].as_mut_ptr(),
                        stride: oc,
                    };
                    let at = (block * oc + p0, c0 + first);
                    let (pass, data) = (pass.clone(), (x, dy));
                    // SAFETY (each call): the tile's channels and output channels lie inside
                    // `x`'s and `dy`'s pixels (asserted above); its accumulators are columns
                    // `p0..p0 + part` of rows `first..end` of `rows`.
                    match vectors {
                        1 => by_length!(
                            len,
                            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
                            |T| sums::<V, T, 1>(d, data, pass, at, t, acc)
                        ),
                        2 => by_length!(len, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], |T| {
                            sums::<V, T, 2>(d, data, pass, at, t, acc)
                        }),
                        _ => by_length!(len, [1, 2, 3, 4, 5, 6], |T| sums::<V, T, 4>(
                            d, data, pass, at, t, acc
                        )),
                    }
                }
            }
        }
    }
}

/// A tile's accumulators: rows `stride` floats apart from `at`.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Rows {
    at: *mut f32,
    stride: usize,
}

/// `acc[j][o] += sum over images and valid output pixels of x[.., input pixel, ci + j] *
/// dy[.., pixel, co + o]` for tap `t`, `acc` being `T` rows of `N` vectors.
///
/// # Safety
/// The CPU must have the set `V` belongs to; `images` must be inside the batch,
/// `co + N * LANES <= c_out`, `ci + T <= c`, and `acc` must hold `T` rows of `N * LANES`
/// values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sums<V: Vector, const T: usize, const N: usize>(
    d: &Dims,
    (x, dy): (&[f32], &[f32]),
    images: std::ops::Range<usize>,
    (co, ci): (usize, usize),
    t: usize,
    acc: Rows,
) {
    let lanes = V::LANES;
    let (k, s) = (d.g.k, d.g.stride);
    let (ki, kj) = (t / k, t % k);
    let (lo, hi, first) = d.columns(kj);
    let (top, bottom, first_row) = d.rows(ki);
    let mut sums: [[V; N]; T] = std::array::from_fn(|j| {
        std::array::from_fn(|q| V::load(acc.at.add(j * acc.stride + q * lanes)))
    });
    // No output pixel reads this tap inside the image: nothing to add.
    let images = if lo < hi && top < bottom {
        images
    } else {
        0..0
    };
    for image in images {
        // The tap's first output pixel inside the image, and its input pixel; from row to row
        // both move by fixed strides.
        let mut g_row = dy[((image * d.ho + top) * d.wo + lo) * d.c_out + co..].as_ptr();
        let mut v_row = x[((image * d.h + first_row) * d.w + first) * d.c + ci..].as_ptr();
        for _ in top..bottom {
            let (mut g, mut v) = (g_row, v_row);
            for _ in lo..hi {
                let grads: [V; N] = std::array::from_fn(|q| V::load(g.add(q * lanes)));
                for (j, sum) in sums.iter_mut().enumerate() {
                    let value = V::splat(*v.add(j));
                    for (a, &gv) in sum.iter_mut().zip(&grads) {
                        *a = a.mul_add(value, gv);
                    }
                }
                // (Wrapping: past the last pixel these point outside the buffers, unread.)
                g = g.wrapping_add(d.c_out);
                v = v.wrapping_add(s * d.c);
            }
            g_row = g_row.wrapping_add(d.wo * d.c_out);
            v_row = v_row.wrapping_add(s * d.w * d.c);
        }
    }
    for (j, sum) in sums.iter().enumerate() {
        for (q, &a) in sum.iter().enumerate() {
            a.store(acc.at.add(j * acc.stride + q * lanes));
        }
    }
}
