//! The direct forward on wide planes: layers whose output channels come in multiples of 16 but
//! not of 64 (the narrow early stages of small ResNets), and any layer whose output rows are
//! long (`super::ROW_TILES_FROM`). A tile is a run of up to [`WIDEST`] output pixels along one
//! output row by one block of 16, 32 or 64 output channels: its accumulators stay in registers
//! through every tap and input channel, where the image tiles (`super::images`) stage theirs in
//! the L2 cache. Each image is copied zero-padded and channels-last, so a tile reads every tap
//! without bounds checks; the overhanging taps it multiplies by zeros are few on wide planes.
//! Each output is one chain of fused multiply-adds in a fixed order (taps, then input
//! channels), so it does not depend on the thread count.

use rayon::prelude::*;
use shared::cpu::Isa;

use super::super::{channels_last, grown, transpose, with_scratch, Dims};
use super::block_width;
use crate::ops::cpu_storage::zeros;

/// Output pixels per tile for 1, 2 or 4 vectors (16, 32 or 64 output channels) a pixel: 16, 24
/// and 24 accumulator registers of AVX-512's 32.
const WIDEST: [usize; 5] = [0, 16, 12, 0, 6];

/// `y [n, c_out, ho, wo]` for `x [n, c, h, w]` and `weight [c_out, c, k, k]`, `c_out` a multiple
/// of 16 and the CPU with AVX-512 (checked by the caller, `super::forward`).
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
                // SAFETY: the caller checked that the CPU has AVX-512; `image_avx512` asserts
                // its buffers' sizes.
                unsafe {
                    image_avx512(d, oc, padded, &packed, staged)
                };
                transpose(isa, staged, hw, d.c_out, y);
            })
        });
    out
}

/// One image's output `[ho * wo, c_out]` (pixel-major) into `y`, from its zero-padded
/// channels-last copy `padded [h + 2p, w + 2p, c]` and the weight packed by [`forward`].
///
/// # Safety
/// The CPU must have AVX-512 (F).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn image_avx512(d: &Dims, oc: usize, padded: &[f32], packed: &[f32], y: &mut [f32]) {
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
    let vectors = oc / 16;
    let widest = WIDEST[vectors];
    // Each output row split into tiles of near-equal length.
    let tiles = d.wo.div_ceil(widest);
    for (block, weights) in packed.chunks_exact(k * k * c * oc).enumerate() {
        for oh in 0..d.ho {
            for tile in 0..tiles {
                let (first, end) = (tile * d.wo / tiles, (tile + 1) * d.wo / tiles);
                let x = padded[(oh * s * wp + first * s) * c..].as_ptr();
                let out = y[(oh * d.wo + first) * d.c_out + block * oc..].as_mut_ptr();
                let tile = Tile {
                    x,
                    row: wp * c,
                    step: s * c,
                    c,
                    k,
                    w: weights.as_ptr(),
                    out,
                    out_stride: d.c_out,
                };
                // SAFETY (each call): the tile's pixels `first..end` of row `oh` read padded
                // rows `oh * s..oh * s + k` and columns up to `(end - 1) * s + k` (asserted
                // inside `padded` above); its outputs are `end - first` pixels of `oc`
                // channels inside `y`.
                let len = end - first;
                match vectors {
                    1 => by_length!(
                        len,
                        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
                        |T| tile.run::<T, 1>()
                    ),
                    2 => by_length!(len, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], |T| tile
                        .run::<T, 2>()),
                    _ => by_length!(len, [1, 2, 3, 4, 5, 6], |T| tile.run::<T, 4>()),
                }
            }
        }
    }
}

/// One tile's addresses: its first pixel's input (padded row `oh * s`, column `first * s`,
/// channel 0), the strides between padded rows and between the tile's pixels, the block's packed
/// weight `[k*k, c, oc]`, and its first output (pixel `first` of row `oh`, the block's first
/// channel), pixels `out_stride` apart.
#[cfg(target_arch = "x86_64")]
struct Tile {
    x: *const f32,
    row: usize,
    step: usize,
    c: usize,
    k: usize,
    w: *const f32,
    out: *mut f32,
    out_stride: usize,
}

#[cfg(target_arch = "x86_64")]
impl Tile {
    /// `T` pixels by `V` vectors of output channels.
    ///
    /// # Safety
    /// The CPU must have AVX-512 (F), and every address the tile reads or writes must be inside
    /// its buffer.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn run<const T: usize, const V: usize>(&self) {
        use std::arch::x86_64::*;
        let oc = 16 * V;
        let mut sums = [[_mm512_setzero_ps(); V]; T];
        for ki in 0..self.k {
            for kj in 0..self.k {
                let x = self.x.add(ki * self.row + kj * self.c);
                let w = self.w.add((ki * self.k + kj) * self.c * oc);
                for i in 0..self.c {
                    let weights: [__m512; V] =
                        std::array::from_fn(|v| _mm512_loadu_ps(w.add(i * oc + v * 16)));
                    for (t, sum) in sums.iter_mut().enumerate() {
                        let value = _mm512_set1_ps(*x.add(t * self.step + i));
                        for (a, &wv) in sum.iter_mut().zip(&weights) {
                            *a = _mm512_fmadd_ps(value, wv, *a);
                        }
                    }
                }
            }
        }
        for (t, sum) in sums.iter().enumerate() {
            for (v, &a) in sum.iter().enumerate() {
                _mm512_storeu_ps(self.out.add(t * self.out_stride + v * 16), a);
            }
        }
    }
}
