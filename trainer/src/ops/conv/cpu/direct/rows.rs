//! The direct forward on wide planes: layers whose output channels come in multiples of 16 but
//! not of 64 (the narrow early stages of small ResNets), and any layer whose output rows are
//! long (`super::ROW_TILES_FROM`). A tile is a run of output pixels along one output row by
//! part of a block of 16, 32 or 64 output channels (`super::vector::part`: up to 64 on AVX-512,
//! 16 on AVX2), as many pixels as the set's registers hold (`super::vector::tiles`). Its sums
//! stay in registers through every tap and input channel, where the image tiles
//! (`super::images`) stage theirs in the L2 cache. Each image is copied zero-padded and
//! channels-last, so a tile reads every tap without bounds checks; the overhanging taps it
//! multiplies by zeros are few on wide planes. Each output is one chain of fused multiply-adds
//! in a fixed order (taps, then input channels), so it depends neither on the thread count nor
//! on the instruction set.

use rayon::prelude::*;
use shared::cpu::Isa;

use super::super::{channels_last, grown, transpose, with_scratch, Dims};
use super::block_width;
use super::vector::{on_vectors, part, tiles, Vector};
use crate::ops::cpu_storage::zeros;

/// `y [n, c_out, ho, wo]` for `x [n, c, h, w]` and `weight [c_out, c, k, k]`, `c_out` a multiple
/// of 16 and the CPU with AVX2 or AVX-512 (checked by the caller, `super::forward`).
pub(super) fn forward(isa: Isa, d: &Dims, x: &[f32], weight: &[f32]) -> Vec<f32> {
    let (oc, taps, hw) = (block_width(d.c_out), d.g.k * d.g.k, d.hw());
    // [c_out / oc, k*k, c, oc]: for each tap and input channel, a block's output channels side
    // by side.
    let mut packed = vec![0f32; weight.len()];
    packed
        .par_chunks_mut(taps * d.c * oc)
        .enumerate()
        .for_each(|(block, dst)| {
            for (i, v) in dst.iter_mut().enumerate() {
                let (t, ci, o) = (i / (d.c * oc), i / oc % d.c, i % oc);
                *v = weight[((block * oc + o) * d.c + ci) * taps + t];
            }
        });
    let mut out = zeros(d.n * d.c_out * hw);
    out.par_chunks_mut(d.c_out * hw)
        .zip(x.par_chunks(d.c * d.h * d.w))
        .for_each(|(y, img)| {
            with_scratch(|scratch| {
                let padded = channels_last(isa, d, img, &mut scratch.padded);
                let staged = grown(&mut scratch.staged, hw * d.c_out);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the caller checked that `isa` is AVX2 or AVX-512; `image` asserts its
                // buffers' sizes.
                unsafe {
                    image(isa, d, oc, padded, &packed, staged)
                };
                transpose(isa, staged, hw, d.c_out, y);
            })
        });
    out
}

on_vectors! {
    /// One image's output `[ho * wo, c_out]` (pixel-major) into `y`, from its zero-padded
    /// channels-last copy `padded [h + 2p, w + 2p, c]` and the weight packed by [`forward`].
    unsafe fn image<V>(d: &Dims, oc: usize, padded: &[f32], packed: &[f32], y: &mut [f32]) {
        let (k, s, c) = (d.g.k, d.g.stride, d.c);
        let (hp, wp) = d.padded_size();
        assert!(
            padded.len() == hp * wp * c
                && packed.len() == d.c_out * c * k * k
                && y.len() == d.hw() * d.c_out
                && (d.ho - 1) * s + k <= hp
                && (d.wo - 1) * s + k <= wp,
            "conv: direct row-tile buffers of the wrong size"
        );
        let part = part::<V>(oc);
        let vectors = part / V::LANES;
        for (block, weights) in packed.chunks_exact(k * k * c * oc).enumerate() {
            for oh in 0..d.ho {
                for p0 in (0..oc).step_by(part) {
                    for run in tiles::<V>(d.wo, vectors) {
                        let (first, end) = (run.start, run.end);
                        let x = padded[(oh * s * wp + first * s) * c..].as_ptr();
                        let out = y[(oh * d.wo + first) * d.c_out + block * oc + p0..].as_mut_ptr();
                        let tile = Tile {
                            x,
                            row: wp * c,
                            step: s * c,
                            c,
                            k,
                            w: weights[p0..].as_ptr(),
                            oc,
                            out,
                            out_stride: d.c_out,
                        };
                        // SAFETY (each call): the tile's pixels `first..end` of row `oh` read
                        // padded rows `oh * s..oh * s + k` and columns up to `(end - 1) * s + k`
                        // (asserted inside `padded` above); its outputs are `end - first` pixels
                        // of `part` channels inside `y`, and its weights `part` columns of the
                        // block's `oc`.
                        let len = end - first;
                        match vectors {
                            1 => by_length!(
                                len,
                                [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
                                |T| tile.run::<V, T, 1>()
                            ),
                            2 => by_length!(len, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], |T| tile
                                .run::<V, T, 2>()),
                            _ => by_length!(len, [1, 2, 3, 4, 5, 6], |T| tile.run::<V, T, 4>()),
                        }
                    }
                }
            }
        }
    }
}

/// One tile's addresses: its first pixel's input (padded row `oh * s`, column `first * s`,
/// channel 0), the strides between padded rows and between the tile's pixels, its first column
/// of the block's packed weight `[k*k, c, oc]`, and its first output (pixel `first` of row `oh`,
/// the part's first channel), pixels `out_stride` apart.
#[cfg(target_arch = "x86_64")]
struct Tile {
    x: *const f32,
    row: usize,
    step: usize,
    c: usize,
    k: usize,
    w: *const f32,
    oc: usize,
    out: *mut f32,
    out_stride: usize,
}

#[cfg(target_arch = "x86_64")]
impl Tile {
    /// `T` pixels by `N` vectors of output channels.
    ///
    /// # Safety
    /// The CPU must have the set `V` belongs to, and every address the tile reads or writes must
    /// be inside its buffer.
    #[inline(always)]
    unsafe fn run<V: Vector, const T: usize, const N: usize>(&self) {
        let lanes = V::LANES;
        let mut sums = [[V::splat(0.0); N]; T];
        for ki in 0..self.k {
            for kj in 0..self.k {
                let x = self.x.add(ki * self.row + kj * self.c);
                let w = self.w.add((ki * self.k + kj) * self.c * self.oc);
                for i in 0..self.c {
                    let weights: [V; N] =
                        std::array::from_fn(|v| V::load(w.add(i * self.oc + v * lanes)));
                    for (t, sum) in sums.iter_mut().enumerate() {
                        let value = V::splat(*x.add(t * self.step + i));
                        for (a, &wv) in sum.iter_mut().zip(&weights) {
                            *a = a.mul_add(value, wv);
                        }
                    }
                }
            }
        }
        for (t, sum) in sums.iter().enumerate() {
            for (v, &a) in sum.iter().enumerate() {
                a.store(self.out.add(t * self.out_stride + v * lanes));
            }
        }
    }
}
