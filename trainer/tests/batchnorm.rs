//! The fused CPU BatchNorm against the textbook formula written with plain tensor ops.

use candle_core::{Device, Tensor, Var};
use trainer::batchnorm_cpu::forward_train;

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
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
    let dev = Device::Cpu;
    let (n, c, l) = (4, 3, 10);
    let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (n, c, l), &dev).unwrap() + 1.5).unwrap())
        .unwrap();
    let w = Var::from_tensor(&Tensor::new(&[0.5f32, 1.0, 2.0], &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[0.1f32, -0.2, 0.3], &dev).unwrap()).unwrap();
    let probe = Tensor::randn(0f32, 1.0, (n, c, l), &dev).unwrap();

    let r = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, l), &dev).unwrap()).unwrap();
    let residual = with_residual.then_some(r.as_tensor());
    let (y, mean, var) =
        forward_train(x.as_tensor(), w.as_tensor(), b.as_tensor(), relu, residual).unwrap();
    let grads = (&y * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

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
    let y_ref = match residual {
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
    let g_ref = (&y_ref * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

    assert!(max_abs(&y, &y_ref) < 1e-5);
    assert!(max_abs(&mean, &m_ref.flatten_all().unwrap()) < 1e-5);
    assert!(max_abs(&var, &v_ref.flatten_all().unwrap()) < 1e-4);
    let mut vars = vec![("x", &x), ("weight", &w), ("bias", &b)];
    if with_residual {
        vars.push(("residual", &r));
    } else {
        assert!(grads.get(r.as_tensor()).is_none());
    }
    for (what, v) in vars {
        let d = max_abs(
            grads.get(v.as_tensor()).unwrap(),
            g_ref.get(v.as_tensor()).unwrap(),
        );
        assert!(d < 1e-4, "{what} gradient off by {d}");
    }
}
