//! The in-place update ops (optimiser and EMA) against their tensor-op references, on every
//! device and path, over tensors larger than one parallel chunk.

use super::common;

use candle_core::{DType, Device, Tensor};
use trainer::ops::update::{reference, AdamStep, Blend, Momentum};

const N: usize = 70_000;

/// A smooth, signed test vector on the case's device and dtype.
fn values(scale: f32, phase: f32, (device, dtype): &(Device, DType)) -> Tensor {
    let v: Vec<f32> = (0..N)
        .map(|i| scale * ((i as f32) * 0.37 + phase).sin())
        .collect();
    Tensor::from_vec(v, N, &Device::Cpu)
        .unwrap()
        .to_dtype(*dtype)
        .unwrap()
        .to_device(device)
        .unwrap()
}

/// The largest difference between `updated` (in place) and `expected`, as f32 on the CPU.
fn worst(updated: &Tensor, expected: &Tensor) -> f32 {
    let f = |t: &Tensor| -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    f(updated)
        .iter()
        .zip(f(expected))
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
}

/// A fresh copy of `t` to update in place (so the original stays as the reference's input).
fn copy(t: &Tensor) -> Tensor {
    t.copy().unwrap()
}

#[test]
fn blend_matches_its_reference() {
    for case in common::cases() {
        for square in [false, true] {
            let op = Blend {
                keep: 0.9,
                take: 0.1,
                square,
            };
            let (d, s) = (values(1.0, 0.0, &case), values(0.5, 1.0, &case));
            let expected = reference::blend(&op, &d, &s).unwrap();
            let updated = copy(&d);
            op.apply(&updated, &s).unwrap();
            assert!(
                worst(&updated, &expected) < 1e-6,
                "{case:?} square={square}"
            );
            assert!(worst(&updated, &d) > 1e-3, "the blend changed nothing");
        }
    }
}

#[test]
fn momentum_matches_its_reference_with_and_without_lars() {
    for case in common::cases() {
        for trust in [None, Some(0.02)] {
            let op = Momentum {
                momentum: 0.9,
                decay: 1e-2,
                trust,
            };
            let (m, w, g) = (
                values(0.2, 0.5, &case),
                values(1.0, 0.0, &case),
                values(0.3, 2.0, &case),
            );
            let expected = reference::momentum(&op, &m, &w, &g).unwrap();
            let updated = copy(&m);
            op.apply(&updated, &w, &g).unwrap();
            assert!(
                worst(&updated, &expected) < 1e-6,
                "{case:?} trust={trust:?}"
            );
        }
    }
}

#[test]
fn adam_step_matches_its_reference() {
    for case in common::cases() {
        let op = AdamStep {
            lr: 0.05,
            decay: 1e-2,
            corrections: (0.1, 0.001),
            eps: 1e-8,
        };
        let (w, m) = (values(1.0, 0.0, &case), values(0.1, 1.0, &case));
        let v = (values(0.01, 2.0, &case).sqr().unwrap() + 1e-4).unwrap();
        let expected = reference::adam_step(&op, &w, &m, &v).unwrap();
        let updated = copy(&w);
        op.apply(&updated, &m, &v).unwrap();
        assert!(worst(&updated, &expected) < 1e-5, "{case:?}");
        assert!(worst(&updated, &w) > 1e-3, "the step changed nothing");
    }
}
