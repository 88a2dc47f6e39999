//! Per-step schedules: linear warmup then cosine decay of the learning rate, and the cosine rise of
//! the target's EMA momentum to 1.

use std::f64::consts::PI;

/// Learning rate at `step` (0-based) of `total`: `base * (step + 1) / warmup` during the warmup, then
/// a cosine from `base` to 0 over the remaining steps.
pub fn learning_rate(base: f64, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let t = ((step - warmup) as f64 / span).min(1.0);
    base * 0.5 * (1.0 + (PI * t).cos())
}

/// EMA momentum at `step` of `total`: `1 - (1 - base) * (cos(pi * step / total) + 1) / 2`.
pub fn ema_momentum(base: f64, step: u64, total: u64) -> f64 {
    let t = (step as f64 / total.max(1) as f64).min(1.0);
    1.0 - (1.0 - base) * ((PI * t).cos() + 1.0) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_is_linear_then_cosine_reaches_zero() {
        assert!((learning_rate(1.0, 0, 4, 10) - 0.25).abs() < 1e-12);
        assert!((learning_rate(1.0, 3, 4, 10) - 1.0).abs() < 1e-12);
        assert!((learning_rate(1.0, 4, 4, 10) - 1.0).abs() < 1e-12);
        // Halfway through the cosine part (3 of 6 steps): base / 2.
        assert!((learning_rate(1.0, 7, 4, 10) - 0.5).abs() < 1e-12);
        assert!(learning_rate(1.0, 10, 4, 10).abs() < 1e-12);
    }

    #[test]
    fn ema_rises_from_base_to_one() {
        assert!((ema_momentum(0.99, 0, 100) - 0.99).abs() < 1e-12);
        assert!((ema_momentum(0.99, 50, 100) - 0.995).abs() < 1e-12);
        assert!((ema_momentum(0.99, 100, 100) - 1.0).abs() < 1e-12);
    }
}
