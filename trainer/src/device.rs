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

/// The default memory pool of `device`'s GPU: the stream-ordered pool Candle allocates from.
#[cfg(feature = "cuda")]
fn memory_pool(
    device: &Device,
) -> Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    let context = device.as_cuda_device()?.cuda_stream().context().clone();
    context.bind_to_thread().map_err(pool_error)?;
    let mut pool = std::ptr::null_mut();
    // SAFETY: the driver writes the pool handle before it is used.
    unsafe {
        candle_core::cuda_backend::cudarc::driver::sys::cuDeviceGetDefaultMemPool(
            &mut pool,
            context.cu_device(),
        )
        .result()
        .map_err(pool_error)?;
    }
    Ok(pool)
}

#[cfg(feature = "cuda")]
fn pool_error(e: candle_core::cuda_backend::cudarc::driver::DriverError) -> Error {
    Error::Device(format!("CUDA memory pool: {e:?}"))
}

/// Sets the u64 attribute `attr` of `device`'s memory pool to `value`.
#[cfg(feature = "cuda")]
fn set_pool_attribute(
    device: &Device,
    attr: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
    mut value: u64,
) -> Result<()> {
    let pool = memory_pool(device)?;
    // SAFETY: the pool's release threshold and used-memory high watermark are u64 attributes.
    unsafe {
        candle_core::cuda_backend::cudarc::driver::sys::cuMemPoolSetAttribute(
            pool,
            attr,
            (&mut value as *mut u64).cast(),
        )
        .result()
        .map_err(pool_error)
    }
}

/// Makes the GPU's memory pool keep freed memory for reuse (as PyTorch's caching allocator does)
/// instead of handing it back to the driver at every synchronisation, which its default release
/// threshold of 0 does.
#[cfg(feature = "cuda")]
fn keep_freed_memory(device: &Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
    set_pool_attribute(device, A::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX)
}

/// Declares that only the calling thread will use `device` from now on, so that its GPU work
/// all goes to one stream (Candle gives each thread its own): cudarc then stops recording and
/// waiting on an event for every allocation and every use, which orders work across streams
/// and costs host time on each op. Tensors made before the call keep their events. Not for
/// `--ranks` on a GPU, whose threads share the device. Nothing on the CPU.
pub fn drive_from_this_thread_only(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        // SAFETY: the caller promises that one thread, hence one stream, uses the device, so no
        // work needs ordering across streams.
        unsafe { cuda.disable_event_tracking() };
    }
    let _ = device;
}

/// Starts measuring the peak of device memory in use (see [`peak_memory`]); nothing on the CPU.
pub fn reset_peak_memory(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        return set_pool_attribute(device, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0);
    }
    let _ = device;
    Ok(())
}

/// The most GPU memory in use at once since [`reset_peak_memory`], in bytes (PyTorch's
/// `torch.cuda.max_memory_allocated`); `None` on the CPU.
pub fn peak_memory(device: &Device) -> Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let pool = memory_pool(device)?;
        let mut value = 0u64;
        // SAFETY: the used-memory high watermark is a u64 attribute.
        unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut value as *mut u64).cast(),
            )
            .result()
            .map_err(pool_error)?;
        }
        return Ok(Some(value));
    }
    let _ = device;
    Ok(None)
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
