//! Choosing the compute device from `--device`.

use crate::error::{Error, Result};
use candle_core::Device;

/// `cpu`, `cuda` or `cuda:N`. CUDA needs a binary built with `--features cuda`.
pub fn parse(name: &str) -> Result<Device> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(Error::Device(format!(
                    "unknown device `{name}`: use cpu, cuda or cuda:N"
                )))
            }
        },
    };
    if !cfg!(feature = "cuda") {
        return Err(Error::Device(
            "this trainer was built without CUDA: rebuild with `cargo build --release --features cuda` \
             (or tools/build-cuda.sh on a machine without a GPU)"
                .into(),
        ));
    }
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    keep_freed_memory(&device)?;
    Ok(device)
}

/// Makes the GPU's stream-ordered memory pool, from which Candle allocates, keep freed memory
/// for reuse (as PyTorch's caching allocator does) instead of handing it back to the driver at
/// every synchronisation, which its default release threshold of 0 does.
#[cfg(feature = "cuda")]
fn keep_freed_memory(device: &Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let driver = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
        Error::Device(format!("CUDA memory pool: {e:?}"))
    };
    let context = device.as_cuda_device()?.cuda_stream().context().clone();
    context.bind_to_thread().map_err(driver)?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: the pool pointer is written by the driver before it is used, and the attribute's
    // value is the u64 the driver expects for the release threshold.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device())
            .result()
            .map_err(driver)?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(driver)?;
    }
    Ok(())
}

/// The devices the tests run each op on: always the CPU, and the first GPU when the binary was
/// built with the `cuda` feature and one is present (saying on stderr when it is skipped).
pub fn available() -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    if !cfg!(feature = "cuda") {
        eprintln!("CUDA skipped: built without the `cuda` feature");
        return devices;
    }
    match Device::new_cuda(0) {
        Ok(d) => devices.push(d),
        Err(e) => eprintln!("CUDA skipped: no GPU ({e})"),
    }
    devices
}
