//! The fused nodes against the nodes they replace, on every device and path: the convolution with
//! its BatchNorm (one node) against the convolution node then the BatchNorm node, and the linear
//! node against Candle's matmul and broadcast add. Outputs, statistics and every gradient.

use super::common::{self, max_abs};

use candle_core::{DType, Device, Tensor, Var};
use trainer::ops::batch_norm;
use trainer::ops::conv::{conv2d, Geometry};
use trainer::ops::linear::{linear, reference};

/// Output, statistics and the gradients of x, weight and affine of `sum(y * probe)`, as f32 on
/// the CPU; `fused` picks the one-node path.
fn conv_bn_pass(
    inputs: [&Tensor; 4],
    g: Geometry,
    relu: bool,
    fused: bool,
    (device, dtype): &(Device, DType),
) -> Vec<Tensor> {
    let [x, w, affine, probe] = inputs;
    let on = |t: &Tensor, dtype| common::var_on(t, device, dtype);
    let (xd, wd, ad) = (on(x, *dtype), on(w, *dtype), on(affine, DType::F32));
    let (y, stats) = if fused {
        batch_norm::conv_train(xd.as_tensor(), wd.as_tensor(), g, ad.as_tensor(), relu).unwrap()
    } else {
        let c = conv2d(xd.as_tensor(), wd.as_tensor(), g).unwrap();
        batch_norm::train(&c, ad.as_tensor(), None, relu).unwrap()
    };
    assert_eq!(y.dtype(), *dtype);
    let probe = probe.to_dtype(*dtype).unwrap().to_device(device).unwrap();
    let grads = common::probed(&y, &probe);
    let back = common::back;
    let mut out = vec![back(&y), back(&stats)];
    out.extend([&xd, &wd, &ad].map(|v: &Var| back(grads.get(v.as_tensor()).unwrap())));
    out
}

#[test]
fn conv_with_batchnorm_as_one_node_equals_the_two_nodes() {
    let dev = Device::Cpu;
    let (n, c_in, c_out, side) = (3, 4, 6, 9);
    let x = Tensor::randn(0f32, 1.0, (n, c_in, side, side), &dev).unwrap();
    let affine = Tensor::randn(0.5f32, 0.3, 2 * c_out, &dev).unwrap();
    let mut cases = common::cases();
    cases.extend(common::half_cases());
    for g in [
        Geometry {
            k: 3,
            stride: 2,
            padding: 1,
        },
        Geometry {
            k: 1,
            stride: 1,
            padding: 0,
        },
    ] {
        let w = Tensor::randn(0f32, 0.3, (c_out, c_in, g.k, g.k), &dev).unwrap();
        let out = g.out(side);
        let probe = Tensor::randn(0f32, 1.0, (n, c_out, out, out), &dev).unwrap();
        for relu in [false, true] {
            for case in &cases {
                let inputs = [&x, &w, &affine, &probe];
                let fused = conv_bn_pass(inputs, g, relu, true, case);
                let nodes = conv_bn_pass(inputs, g, relu, false, case);
                let what = ["output", "statistics", "x", "weight", "affine"];
                for ((a, b), what) in fused.iter().zip(&nodes).zip(what) {
                    // The same kernels on the same values: equal to the last bit.
                    let d = max_abs(a, b);
                    assert!(
                        d == 0.0,
                        "{what} ({g:?}, relu {relu}, {case:?}): off by {d}"
                    );
                }
            }
        }
    }
}

#[test]
fn conv_with_batchnorm_as_one_node_is_one_graph_node() {
    let dev = Device::Cpu;
    let x = Var::randn(0f32, 1.0, (2, 3, 5, 5), &dev).unwrap();
    let w = Var::randn(0f32, 1.0, (4, 3, 3, 3), &dev).unwrap();
    let affine = Var::randn(0f32, 1.0, 8, &dev).unwrap();
    let g = Geometry {
        k: 3,
        stride: 1,
        padding: 1,
    };
    let (y, _) =
        batch_norm::conv_train(x.as_tensor(), w.as_tensor(), g, affine.as_tensor(), true).unwrap();
    assert_eq!(trainer::train::step::graph_ops(&[y]), 1);
}

#[test]
fn linear_node_matches_the_tensor_ops() {
    let dev = Device::Cpu;
    let (n, inputs, outputs) = (7, 33, 10);
    let x = Tensor::randn(0f32, 1.0, (n, inputs), &dev).unwrap();
    let w = Tensor::randn(0f32, 0.2, (outputs, inputs), &dev).unwrap();
    let b = Tensor::randn(0f32, 1.0, outputs, &dev).unwrap();
    let probe = Tensor::randn(0f32, 1.0, (n, outputs), &dev).unwrap();
    let pass = |device: &Device, dtype: DType, node: bool| -> Vec<Tensor> {
        let on = |t: &Tensor| common::var_on(t, device, dtype);
        let (xd, wd, bd) = (on(&x), on(&w), on(&b));
        let y = if node {
            linear(xd.as_tensor(), wd.as_tensor(), bd.as_tensor()).unwrap()
        } else {
            reference::forward(xd.as_tensor(), wd.as_tensor(), bd.as_tensor()).unwrap()
        };
        if node {
            assert_eq!(trainer::train::step::graph_ops(std::slice::from_ref(&y)), 1);
        }
        let probe = probe.to_dtype(dtype).unwrap().to_device(device).unwrap();
        let grads = common::probed(&y, &probe);
        let mut out = vec![common::back(&y)];
        out.extend([&xd, &wd, &bd].map(|v| common::back(grads.get(v.as_tensor()).unwrap())));
        out
    };
    for (device, dtype) in common::cases() {
        let got = pass(&device, dtype, true);
        let want = pass(&device, dtype, false);
        for ((a, b), what) in got.iter().zip(&want).zip(["output", "x", "weight", "bias"]) {
            let d = max_abs(a, b);
            assert!(d < 1e-5, "{what} ({device:?}, {dtype:?}): off by {d}");
        }
    }
}

#[test]
fn linear_node_rejects_mismatched_shapes() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
    let w = Tensor::zeros((4, 5), DType::F32, &dev).unwrap();
    let b = Tensor::zeros(4, DType::F32, &dev).unwrap();
    let err = linear(&x, &w, &b).unwrap_err().to_string();
    assert!(err.contains("do not fit"), "{err}");
}
