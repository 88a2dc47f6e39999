//! Update rules against values computed by hand.

use candle_core::{Device, Tensor, Var};
use trainer::train::optim::{Optimizer, Rule};

/// A rank-2 weight `[[3, 4]]` and a rank-1 bias `[3, 4]`, both with gradient `[1, 2]`
/// (loss = sum(p * [1, 2])).
fn run(rule: Rule, steps: usize, lr: f64, wd: f64) -> (Vec<f32>, Vec<f32>) {
    let dev = Device::Cpu;
    let w = Var::from_tensor(&Tensor::new(&[[3f32, 4.0]], &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[3f32, 4.0], &dev).unwrap()).unwrap();
    let c = Tensor::new(&[1f32, 2.0], &dev).unwrap();
    let mut opt = Optimizer::new(
        rule,
        vec![("w".into(), w.clone()), ("b".into(), b.clone())],
        0.9,
        wd,
    )
    .unwrap();
    for _ in 0..steps {
        let loss = (w.as_tensor().broadcast_mul(&c).unwrap().sum_all().unwrap()
            + b.as_tensor().mul(&c).unwrap().sum_all().unwrap())
        .unwrap();
        opt.step(&loss.backward().unwrap(), lr).unwrap();
    }
    (
        w.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
        b.as_tensor().to_vec1().unwrap(),
    )
}

fn close(a: &[f32], b: &[f64]) {
    for (x, y) in a.iter().zip(b) {
        assert!((*x as f64 - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
}

#[test]
fn sgd_with_momentum_and_weight_decay() {
    let (w, b) = run(Rule::Sgd, 2, 0.5, 0.1);
    // Step 1: d = g + 0.1 w = [1.3, 2.4]; v = d; w = [3, 4] - 0.5 d = [2.35, 2.8].
    // Step 2: d = [1, 2] + 0.1 [2.35, 2.8] = [1.235, 2.28]; v = 0.9 [1.3, 2.4] + d = [2.405, 4.44];
    //         w = [2.35, 2.8] - 0.5 v = [1.1475, 0.58].
    close(&w, &[1.1475, 0.58]);
    // The bias has no weight decay: v1 = [1, 2], w = [2.5, 3]; v2 = [1.9, 3.8], w = [1.55, 1.1].
    close(&b, &[1.55, 1.1]);
}

#[test]
fn nesterov_steps_with_the_look_ahead_momentum() {
    let (w, b) = run(Rule::Nesterov, 2, 0.5, 0.1);
    // Step 1: d = [1.3, 2.4]; v = d; w = [3, 4] - 0.5 (d + 0.9 v) = [1.765, 1.72].
    // Step 2: d = [1, 2] + 0.1 w = [1.1765, 2.172]; v = 0.9 [1.3, 2.4] + d = [2.3465, 4.332];
    //         w -= 0.5 (d + 0.9 v) = [1.765 - 1.644175, 1.72 - 3.0354] = [0.120825, -1.3154].
    close(&w, &[0.120825, -1.3154]);
    // The bias has no weight decay: v1 = [1, 2], w = [2.05, 2.1]; v2 = [1.9, 3.8],
    // w = [2.05 - 0.5 (1 + 1.71), 2.1 - 0.5 (2 + 3.42)] = [0.695, -0.61].
    close(&b, &[0.695, -0.61]);
}

#[test]
fn lars_scales_by_the_trust_ratio_except_biases() {
    let (w, b) = run(Rule::Lars { trust: 0.5 }, 1, 0.5, 0.1);
    // d = [1.3, 2.4], |w| = 5, |d| = sqrt(7.45); ratio = 0.5 * 5 / |d|; w -= 0.5 * ratio * d.
    let ratio = 0.5 * 5.0 / 7.45f64.sqrt();
    close(&w, &[3.0 - 0.5 * ratio * 1.3, 4.0 - 0.5 * ratio * 2.4]);
    // The bias: plain momentum SGD, no decay, no trust ratio.
    close(&b, &[2.5, 3.0]);
}

#[test]
fn adamw_first_step_is_the_sign_plus_decoupled_decay() {
    let (w, b) = run(Rule::AdamW, 1, 0.1, 0.5);
    // m_hat = g, v_hat = g^2, so the step is g / |g| = 1 per entry, plus 0.5 w for the weight.
    close(&w, &[3.0 - 0.1 * (1.0 + 1.5), 4.0 - 0.1 * (1.0 + 2.0)]);
    close(&b, &[2.9, 3.9]);
}

#[test]
fn optimiser_state_round_trips() {
    let dev = Device::Cpu;
    let w = Var::from_tensor(&Tensor::new(&[[1f32, 2.0]], &dev).unwrap()).unwrap();
    let mut a = Optimizer::new(Rule::AdamW, vec![("w".into(), w.clone())], 0.9, 0.0).unwrap();
    let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
    a.step(&loss.backward().unwrap(), 0.1).unwrap();
    let state = a.state().unwrap();
    let mut b = Optimizer::new(Rule::AdamW, vec![("w".into(), w)], 0.9, 0.0).unwrap();
    b.load_state(&state).unwrap();
    let again = b.state().unwrap();
    for (k, v) in &state {
        let x: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = again[k].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(x, y, "{k}");
    }
    let mut missing = state.clone();
    missing.remove("w.second");
    assert!(b.load_state(&missing).is_err());
}
