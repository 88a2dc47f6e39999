//! What the processor offers, for the benchmarks to report beside their figures.

/// The widest x86 vector instruction set of this CPU that the kernels dispatching at run time use
/// (the gemm behind the convolutions and matmuls, the JPEG decoder, the resizer): `avx512`
/// (AVX-512 F/BW/DQ/VL), `avx2` (with FMA) or `baseline`; the architecture's name elsewhere. Our
/// own loops are compiled for the target in `.cargo/config.toml` (AVX2) whatever this says.
pub fn instruction_set() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl")
        {
            return "avx512";
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return "avx2";
        }
        "baseline"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH
    }
}
