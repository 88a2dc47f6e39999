//! The BatchNorm op against the textbook formula written with plain tensor ops (differentiated by
//! autograd), on every device and path.

use super::common::{self, max_abs};

use candle_core::{DType, Device, Tensor, Var};
use trainer::ops::batch_norm;

#[test]
fn fused_batchnorm_matches_the_formula_forward_and_backward() {
    check_against_formula(false, false);
}

#[test]
fn fused_batchnorm_relu_matches_the_formula_forward_and_backward() {
    check_against_formula(true, false);
}

#[test]
fn fused_batchnorm_residual_relu_matches_the_formula_forward_and_backward() {
    check_against_formula(true, true);
}

/// Outputs, batch statistics and the gradients of `forward_train(.., relu, residual)` against
/// plain tensor ops (the ReLU by candle's own op).
fn check_against_formula(relu: bool, with_residual: bool) {
    for (device, dtype) in common::cases() {
        check_case(relu, with_residual, &device, dtype);
    }
}

fn check_case(relu: bool, with_residual: bool, device: &Device, dtype: DType) {
    let dev = Device::Cpu;
    let (n, c, l) = (4, 3, 10);
    let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (n, c, l), &dev).unwrap() + 1.5).unwrap())
        .unwrap();
    let w = Var::from_tensor(&Tensor::new(&[0.5f32, 1.0, 2.0], &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[0.1f32, -0.2, 0.3], &dev).unwrap()).unwrap();
    let probe = Tensor::randn(0f32, 1.0, (n, c, l), &dev).unwrap();

    let r = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, l), &dev).unwrap()).unwrap();
    // The op's inputs on the case's device and dtype; the parameters stay f32 (master weights).
    let on = |t: &Tensor, dtype| common::var_on(t, device, dtype);
    let affine = Tensor::cat(&[w.as_tensor(), b.as_tensor()], 0).unwrap();
    let (xd, ad, rd) = (on(&x, dtype), on(&affine, DType::F32), on(&r, dtype));
    let back = common::back;
    let (y, stats) = batch_norm::train(
        xd.as_tensor(),
        ad.as_tensor(),
        with_residual.then_some(rd.as_tensor()),
        relu,
    )
    .unwrap();
    assert_eq!(y.dtype(), dtype);
    let probe_d = probe.to_dtype(dtype).unwrap().to_device(device).unwrap();
    let grads_d = common::probed(&y, &probe_d);
    let (y, mean, var) = (
        back(&y),
        back(&stats.narrow(0, 0, c).unwrap()),
        back(&stats.narrow(0, c, c).unwrap()),
    );
    let grad = |v: &Var| grads_d.get(v.as_tensor()).map(back);
    let daffine = grad(&ad).unwrap();
    let grads = [
        grad(&xd),
        Some(daffine.narrow(0, 0, c).unwrap()),
        Some(daffine.narrow(0, c, c).unwrap()),
        grad(&rd),
    ];

    let xt = x.as_tensor();
    let m_ref = xt.mean_keepdim(2).unwrap().mean_keepdim(0).unwrap();
    let centred = xt.broadcast_sub(&m_ref).unwrap();
    let v_ref = centred
        .sqr()
        .unwrap()
        .mean_keepdim(2)
        .unwrap()
        .mean_keepdim(0)
        .unwrap();
    let y_ref = centred
        .broadcast_div(&(&v_ref + 1e-5).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&w.as_tensor().reshape((1, c, 1)).unwrap())
        .unwrap()
        .broadcast_add(&b.as_tensor().reshape((1, c, 1)).unwrap())
        .unwrap();
    let y_ref = match with_residual.then_some(r.as_tensor()) {
        Some(r) => (y_ref + r).unwrap(),
        None => y_ref,
    };
    let y_ref = if relu { y_ref.relu().unwrap() } else { y_ref };
    if relu {
        let clipped = y
            .eq(0f32)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let share = clipped.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(
            (0.1..0.9).contains(&share),
            "the ReLU clipped {share} of the outputs"
        );
    }
    let g_ref = common::probed(&y_ref, &probe);

    assert!(max_abs(&y, &y_ref) < 1e-5);
    assert!(max_abs(&mean, &m_ref.flatten_all().unwrap()) < 1e-5);
    assert!(max_abs(&var, &v_ref.flatten_all().unwrap()) < 1e-4);
    let mut vars = vec![
        ("x", &x, &grads[0]),
        ("weight", &w, &grads[1]),
        ("bias", &b, &grads[2]),
    ];
    if with_residual {
        vars.push(("residual", &r, &grads[3]));
    } else {
        assert!(grads[3].is_none());
    }
    for (what, v, grad) in vars {
        let d = max_abs(grad.as_ref().unwrap(), g_ref.get(v.as_tensor()).unwrap());
        assert!(
            d < 1e-4,
            "{what} gradient off by {d} ({device:?}, {dtype:?})"
        );
    }
}

