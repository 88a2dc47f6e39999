//! The convolution as direct kernels, each written once over a vector type and compiled for
//! AVX-512 and for AVX2 ([`vector`]), for kernels wider than 1x1 with at least 16 input channels
//! and output channels in multiples of 16: the forward of such layers, the input gradient of
//! stride-1 ones (the forward of their transposed layer, `Dims::transposed`), and their weight
//! gradient where no patch matrix is gathered for the input gradient anyway.
//!
//! The forward tiles by images where the output channels come in multiples of 64 and the planes
//! are small ([`images`]: the late stages), and by runs of pixels along an output row otherwise
//! ([`rows`]: the early stages, on wide planes); the weight gradient tiles by input
//! channels ([`weights`]). Every result is one chain of fused multiply-adds in a fixed order,
//! so it does not depend on the thread count, nor on the instruction set.

use rayon::prelude::*;
use shared::cpu::Isa;

use super::{transpose, Dims};
use crate::ops::cpu_storage::zeros;

/// Runs `$body` with the const `$n` equal to `$len`, which must be one of the literals listed:
/// a tile's length as a const generic argument.
macro_rules! by_length {
    ($len:expr, [$($t:literal),*], |$n:ident| $body:expr) => {
        match $len {
            $($t => {
                const $n: usize = $t;
                $body
            })*
            len => unreachable!("conv: a direct tile of length {len}"),
        }
    };
}

mod images;
mod rows;
mod vector;
mod weights;

/// Floats of accumulators or output gradients kept in the L2 cache while a task's tiles pass
/// over them: 256 KiB, a quarter of a Zen 4 core's L2 cache.
const STAGED: usize = 64 * 1024;

/// Output widths from which layers with output channels in multiples of 64 also take row
/// tiles: on 16x16 planes they beat the image tiles (by 12% on 64 channels, 64 images, 2
/// threads); on 8x8 planes, where the image tiles skip more of the padding's taps, they lose.
const ROW_TILES_FROM: usize = 16;

/// Whether the forward of `d` runs here on `isa`.
pub(super) fn applies(isa: Isa, d: &Dims) -> bool {
    cfg!(target_arch = "x86_64")
        && (isa.is_avx512() || isa.is_avx2())
        && d.c_out.is_multiple_of(16)
        && d.c >= 16
        && d.g.k > 1
}

/// `y [n, c_out, ho, wo]` for `x [n, c, h, w]` and `weight [c_out, c, k, k]`; only where
/// [`applies`] says so.
pub(super) fn forward(isa: Isa, d: &Dims, x: &[f32], weight: &[f32]) -> Vec<f32> {
    assert!(applies(isa, d), "{NEEDS}");
    if d.c_out.is_multiple_of(images::OC) && d.wo < ROW_TILES_FROM {
        images::forward(isa, d, x, weight)
    } else {
        rows::forward(isa, d, x, weight)
    }
}

/// `dweight [c_out, c, k, k]` for `x [n, c, h, w]` and `dy [n, c_out, ho, wo]`; only where
/// [`applies`] says so.
pub(super) fn weight_gradient(isa: Isa, d: &Dims, x: &[f32], dy: &[f32]) -> Vec<f32> {
    assert!(applies(isa, d), "{NEEDS}");
    weights::weight_gradient(isa, d, x, dy)
}

/// What [`applies`] asks of a layer.
const NEEDS: &str =
    "conv: the direct kernels need AVX2 or AVX-512, c_out % 16 == 0, c_in >= 16 and k > 1";

/// Output channels per block of a layer with `c_out` of them (a multiple of 16): 64, 32 or 16,
/// the widest that divides.
fn block_width(c_out: usize) -> usize {
    [64, 32, 16]
        .into_iter()
        .find(|&b| c_out.is_multiple_of(b))
        .unwrap_or(16)
}

/// `planes [n, c, len]` as `[n, len, c]`.
fn pixel_major(isa: Isa, planes: &[f32], c: usize, len: usize) -> Vec<f32> {
    let mut out = zeros(planes.len());
    out.par_chunks_mut(c * len)
        .zip(planes.par_chunks(c * len))
        .for_each(|(dst, src)| transpose(isa, src, c, len, dst));
    out
}
