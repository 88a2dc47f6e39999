//! The im2col + gemm convolution against Candle's built-in one: outputs and both gradients.

use candle_core::{Device, Tensor, Var};
use trainer::conv::{conv2d_gemm, Geometry};

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

#[test]
fn gemm_convolution_matches_candle_forward_and_backward() {
    let dev = Device::Cpu;
    // (k, stride, padding, h, w): every geometry a ResNet uses, with odd sizes too. Square inputs
    // only: Candle's own conv backward (the reference) mis-sizes the input gradient otherwise.
    for (k, stride, padding, h, w) in [
        (3, 1, 1, 8, 8),
        (3, 1, 1, 2, 2),
        (3, 1, 1, 1, 1),
        (5, 1, 2, 3, 3),
        (3, 2, 1, 9, 9),
        (7, 2, 3, 15, 15),
        (1, 1, 0, 5, 5),
        (1, 2, 0, 7, 7),
    ] {
        let (n, c_in, c_out) = (7, 4, 5); // 7 images: groups of several, the last one smaller
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c_in, h, w), &dev).unwrap()).unwrap();
        let wt = Var::from_tensor(&Tensor::randn(0f32, 1.0, (c_out, c_in, k, k), &dev).unwrap())
            .unwrap();
        // A fixed random weighting of the outputs makes the gradients non-trivial.
        let g = Geometry { k, stride, padding };
        let ours = conv2d_gemm(x.as_tensor(), wt.as_tensor(), g).unwrap();
        let reference = x
            .as_tensor()
            .conv2d(wt.as_tensor(), padding, stride, 1, 1)
            .unwrap();
        assert_eq!(ours.dims(), reference.dims(), "k{k} s{stride} p{padding}");
        assert!(
            max_rel_diff(&ours, &reference) < 1e-5,
            "forward k{k} s{stride}"
        );
        let probe = Tensor::randn(0f32, 1.0, reference.dims(), &dev).unwrap();
        let g_ours = (ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_ref = (reference * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (what, v) in [("input", &x), ("weight", &wt)] {
            let a = g_ours.get(v.as_tensor()).unwrap();
            let b = g_ref.get(v.as_tensor()).unwrap();
            let d = max_rel_diff(a, b);
            assert!(d < 1e-5, "{what} gradient k{k} s{stride} p{padding}: {d}");
        }
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
    let y = conv2d_gemm(&x, wt.as_tensor(), g).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_none());
    assert!(grads.get(wt.as_tensor()).is_some());
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
