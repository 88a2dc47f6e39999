//! Per-step schedules: linear warmup then cosine decay of the learning rate, and the cosine rise of
//! the target's EMA momentum (to 1 by default).

use std::f64::consts::PI;

/// Learning rate at `step` (0-based) of `total`: `base * (step + 1) / warmup` during the warmup, then
/// a cosine from `base` to `base * final_fraction` over the remaining steps.
pub fn learning_rate(base: f64, final_fraction: f64, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let t = ((step - warmup) as f64 / span).min(1.0);
    let end = base * final_fraction;
    end + (base - end) * 0.5 * (1.0 + (PI * t).cos())
}

/// EMA momentum at `step` of `total`: `end - (end - base) * (cos(pi * step / total) + 1) / 2`, a
/// cosine from `base` to `end` (BYOL's schedule when `end` is 1).
pub fn ema_momentum(base: f64, end: f64, step: u64, total: u64) -> f64 {
    let t = (step as f64 / total.max(1) as f64).min(1.0);
    end - (end - base) * ((PI * t).cos() + 1.0) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_is_linear_then_cosine_reaches_zero() {
        assert!((learning_rate(1.0, 0.0, 0, 4, 10) - 0.25).abs() < 1e-12);
        assert!((learning_rate(1.0, 0.0, 3, 4, 10) - 1.0).abs() < 1e-12);
        assert!((learning_rate(1.0, 0.0, 4, 4, 10) - 1.0).abs() < 1e-12);
        // Halfway through the cosine part (3 of 6 steps): base / 2.
        assert!((learning_rate(1.0, 0.0, 7, 4, 10) - 0.5).abs() < 1e-12);
        assert!(learning_rate(1.0, 0.0, 10, 4, 10).abs() < 1e-12);
    }

    #[test]
    fn cosine_ends_at_the_final_fraction() {
        assert!((learning_rate(2.0, 0.25, 7, 4, 10) - 1.25).abs() < 1e-12);
        assert!((learning_rate(2.0, 0.25, 10, 4, 10) - 0.5).abs() < 1e-12);
        // A final fraction of 1 keeps the rate constant after the warmup.
        assert!((learning_rate(2.0, 1.0, 6, 4, 10) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn ema_rises_from_base_to_one() {
        assert!((ema_momentum(0.99, 1.0, 0, 100) - 0.99).abs() < 1e-12);
        assert!((ema_momentum(0.99, 1.0, 50, 100) - 0.995).abs() < 1e-12);
        assert!((ema_momentum(0.99, 1.0, 100, 100) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn ema_stops_at_its_final_value() {
        assert!((ema_momentum(0.99, 0.995, 50, 100) - 0.9925).abs() < 1e-12);
        assert!((ema_momentum(0.99, 0.995, 100, 100) - 0.995).abs() < 1e-12);
        assert!((ema_momentum(0.99, 0.99, 70, 100) - 0.99).abs() < 1e-12);
    }
}
