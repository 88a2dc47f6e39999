//! `trainer bench`: times MaskDeep training steps on synthetic inputs and splits each step into
//! online encoder forward, heads, target forward, backward and optimiser + EMA.

use std::time::{Duration, Instant};

use anyhow::Result;
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::config::TrainConfig;
use crate::maskdeep::{ForwardTimes, MaskDeep, Views};
use crate::{ema, pretrain};

/// Median timings of one configuration.
#[derive(Clone, Debug, Serialize)]
pub struct StepTimes {
    pub groups: usize,
    pub views_per_second: f64,
    pub step_ms: f64,
    pub online_encoder_ms: f64,
    pub heads_ms: f64,
    pub target_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
}

/// One timed step.
struct Sample {
    forward: ForwardTimes,
    backward: Duration,
    optimizer: Duration,
    step: Duration,
}

/// Times `steps` steps (after one warm-up step) of `cfg` with `groups` groups.
pub fn time_steps(cfg: &TrainConfig, device: &Device, steps: usize) -> Result<StepTimes> {
    let model = MaskDeep::new(cfg, device)?;
    let mut opt = model.optimizer()?;
    let b = cfg.batch_size;
    let s = cfg.image_size as usize;
    let global = Tensor::randn(0f32, 1.0, (cfg.global_views * b, 3, s, s), device)?;
    let l = cfg.local_size as usize;
    let local = if cfg.local_views > 0 {
        Some(Tensor::randn(
            0f32,
            1.0,
            (cfg.local_views * b, 3, l, l),
            device,
        )?)
    } else {
        None
    };
    let views = Views {
        global: &global,
        local: local.as_ref(),
        batch: b,
    };
    let mut samples: Vec<Sample> = Vec::new();
    for step in 0..=steps {
        let mut times = ForwardTimes::default();
        let mut rng = pretrain::mask_rng(cfg.seed, step as u64);
        let start = Instant::now();
        let masks = model.sample_masks(&mut rng, &views)?;
        let loss = model.loss(&views, &masks, Some(&mut times))?;
        let t_fwd = Instant::now();
        let grads = loss.total.backward()?;
        device.synchronize()?;
        let t_bwd = Instant::now();
        opt.step(&grads, 0.01)?;
        ema::update(&model.online_vars, &model.target_vars, 0.99)?;
        device.synchronize()?;
        let t_opt = Instant::now();
        if step > 0 {
            samples.push(Sample {
                forward: times,
                backward: t_bwd - t_fwd,
                optimizer: t_opt - t_bwd,
                step: t_opt - start,
            });
        }
    }
    let median = |f: &dyn Fn(&Sample) -> Duration| {
        let mut v: Vec<f64> = samples.iter().map(|s| f(s).as_secs_f64() * 1e3).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let step_ms = median(&|s| s.step);
    let views = (b * (cfg.global_views + cfg.local_views)) as f64;
    Ok(StepTimes {
        groups: cfg.groups,
        views_per_second: views / (step_ms / 1e3),
        step_ms,
        online_encoder_ms: median(&|s| s.forward.online_encoder),
        heads_ms: median(&|s| s.forward.heads),
        target_ms: median(&|s| s.forward.target),
        backward_ms: median(&|s| s.backward),
        optimizer_ms: median(&|s| s.optimizer),
    })
}
