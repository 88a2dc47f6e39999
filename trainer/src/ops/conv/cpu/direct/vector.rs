//! The vector registers the direct kernels are written with: AVX-512's 16 lanes or AVX2's 8.
//! The kernels are generic over [`Vector`] and inlined into one copy compiled for each set
//! ([`on_vectors`]). A kernel's sums run in the same order on both sets (each output is one chain
//! of fused multiply-adds over the same terms), so AVX2 and AVX-512 give the same bits.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// A vector of f32 lanes and the operations the direct kernels use. Every method needs the CPU
/// to have the set the type belongs to, and the pointers to cover [`Vector::LANES`] floats.
pub(super) trait Vector: Copy {
    /// Floats per vector.
    const LANES: usize;
    /// Vectors of output channels a tile spans at most.
    const TILE_VECTORS: usize;
    /// Vector registers a tile may keep its sums in. The others hold a row of the tile's
    /// weights (or output gradients) and the broadcast input value, so that nothing spills.
    const ACCUMULATORS: usize;

    /// Loads `LANES` floats from `from`.
    unsafe fn load(from: *const f32) -> Self;
    /// `value` in every lane.
    unsafe fn splat(value: f32) -> Self;
    /// `self + a * b`, rounded once.
    unsafe fn mul_add(self, a: Self, b: Self) -> Self;
    /// Stores the lanes at `to`.
    unsafe fn store(self, to: *mut f32);
}

#[cfg(target_arch = "x86_64")]
impl Vector for __m512 {
    const LANES: usize = 16;
    const TILE_VECTORS: usize = 4;
    const ACCUMULATORS: usize = 24;

    #[inline(always)]
    unsafe fn load(from: *const f32) -> Self {
        _mm512_loadu_ps(from)
    }
    #[inline(always)]
    unsafe fn splat(value: f32) -> Self {
        _mm512_set1_ps(value)
    }
    #[inline(always)]
    unsafe fn mul_add(self, a: Self, b: Self) -> Self {
        _mm512_fmadd_ps(a, b, self)
    }
    #[inline(always)]
    unsafe fn store(self, to: *mut f32) {
        _mm512_storeu_ps(to, self)
    }
}

#[cfg(target_arch = "x86_64")]
impl Vector for __m256 {
    const LANES: usize = 8;
    const TILE_VECTORS: usize = 2;
    const ACCUMULATORS: usize = 12;

    /// One 32-byte load. (`_mm256_loadu_ps` would compile to two 16-byte halves joined by an
    /// insert: the baseline's generic tuning takes unaligned 32-byte loads to be slow.)
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn load(from: *const f32) -> Self {
        let v: __m256;
        std::arch::asm!(
            "vmovups {v}, ymmword ptr [{from}]",
            v = out(ymm_reg) v,
            from = in(reg) from,
            options(pure, readonly, nostack, preserves_flags)
        );
        v
    }
    #[inline(always)]
    unsafe fn splat(value: f32) -> Self {
        _mm256_set1_ps(value)
    }
    #[inline(always)]
    unsafe fn mul_add(self, a: Self, b: Self) -> Self {
        _mm256_fmadd_ps(a, b, self)
    }
    #[inline(always)]
    unsafe fn store(self, to: *mut f32) {
        _mm256_storeu_ps(to, self)
    }
}

/// Output channels a tile of `V` handles at once out of a block of `block` (16, 32 or 64):
/// 64 on AVX-512, 16 on AVX2 (whose 16 registers then hold six pixels' sums).
pub(super) fn part<V: Vector>(block: usize) -> usize {
    block.min(V::TILE_VECTORS * V::LANES)
}

/// The longest tile (pixels, images or input channels) with `vectors` vectors of sums each.
fn widest<V: Vector>(vectors: usize) -> usize {
    (V::ACCUMULATORS / vectors).min(16)
}

/// `0..len` cut into as few tiles as hold at most [`widest`] each, of near-equal length: a short
/// last tile would hold too few sums to keep the FMA units busy.
pub(super) fn tiles<V: Vector>(
    len: usize,
    vectors: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let count = len.div_ceil(widest::<V>(vectors));
    (0..count).map(move |t| t * len / count..(t + 1) * len / count)
}

/// Defines `$name(isa, args)`, which runs the generic kernel `$body` (over the vector type
/// `$v`) compiled for AVX-512 with `__m512` or for AVX2 with `__m256`, as `isa` says.
///
/// # Safety
/// `isa` must be AVX2 or AVX-512 (an `Isa` names only sets the CPU has), and the body's own
/// conditions must hold.
macro_rules! on_vectors {
    (
        $(#[$attr:meta])*
        unsafe fn $name:ident<$v:ident>($($arg:ident: $ty:ty),* $(,)?) $body:block
    ) => {
        $(#[$attr])*
        #[cfg(target_arch = "x86_64")]
        unsafe fn $name(isa: shared::cpu::Isa, $($arg: $ty),*) {
            #[inline(always)]
            unsafe fn generic<$v: super::vector::Vector>($($arg: $ty),*) $body
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512($($arg: $ty),*) {
                generic::<std::arch::x86_64::__m512>($($arg),*)
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) {
                generic::<std::arch::x86_64::__m256>($($arg),*)
            }
            if isa.is_avx512() {
                avx512($($arg),*)
            } else if isa.is_avx2() {
                avx2($($arg),*)
            } else {
                unreachable!("{}", super::NEEDS)
            }
        }
    };
}
pub(super) use on_vectors;
