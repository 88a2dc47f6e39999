//! Reading a custom op's CUDA arguments, the element types our CUDA kernels and cuDNN calls are
//! instantiated for, and launching our kernels.

use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, Layout, Result, WithDType};

/// A data type the CUDA kernels are instantiated for, and its kernel-name suffix.
pub trait Elem: CudaDType + DeviceRepr + WithDType {
    const SUFFIX: &'static str;
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
}

impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

impl Elem for half::f16 {
    const SUFFIX: &'static str = "f16";
}

/// Runs `$f::<T>($args)` for the [`Elem`] `T` of `$dtype` and wraps its result in `Some`;
/// `Ok(None)` for a dtype without kernels.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*).map(Some),
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*).map(Some),
            candle_core::DType::F16 => $f::<half::f16>($($arg),*).map(Some),
            _ => Ok(None),
        }
    };
}
pub(crate) use by_dtype;

/// The contiguous elements of `s` that `l` covers.
pub fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::msg("a CUDA kernel got a strided argument"))?;
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// Threads per block of our kernels (a multiple of 32, as their block reductions need).
pub const THREADS: u32 = 256;

/// A grid-stride launch over `len` elements.
pub fn elementwise(len: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (len.div_ceil(THREADS as usize).clamp(1, 65_536) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches kernel `$name` of the PTX module `$ptx` (loaded once per device as `$module`) on
/// `$dev`'s stream with `$cfg` and the arguments, which must follow the kernel's signature.
macro_rules! launch {
    (($dev:expr, $module:expr, $ptx:expr), $name:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        let func = $dev.get_or_load_custom_func(&$name, $module, $ptx)?;
        let mut builder = func.builder();
        $(builder.arg($arg);)*
        // SAFETY: the arguments match the kernel's signature in order and type, and the buffers
        // are sized for the dimensions passed with them.
        unsafe { builder.launch($cfg) }.map_err(candle_core::Error::wrap)?;
    }};
}
pub(crate) use launch;
