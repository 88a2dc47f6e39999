//! The processor's vector instruction sets, and our own kernels compiled for each of them.
//!
//! The workspace is compiled for x86-64-v2 (SSE4.2, `.cargo/config.toml`), so its binaries run on
//! any x86-64 server of the last fifteen years. The hot loops are written once with
//! [`multiversion!`](crate::multiversion), which compiles each of them three times (portable,
//! AVX2 + FMA, AVX-512) and runs the copy chosen by an [`Isa`] value: [`Isa::active`], the widest
//! set this CPU has unless `MASKDEEP_ISA` names a narrower one. The crates that dispatch on their
//! own (gemm behind the convolutions and matmuls, the JPEG decoder, the resizer) keep choosing
//! the widest set themselves.
//!
//! The copies differ only in the instructions the compiler may use: none of the kernels lets it
//! reorder floating-point sums, so every copy gives the same bits (the tests check this).

use std::sync::OnceLock;

/// The environment variable that narrows the kernels' instruction set: `portable`, `avx2` or
/// `avx512`. A set the CPU lacks, or an unknown name, is reported once on stderr and ignored.
pub const ISA_VAR: &str = "MASKDEEP_ISA";

/// An instruction set that this CPU runs. Only [`Isa::active`], [`Isa::supported`] and
/// [`Isa::PORTABLE`] make one, so a kernel given an `Isa` can always execute it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Isa(Level);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Level {
    Portable,
    Avx2,
    Avx512,
}

impl Level {
    const ALL: [Level; 3] = [Level::Portable, Level::Avx2, Level::Avx512];

    fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    /// The widest level this CPU runs.
    fn detect() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            let v3 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("bmi1")
                && is_x86_feature_detected!("bmi2")
                && is_x86_feature_detected!("lzcnt")
                && is_x86_feature_detected!("movbe")
                && is_x86_feature_detected!("f16c");
            let v4 = v3
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512cd")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl");
            if v4 {
                return Level::Avx512;
            }
            if v3 {
                return Level::Avx2;
            }
        }
        Level::Portable
    }
}

impl Isa {
    /// The compiler's baseline for the target: runs everywhere.
    pub const PORTABLE: Isa = Isa(Level::Portable);

    /// The widest set this CPU runs.
    pub fn widest() -> Isa {
        static WIDEST: OnceLock<Level> = OnceLock::new();
        Isa(*WIDEST.get_or_init(Level::detect))
    }

    /// Every set this CPU runs, narrowest first.
    pub fn supported() -> Vec<Isa> {
        let widest = Isa::widest().0;
        Level::ALL
            .into_iter()
            .filter(|&l| l <= widest)
            .map(Isa)
            .collect()
    }

    /// The set the kernels use in this process: [`Isa::widest`], or the narrower one that
    /// `MASKDEEP_ISA` names. Read once.
    pub fn active() -> Isa {
        static ACTIVE: OnceLock<Isa> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let widest = Isa::widest();
            let Some(asked) = std::env::var_os(ISA_VAR) else {
                return widest;
            };
            let asked = asked.to_string_lossy();
            match Level::ALL.into_iter().find(|l| l.name() == asked) {
                Some(level) if level <= widest.0 => Isa(level),
                Some(_) => {
                    eprintln!(
                        "warning: {ISA_VAR}={asked}: this CPU lacks it; using {}",
                        widest.name()
                    );
                    widest
                }
                None => {
                    eprintln!(
                        "warning: {ISA_VAR}={asked} is not one of portable, avx2, avx512; using {}",
                        widest.name()
                    );
                    widest
                }
            }
        })
    }

    /// `portable`, `avx2` or `avx512`.
    pub fn name(self) -> &'static str {
        self.0.name()
    }

    /// Whether this is AVX-512 (F, BW, CD, DQ, VL, with everything AVX2 implies).
    pub fn is_avx512(self) -> bool {
        self.0 == Level::Avx512
    }

    /// Whether this is AVX2 with FMA (x86-64-v3).
    pub fn is_avx2(self) -> bool {
        self.0 == Level::Avx2
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Defines a kernel compiled for every [`Isa`]: the function gets a first parameter
/// `isa: Isa` and runs the body compiled for that set. The body is written once, in plain Rust
/// that the compiler can vectorise; parameters are plain `name: Type` pairs, without generics.
///
/// ```
/// shared::multiversion! {
///     /// `dst += a * src`.
///     pub fn axpy(dst: &mut [f32], a: f32, src: &[f32]) {
///         for (d, s) in dst.iter_mut().zip(src) {
///             *d += a * s;
///         }
///     }
/// }
/// let mut y = [1.0, 2.0];
/// axpy(shared::cpu::Isa::active(), &mut y, 2.0, &[1.0, 1.0]);
/// assert_eq!(y, [3.0, 4.0]);
/// ```
#[macro_export]
macro_rules! multiversion {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$attr])*
        $vis fn $name(isa: $crate::cpu::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,movbe,f16c")]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                portable($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(
                enable = "avx512f,avx512bw,avx512cd,avx512dq,avx512vl,avx2,fma,bmi1,bmi2,lzcnt,movbe,f16c"
            )]
            fn avx512($($arg: $ty),*) $(-> $ret)? {
                portable($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            {
                if isa.is_avx512() {
                    // SAFETY: an `Isa` says AVX-512 only where the CPU was found to have it.
                    return unsafe { avx512($($arg),*) };
                }
                if isa.is_avx2() {
                    // SAFETY: an `Isa` says AVX2 only where the CPU was found to have it.
                    return unsafe { avx2($($arg),*) };
                }
            }
            let _ = isa;
            portable($($arg),*)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_sets_run_from_portable_to_the_widest() {
        let sets = Isa::supported();
        assert_eq!(sets.first(), Some(&Isa::PORTABLE));
        assert_eq!(sets.last(), Some(&Isa::widest()));
        assert!(sets.windows(2).all(|w| w[0] < w[1]));
        assert!(sets.contains(&Isa::active()));
    }

    crate::multiversion! {
        /// Sums in order, so every copy gives the same bits.
        fn scaled_sum(xs: &[f32], scale: f32) -> f32 {
            xs.iter().fold(0.0, |acc, &x| acc + x * scale)
        }
    }

    #[test]
    fn every_copy_of_a_kernel_gives_the_portable_bits() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let want = scaled_sum(Isa::PORTABLE, &xs, 1.3);
        for isa in Isa::supported() {
            assert_eq!(scaled_sum(isa, &xs, 1.3).to_bits(), want.to_bits(), "{isa}");
        }
    }
}