/// Output, statistics and every gradient of BatchNorm + residual + ReLU on `device` in `dtype`,
/// for `x`, `residual` and the probe (rounded to `dtype`), as f32 on the CPU.
fn fused_pass(
    x: &Tensor,
    residual: &Tensor,
    probe: &Tensor,
    device: &Device,
    dtype: DType,
) -> Vec<Tensor> {
    let c = x.dim(1).unwrap();
    let on = |t: &Tensor, dtype| common::var_on(t, device, dtype);
    let weight = Tensor::arange(0u32, c as u32, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let (xd, rd) = (on(x, dtype), on(residual, dtype));
    let affine = Tensor::cat(
        &[
            ((&weight * 0.25).unwrap() + 0.5).unwrap(),
            ((&weight * -0.1).unwrap() + 0.2).unwrap(),
        ],
        0,
    )
    .unwrap();
    let ad = on(&affine, DType::F32);
    let (y, stats) =
        batch_norm::train(xd.as_tensor(), ad.as_tensor(), Some(rd.as_tensor()), true).unwrap();
    assert_eq!(y.dtype(), dtype);
    let probe = probe.to_dtype(dtype).unwrap().to_device(device).unwrap();
    let grads = common::probed(&y, &probe);
    let back = common::back;
    let mut out = vec![back(&y), back(&stats)];
    out.extend([&xd, &ad, &rd].map(|v| back(grads.get(v.as_tensor()).unwrap())));
    out
}

/// Every kernel at a size whose per-channel sums span several blocks (and, on the CPU, the
/// reference path in f64), against the CPU's f32 kernels on the same inputs rounded to the case's
/// dtype: within `1e-4` (f32, f64) or `2e-2` (bf16) of each result's largest magnitude.
#[test]
fn batchnorm_kernels_match_the_cpu_kernels_at_scale() {
    let dev = Device::Cpu;
    let (n, c, l) = (16, 5, 1500);
    let x = (Tensor::randn(0f32, 2.0, (n, c, l), &dev).unwrap() + 1.5).unwrap();
    let residual = Tensor::randn(0f32, 1.0, (n, c, l), &dev).unwrap();
    let probe = Tensor::randn(0f32, 1.0, (n, c, l), &dev).unwrap();
    let what = ["output", "statistics", "x", "affine", "residual"];
    let mut cases = common::cases();
    cases.retain(|(device, dtype)| !(device.is_cpu() && *dtype == DType::F32));
    cases.extend(common::half_cases());
    for (device, dtype) in cases {
        let rounded = |t: &Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
        let reference = fused_pass(
            &rounded(&x),
            &rounded(&residual),
            &rounded(&probe),
            &dev,
            DType::F32,
        );
        let got = fused_pass(&x, &residual, &probe, &device, dtype);
        let tol = if dtype == DType::BF16 { 2e-2 } else { 1e-4 };
        for ((got, want), what) in got.iter().zip(&reference).zip(what) {
            let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let scale = scale.to_scalar::<f32>().unwrap().max(1.0);
            let d = max_abs(got, want);
            assert!(
                d <= tol * scale,
                "{what} on {device:?} {dtype:?}: off by {d} (largest magnitude {scale})"
            );
        }
    }
}

/// One rank's share of a SyncBN check: the output, the statistics and the gradients of `x`,
/// `weight`, `bias` for the probe objective `sum(y * probe)`, as f32 on the CPU.
fn synced_pass(
    x: &Tensor,
    probe: &Tensor,
    group: Option<&trainer::dist::Group>,
    device: &Device,
    dtype: DType,
) -> Vec<Tensor> {
    let c = x.dim(1).unwrap();
    let on = |t: &Tensor, dtype| common::var_on(t, device, dtype);
    let xd = on(x, dtype);
    let affine = Tensor::new(&[0.5f32, 1.0, 2.0, 0.1, -0.2, 0.3], &Device::Cpu).unwrap();
    let ad = on(&affine, DType::F32);
    let _scope = group.map(trainer::dist::sync_bn::Scope::enter);
    let (y, stats) = batch_norm::train(xd.as_tensor(), ad.as_tensor(), None, true).unwrap();
    let probe = probe.to_dtype(dtype).unwrap().to_device(device).unwrap();
    let grads = common::probed(&y, &probe);
    let back = common::back;
    assert_eq!(stats.elem_count(), 2 * c);
    let mut out = vec![back(&y), back(&stats)];
    out.extend([&xd, &ad].map(|v| back(grads.get(v.as_tensor()).unwrap())));
    out
}

#[test]
fn synced_batchnorm_on_two_ranks_equals_batchnorm_on_the_whole_batch() {
    let dev = Device::Cpu;
    let (n, c, l) = (6, 3, 10);
    let x = (Tensor::randn(0f32, 2.0, (n, c, l), &dev).unwrap() + 1.5).unwrap();
    let probe = Tensor::randn(0f32, 1.0, (n, c, l), &dev).unwrap();
    for (device, dtype) in common::cases() {
        let whole = synced_pass(&x, &probe, None, &device, dtype);
        let groups = trainer::dist::threads::group(2, std::time::Duration::from_secs(60));
        let halves: Vec<Vec<Tensor>> = std::thread::scope(|s| {
            let handles: Vec<_> = groups
                .iter()
                .enumerate()
                .map(|(r, g)| {
                    let (x, probe) = (&x, &probe);
                    let device = device.clone();
                    s.spawn(move || {
                        let part = |t: &Tensor| t.narrow(0, r * n / 2, n / 2).unwrap();
                        synced_pass(&part(x), &part(probe), Some(g), &device, dtype)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let tol = common::tolerance(&device);
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let d = max_abs(a, b);
            assert!(d < tol, "{device:?} {dtype:?} {what}: off by {d}");
        };
        let joined = |i: usize| Tensor::cat(&[&halves[0][i], &halves[1][i]], 0).unwrap();
        close(&joined(0), &whole[0], "output");
        for half in &halves {
            close(&half[1], &whole[1], "statistics");
        }
        close(&joined(2), &whole[2], "input gradient");
        // The parameters' gradients are each rank's own sums, which the gradient all-reduce adds.
        close(
            &(&halves[0][3] + &halves[1][3]).unwrap(),
            &whole[3],
            "affine gradient",
        );
    }
}
