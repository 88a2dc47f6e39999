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
    Ok(Device::new_cuda(ordinal)?)
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
