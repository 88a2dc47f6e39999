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

/// `count` tensors of different sizes (1 to a few thousand elements), from a fixed seed.
fn tensors(count: usize, seed: f32, case: &(Device, DType)) -> Vec<Tensor> {
    (0..count)
        .map(|i| {
            let n = 1 + (i * 997) % 4_000;
            let v: Vec<f32> = (0..n)
                .map(|j| ((j as f32) * 0.37 + seed + i as f32).sin())
                .collect();
            Tensor::from_vec(v, n, &Device::Cpu)
                .unwrap()
                .to_dtype(case.1)
                .unwrap()
                .to_device(&case.0)
                .unwrap()
        })
        .collect()
}

/// The multi-tensor updates (over more tensors than one GPU launch takes, some exempt from
/// decay and LARS) against the per-tensor ops on the CPU, on every case.
#[test]
fn multi_tensor_updates_match_the_per_tensor_ops() {
    use trainer::ops::update::{adam_steps, blends, momentum_steps, Param};
    let cpu = (Device::Cpu, DType::F32);
    let count = 40;
    let exempt = |i: usize| i.is_multiple_of(3);
    let adam = AdamStep {
        lr: 0.01,
        decay: 0.0,
        corrections: (0.1, 0.002),
        eps: 1e-8,
    };
    let run = |case: &(Device, DType), rule: &str| -> Vec<Tensor> {
        let (w, m, g, v) = (
            tensors(count, 0.0, case),
            tensors(count, 1.0, case),
            tensors(count, 2.0, case),
            tensors(count, 3.0, case)
                .iter()
                .map(|t| t.abs().unwrap())
                .collect::<Vec<_>>(),
        );
        let params: Vec<Param> = (0..count)
            .map(|i| Param {
                w: &w[i],
                first: &m[i],
                second: Some(&v[i]),
                g: &g[i],
                decay: if exempt(i) { 0.0 } else { 0.01 },
                lars: !exempt(i),
            })
            .collect();
        match rule {
            "lars" => momentum_steps(&params, 0.9, Some(0.001), 0.5).map(|_| ()),
            "sgd" => momentum_steps(&params, 0.9, None, 0.5).map(|_| ()),
            "adamw" => adam_steps(&params, (0.9, 0.999), &adam).map(|_| ()),
            _ => {
                let pairs: Vec<_> = (0..count).map(|i| (&w[i], &g[i])).collect();
                let op = Blend {
                    keep: 0.99,
                    take: 0.01,
                    square: false,
                };
                blends(&pairs, &op).map(|_| ())
            }
        }
        .unwrap();
        [w, m, v].concat()
    };
    for rule in ["lars", "sgd", "adamw", "ema"] {
        // The CPU's per-tensor kernels, written out op by op.
        let (w, m, g, v) = (
            tensors(count, 0.0, &cpu),
            tensors(count, 1.0, &cpu),
            tensors(count, 2.0, &cpu),
            tensors(count, 3.0, &cpu)
                .iter()
                .map(|t| t.abs().unwrap())
                .collect::<Vec<_>>(),
        );
        for i in 0..count {
            let decay = if exempt(i) { 0.0 } else { 0.01 };
            match rule {
                "lars" | "sgd" => {
                    let trust = (rule == "lars" && !exempt(i)).then_some(0.001);
                    let momentum = Momentum {
                        momentum: 0.9,
                        decay,
                        trust,
                    };
                    momentum.apply(&m[i], &w[i], &g[i]).unwrap();
                    let step = Blend {
                        keep: 1.0,
                        take: -0.5,
                        square: false,
                    };
                    step.apply(&w[i], &m[i]).unwrap();
                }
                "adamw" => {
                    let moment = |keep: f64, square| Blend {
                        keep,
                        take: 1.0 - keep,
                        square,
                    };
                    moment(0.9, false).apply(&m[i], &g[i]).unwrap();
                    moment(0.999, true).apply(&v[i], &g[i]).unwrap();
                    AdamStep { decay, ..adam }
                        .apply(&w[i], &m[i], &v[i])
                        .unwrap();
                }
                _ => Blend {
                    keep: 0.99,
                    take: 0.01,
                    square: false,
                }
                .apply(&w[i], &g[i])
                .unwrap(),
            }
        }
        let expected = [w, m, v].concat();
        for case in common::cases() {
            for (i, (got, want)) in run(&case, rule).iter().zip(&expected).enumerate() {
                let d = worst(got, want);
                assert!(d < 1e-5, "{rule} on {case:?}: tensor {i} off by {d}");
            }
        }
    }
}
