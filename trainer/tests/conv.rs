//! The im2col + gemm convolution against Candle's built-in one: outputs and both gradients.

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trainer::conv::{conv2d_gemm, conv2d_portable, Geometry};

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

type ConvFn = fn(&Tensor, &Tensor, Geometry) -> Tensor;

fn candle_conv(x: &Tensor, w: &Tensor, g: Geometry) -> Tensor {
    x.conv2d(w, g.padding, g.stride, 1, 1).unwrap()
}

fn gemm_conv(x: &Tensor, w: &Tensor, g: Geometry) -> Tensor {
    conv2d_gemm(x, w, g).unwrap()
}

fn portable_conv(x: &Tensor, w: &Tensor, g: Geometry) -> Tensor {
    conv2d_portable(x, w, g).unwrap()
}

/// Uniform values in [-1, 1) from a fixed-seed ChaCha stream.
fn noise(dims: &[usize], seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = dims.iter().product::<usize>();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// Output, input gradient and weight gradient of `conv` for `[7, 4, h, w]` input and 5 output
/// channels, from a fixed seed: the same data for every `conv`.
fn run(conv: ConvFn, g: Geometry, (h, w): (usize, usize)) -> [Tensor; 3] {
    let (n, c_in, c_out) = (7, 4, 5); // 7 images: groups of several, the last one smaller
    let x = Var::from_tensor(&noise(&[n, c_in, h, w], 1)).unwrap();
    let wt = Var::from_tensor(&noise(&[c_out, c_in, g.k, g.k], 2)).unwrap();
    let y = conv(x.as_tensor(), wt.as_tensor(), g);
    // A fixed random weighting of the outputs makes the gradients non-trivial.
    let probe = noise(y.dims(), 3);
    let grads = (&y * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grad = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
    [y.clone(), grad(&x), grad(&wt)]
}

fn assert_same(ours: ConvFn, reference: ConvFn, g: Geometry, hw: (usize, usize)) {
    let a = run(ours, g, hw);
    let b = run(reference, g, hw);
    let names = ["output", "input gradient", "weight gradient"];
    for ((what, a), b) in names.iter().zip(&a).zip(&b) {
        assert_eq!(a.dims(), b.dims(), "{what} {g:?} {hw:?}");
        let d = max_rel_diff(a, b);
        assert!(d < 1e-5, "{what} {g:?} {hw:?}: {d}");
    }
}

/// (k, stride, padding, h, w): every geometry a ResNet uses, with odd sizes too, on outputs
/// narrower than 16 pixels (tap-table path) and wider. Square inputs only: Candle's own conv
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
fn gemm_convolution_matches_candle_forward_and_backward() {
    for (k, stride, padding, h, w) in SQUARE {
        assert_same(
            gemm_conv,
            candle_conv,
            Geometry { k, stride, padding },
            (h, w),
        );
    }
}

#[test]
fn portable_convolution_matches_candle_and_gemm() {
    for (k, stride, padding, h, w) in SQUARE {
        assert_same(
            portable_conv,
            candle_conv,
            Geometry { k, stride, padding },
            (h, w),
        );
    }
    // Non-square inputs, against the gemm route.
    for (k, stride, padding, h, w) in [(3, 2, 1, 9, 6), (7, 2, 3, 12, 15), (3, 1, 1, 5, 20)] {
        assert_same(
            portable_conv,
            gemm_conv,
            Geometry { k, stride, padding },
            (h, w),
        );
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
    for conv in [gemm_conv as ConvFn, portable_conv] {
        let y = conv(&x, wt.as_tensor(), g);
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
        let y = conv2d_gemm(x.as_tensor(), wt.as_tensor(), g).unwrap();
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
