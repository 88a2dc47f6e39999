//! Choosing the compute device from `--device`.

use anyhow::{bail, Result};
use candle_core::Device;

/// `cpu`, `cuda` or `cuda:N`. CUDA needs a binary built with `--features cuda`.
pub fn parse(name: &str) -> Result<Device> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => bail!("unknown device `{name}`: use cpu, cuda or cuda:N"),
        },
    };
    if !cfg!(feature = "cuda") {
        bail!(
            "this trainer was built without CUDA: rebuild with `cargo build --release --features cuda` \
             (or tools/build-cuda.sh on a machine without a GPU)"
        );
    }
    Ok(Device::new_cuda(ordinal)?)
}
