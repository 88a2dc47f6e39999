//! The convolution op against Candle's built-in convolution, on every device and path: outputs
//! and both gradients.

use super::common;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trainer::ops::conv::{conv2d, reference, Geometry};

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

/// Candle's own convolution on the CPU: the reference for square inputs.
fn candle_conv(x: &Tensor, w: &Tensor, g: Geometry) -> Tensor {
    x.conv2d(w, g.padding, g.stride, 1, 1).unwrap()
}

/// Our op.
fn op_conv(x: &Tensor, w: &Tensor, g: Geometry) -> Tensor {
    conv2d(x, w, g).unwrap()
}

type ConvFn = fn(&Tensor, &Tensor, Geometry) -> Tensor;

/// Uniform values in [-1, 1) from a fixed-seed ChaCha stream, on `device` in `dtype`.
fn noise(dims: &[usize], seed: u64, (device, dtype): &(Device, DType)) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = dims.iter().product::<usize>();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(*dtype)
        .unwrap()
        .to_device(device)
        .unwrap()
}

/// Output, input gradient and weight gradient of `conv` for `[7, 4, h, w]` input and 5 output
/// channels, from a fixed seed (the same data for every case), as f32 on the CPU.
fn run(conv: ConvFn, case: &(Device, DType), g: Geometry, size: (usize, usize)) -> [Tensor; 3] {
    // 7 images: groups of several, the last one smaller.
    run_sized(conv, case, g, size, (7, 4, 5))
}

/// [`run`] for `n` images of `c_in` channels and `c_out` output channels.
fn run_sized(
    conv: ConvFn,
    case: &(Device, DType),
    g: Geometry,
    (h, w): (usize, usize),
    (n, c_in, c_out): (usize, usize, usize),
) -> [Tensor; 3] {
    let x = Var::from_tensor(&noise(&[n, c_in, h, w], 1, case)).unwrap();
    let wt = Var::from_tensor(&noise(&[c_out, c_in, g.k, g.k], 2, case)).unwrap();
    let y = conv(x.as_tensor(), wt.as_tensor(), g);
    // A fixed random weighting of the outputs makes the gradients non-trivial.
    let probe = noise(y.dims(), 3, case);
    let grads = common::probed(&y, &probe);
    let grad = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
    [y.clone(), grad(&x), grad(&wt)].map(|t| {
        t.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    })
}

fn assert_same(ours: &[Tensor; 3], reference: &[Tensor; 3], tolerance: f32, what: String) {
    let names = ["output", "input gradient", "weight gradient"];
    for ((name, a), b) in names.iter().zip(ours).zip(reference) {
        assert_eq!(a.dims(), b.dims(), "{name} {what}");
        let d = max_rel_diff(a, b);
        assert!(d < tolerance, "{name} {what}: {d}");
    }
}

/// (k, stride, padding, h, w): every geometry a ResNet uses, with odd sizes too, on outputs
/// narrower than 16 pixels (patches gathered a pixel per row) and wider. Square inputs only: Candle's own conv
/// backward (the reference) mis-sizes the input gradient otherwise.
const SQUARE: [(usize, usize, usize, usize, usize); 12] = [
    (3, 1, 1, 17, 17),
    (3, 2, 1, 33, 33),
    (7, 2, 3, 35, 35),
    (1, 2, 0, 33, 33),
    (3, 1, 1, 8, 8),
    (3, 1, 1, 2, 2),
    (3, 1, 1, 1, 1),
    (5, 1, 2, 3, 3),
    (3, 2, 1, 9, 9),
    (7, 2, 3, 15, 15),
    (1, 1, 0, 5, 5),
    (1, 2, 0, 7, 7),
];

#[test]
fn convolution_op_matches_candle_forward_and_backward_on_every_device() {
    let cpu = (Device::Cpu, DType::F32);
    for case in common::cases() {
        for (k, stride, padding, h, w) in SQUARE {
            let g = Geometry { k, stride, padding };
            let reference = run(candle_conv, &cpu, g, (h, w));
            let ours = run(op_conv, &case, g, (h, w));
            assert_same(
                &ours,
                &reference,
                common::tolerance(&case.0),
                format!("{case:?} {g:?} {h}x{w}"),
            );
        }
    }
}

#[test]
fn wide_layers_match_candle_forward_and_backward_on_every_device() {
    // Enough output channels that the CPU gathers the patches a channel per row even on narrow
    // planes, and its weight gradient reads them untransposed.
    let cpu = (Device::Cpu, DType::F32);
    let g = Geometry {
        k: 3,
        stride: 1,
        padding: 1,
    };
    for case in common::cases() {
        for side in [5, 16] {
            let reference = run_sized(candle_conv, &cpu, g, (side, side), (3, 4, 512));
            let ours = run_sized(op_conv, &case, g, (side, side), (3, 4, 512));
            let what = format!("{case:?} {side} px, 512 outputs");
            assert_same(&ours, &reference, common::tolerance(&case.0), what);
        }
    }
}

