//! Per-step schedules: linear warmup then cosine decay of the learning rate, and the cosine rise of
//! the target's EMA momentum (to 1 by default).

use std::f64::consts::PI;

use crate::config::ScheduleConfig;

/// The run's length in steps, the one definition every schedule uses: `epochs` epochs, cut to
/// `max_steps` when that is set and shorter; the warmup is `warmup_epochs` of the epochs' run,
/// shrunk in proportion when `max_steps` cuts the run short, so that it always ends within it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunLength {
    /// Steps of the whole run (the schedules end here).
    pub total: u64,
    /// Warmup steps, at most `total`.
    pub warmup: u64,
}

impl RunLength {
    /// The length of a run of `cfg` with `steps_per_epoch` steps an epoch.
    pub fn new(cfg: &ScheduleConfig, steps_per_epoch: u64) -> Self {
        let planned = cfg.epochs * steps_per_epoch;
        let total = match (cfg.epochs, cfg.max_steps) {
            (_, 0) => planned,
            (0, max) => max,
            (_, max) => planned.min(max),
        };
        let warmup_steps = cfg.warmup_epochs * steps_per_epoch as f64;
        let warmup = if planned > 0 && total < planned {
            warmup_steps * total as f64 / planned as f64
        } else {
            warmup_steps
        };
        RunLength {
            total,
            warmup: (warmup.round() as u64).min(total),
        }
    }
}

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

    fn schedule(epochs: u64, max_steps: u64, warmup_epochs: f64) -> ScheduleConfig {
        ScheduleConfig {
            epochs,
            max_steps,
            warmup_epochs,
            lr_final: 0.0,
            ema_base: 0.99,
            ema_final: 1.0,
        }
    }

    #[test]
    fn max_steps_shortens_the_warmup_with_the_run() {
        // 100 epochs of 10 steps with 10 warmup epochs, cut to 30 steps: a 3-step warmup.
        let run = RunLength::new(&schedule(100, 30, 10.0), 10);
        assert_eq!(
            run,
            RunLength {
                total: 30,
                warmup: 3
            }
        );
        assert_eq!(learning_rate(1.0, 0.0, 2, run.warmup, run.total), 1.0);
        // A 3-step smoke test of the same preset leaves the warmup and reaches the full rate.
        let run = RunLength::new(&schedule(100, 3, 10.0), 10);
        assert!(run.warmup < run.total);
        assert_eq!(
            learning_rate(1.0, 0.0, run.warmup, run.warmup, run.total),
            1.0
        );
        // Without max_steps, or with a longer one, the warmup is the configured one.
        assert_eq!(
            RunLength::new(&schedule(100, 0, 10.0), 10),
            RunLength {
                total: 1000,
                warmup: 100
            }
        );
        assert_eq!(RunLength::new(&schedule(100, 5000, 10.0), 10).warmup, 100);
        // max_steps alone (epochs 0): the warmup still ends within the run.
        assert_eq!(
            RunLength::new(&schedule(0, 20, 10.0), 10),
            RunLength {
                total: 20,
                warmup: 20
            }
        );
    }

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
