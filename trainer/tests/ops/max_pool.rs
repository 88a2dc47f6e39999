//! The stem's max-pool op against a direct loop and against its tensor-op reference, on every
//! device and path.

use super::common;

use candle_core::{DType, Device, Tensor};
use trainer::ops::max_pool::{max_pool_3x3_s2, reference};

#[test]
fn max_pool_matches_a_direct_loop_on_every_device_and_path() {
    let dev = Device::Cpu;
    let mut cases = common::cases();
    cases.extend(common::half_cases());
    for (h, w) in [(8, 8), (7, 9), (1, 2)] {
        // Values a bf16 holds exactly, so that every dtype has the same maxima.
        let x = Tensor::rand(0f32, 1.0, (2, 3, h, w), &dev).unwrap();
        let x = x
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let data: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
        let mut outputs = vec![reference::forward(&x)];
        for (device, dtype) in &cases {
            let (device, dtype) = (device.clone(), *dtype);
            let y = max_pool_3x3_s2(&x.to_dtype(dtype).unwrap().to_device(&device).unwrap());
            outputs.push(y.and_then(|y| y.to_dtype(DType::F32)?.to_device(&dev)));
        }
        for y in outputs {
            let y = y.unwrap();
            assert_eq!(y.dims(), &[2, 3, ho, wo]);
            let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            let mut k = 0;
            for plane in 0..6 {
                for i in 0..ho {
                    for j in 0..wo {
                        let mut best = f32::NEG_INFINITY;
                        for di in 0..3 {
                            for dj in 0..3 {
                                let (r, c) = ((2 * i + di) as isize - 1, (2 * j + dj) as isize - 1);
                                if r >= 0 && c >= 0 && (r as usize) < h && (c as usize) < w {
                                    best =
                                        best.max(data[plane * h * w + r as usize * w + c as usize]);
                                }
                            }
                        }
                        assert_eq!(got[k], best);
                        k += 1;
                    }
                }
            }
        }
    }
}

#[test]
fn max_pool_gradients_agree_on_every_device_and_path() {
    let dev = Device::Cpu;
    for (h, w) in [(8, 8), (7, 9)] {
        // Continuous random values: no ties, so the maximum of each window is unique.
        let x =
            candle_core::Var::from_tensor(&Tensor::rand(0f32, 1.0, (2, 3, h, w), &dev).unwrap())
                .unwrap();
        let probe =
            Tensor::rand(-1f32, 1.0, (2, 3, (h - 1) / 2 + 1, (w - 1) / 2 + 1), &dev).unwrap();
        let grad = |pool: fn(&Tensor) -> candle_core::Result<Tensor>,
                    (x, probe): (&Tensor, &Tensor),
                    (device, dtype): &(Device, DType)|
         -> Vec<f32> {
            let on = |t: &Tensor| t.to_dtype(*dtype).unwrap().to_device(device).unwrap();
            let xd = candle_core::Var::from_tensor(&on(x)).unwrap();
            let grads = (pool(xd.as_tensor()).unwrap() * on(probe))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            grads
                .get(xd.as_tensor())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let inputs = (x.as_tensor(), &probe);
        let views = grad(reference::forward, inputs, &(dev.clone(), DType::F32));
        for case in common::cases() {
            let ours = grad(max_pool_3x3_s2, inputs, &case);
            // Every output's gradient lands on one input: the totals match the probe's.
            let total: f32 = probe.sum_all().unwrap().to_scalar().unwrap();
            assert!((ours.iter().sum::<f32>() - total).abs() < 1e-4);
            for (a, b) in ours.iter().zip(&views) {
                assert!((a - b).abs() < 1e-6, "{a} vs {b} ({case:?})");
            }
        }
        // Half precision: the CPU's f32 kernel on the same rounded values (ties included: both
        // take each window's first maximum), within the half type's rounding of the sums.
        let round = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let (x16, probe16) = (round(x.as_tensor()), round(&probe));
        let cpu = grad(
            max_pool_3x3_s2,
            (&x16, &probe16),
            &(dev.clone(), DType::F32),
        );
        for case in common::half_cases() {
            let ours = grad(max_pool_3x3_s2, (&x16, &probe16), &case);
            for (a, b) in ours.iter().zip(&cpu) {
                assert!(
                    (a - b).abs() <= 1e-2 * b.abs().max(1.0),
                    "{a} vs {b} ({case:?})"
                );
            }
        }
    }
}