#[test]
fn convolution_op_in_half_precision_matches_candle_in_f32() {
    // bf16 inputs, f32 accumulation, bf16 outputs: within a few bf16 roundings of the largest value.
    let cpu = (Device::Cpu, DType::F32);
    for case in common::half_cases() {
        for (k, stride, padding, h, w) in SQUARE {
            let g = Geometry { k, stride, padding };
            let reference = run(candle_conv, &cpu, g, (h, w));
            let ours = run(op_conv, &case, g, (h, w));
            assert_same(&ours, &reference, 3e-2, format!("{case:?} {g:?} {h}x{w}"));
        }
    }
}

#[test]
fn convolution_op_agrees_across_devices_on_non_square_inputs() {
    // Candle's own backward mis-sizes non-square input gradients: compare with the CPU kernel.
    let cpu = (Device::Cpu, DType::F32);
    for case in common::cases() {
        for (k, stride, padding, h, w) in [(3, 2, 1, 9, 6), (7, 2, 3, 12, 15), (3, 1, 1, 5, 20)] {
            let g = Geometry { k, stride, padding };
            let reference = run(op_conv, &cpu, g, (h, w));
            let ours = run(op_conv, &case, g, (h, w));
            assert_same(
                &ours,
                &reference,
                common::tolerance(&case.0),
                format!("{case:?} {g:?} {h}x{w}"),
            );
        }
    }
}

#[test]
fn reference_backward_matches_the_cpu_kernel() {
    // The tensor-op backward the CUDA side runs, called directly, against the f32 CPU kernel.
    let cpu = (Device::Cpu, DType::F32);
    for (k, stride, padding, h, w) in [(3, 2, 1, 9, 6), (1, 2, 0, 7, 7), (7, 2, 3, 15, 15)] {
        let g = Geometry { k, stride, padding };
        let x = noise(&[3, 4, h, w], 1, &cpu);
        let wt = noise(&[5, 4, k, k], 2, &cpu);
        let dy = noise(op_conv(&x, &wt, g).dims(), 3, &cpu);
        let packed = reference::backward(&x, &wt, &dy, g, true).unwrap();
        let (xv, wv) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&wt).unwrap(),
        );
        let grads = (op_conv(xv.as_tensor(), wv.as_tensor(), g) * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let kernel = Tensor::cat(
            &[xv, wv].map(|v| grads.get(v.as_tensor()).unwrap().flatten_all().unwrap()),
            0,
        )
        .unwrap();
        let d = max_rel_diff(&packed, &kernel);
        assert!(d < 1e-5, "{g:?} {h}x{w}: {d}");
    }
}

#[test]
fn the_input_image_gets_no_gradient_graph() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &dev).unwrap();
    let wt = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &dev).unwrap()).unwrap();
    let g = Geometry {
        k: 3,
        stride: 1,
        padding: 1,
    };
    for dtype in [DType::F32, DType::F64] {
        let (x, wt) = (
            x.to_dtype(dtype).unwrap(),
            Var::from_tensor(&wt.to_dtype(dtype).unwrap()).unwrap(),
        );
        let y = op_conv(&x, wt.as_tensor(), g);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(wt.as_tensor()).is_some());
    }
}

#[test]
fn gradients_are_bitwise_repeatable() {
    // The weight gradient sums per-thread partials; the split must not depend on scheduling.
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (16, 8, 6, 6), &dev).unwrap()).unwrap();
    let wt = Var::from_tensor(&Tensor::randn(0f32, 1.0, (8, 8, 3, 3), &dev).unwrap()).unwrap();
    let g = Geometry {
        k: 3,
        stride: 1,
        padding: 1,
    };
    let grads = || {
        let y = conv2d(x.as_tensor(), wt.as_tensor(), g).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        [&x, &wt].map(|v| {
            let g: Vec<f32> = grads
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            g.iter().map(|f| f.to_bits()).collect::<Vec<u32>>()
        })
    };
    let first = grads();
    for _ in 0..5 {
        assert_eq!(grads(), first);
    }
}

#[test]
fn layers_with_channels_in_multiples_of_64_match_candle_on_every_device() {
    // On AVX-512 the CPU runs these layers' forward, and the input gradient of the stride-1
    // ones, as a direct convolution over the taps inside the image: tiles of six images (13 is
    // two full tiles and a partial one per task), outputs from 1x1 up to wider than one pass of
    // accumulators (9x9 with 13 images), and the 16-channel input that only the forward takes.
    let cpu = (Device::Cpu, DType::F32);
    let cases = [
        (3, 1, 1, 1, 64, 128),
        (3, 1, 1, 2, 64, 128),
        (3, 1, 1, 4, 128, 64),
        (3, 1, 1, 9, 64, 64),
        (3, 2, 1, 8, 64, 128),
        (3, 2, 1, 9, 16, 64),
        (5, 1, 2, 5, 64, 64),
    ];
    for case in common::cases() {
        for (k, stride, padding, side, c_in, c_out) in cases {
            let g = Geometry { k, stride, padding };
            let sizes = (13, c_in, c_out);
            let reference = run_sized(candle_conv, &cpu, g, (side, side), sizes);
            let ours = run_sized(op_conv, &case, g, (side, side), sizes);
            let what = format!("{case:?} {g:?} {side} px, {c_in} -> {c_out} channels");
            assert_same(&ours, &reference, common::tolerance(&case.0), what);
        }
    }
}
