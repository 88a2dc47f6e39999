//! What the op tests share: the (device, dtype) cases each op runs on.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

/// Every case an op test covers: the CPU kernels (f32), the reference path inside the op on the
/// CPU (f64, a dtype without a CPU kernel: the route CUDA takes until its kernels land), and f32
/// on CUDA when the build has the feature and a GPU is present.
pub fn cases() -> Vec<(Device, DType)> {
    let mut out = Vec::new();
    for device in trainer::device::available() {
        if device.is_cpu() {
            out.push((device.clone(), DType::F64));
        }
        out.push((device, DType::F32));
    }
    out
}

/// The half-precision cases of an op with CUDA kernels for them: bf16 on CUDA, when the build has
/// the feature and a GPU is present (none otherwise).
pub fn half_cases() -> Vec<(Device, DType)> {
    trainer::device::available()
        .into_iter()
        .filter(|d| !d.is_cpu())
        .map(|d| (d, DType::BF16))
        .collect()
}

/// The tolerance of a comparison with an f32 CPU reference on `device`: CUDA's convolutions may
/// round through TF32.
pub fn tolerance(device: &Device) -> f32 {
    if device.is_cpu() {
        1e-5
    } else {
        2e-3
    }
}

/// The gradients of `sum(y * probe)`: a fixed random weighting of the outputs makes every
/// gradient non-trivial.
pub fn probed(y: &Tensor, probe: &Tensor) -> GradStore {
    (y * probe).unwrap().sum_all().unwrap().backward().unwrap()
}

/// A variable holding `t` on `device` in `dtype`.
pub fn var_on(t: &Tensor, device: &Device, dtype: DType) -> Var {
    Var::from_tensor(&t.to_dtype(dtype).unwrap().to_device(device).unwrap()).unwrap()
}

/// `t` as f32 on the CPU, for comparisons.
pub fn back(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
}

/// The largest absolute difference between `a` and `b` (f32 tensors of one shape).
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}
