//! `trainer bench`: times training steps ([`crate::train::step`]) on synthetic inputs, splits each
//! step into online encoder forward, heads, target forward, backward and optimiser + EMA, and
//! counts the ops a step runs.

use crate::error::Result;
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::config::TrainConfig;
use crate::method::maskdeep::{MaskDeep, Views};
use crate::train::step::{Rates, StepProfile, TrainStep};

/// Median timings of one configuration, and its op counts.
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
    pub ops: OpCounts,
    /// The most GPU memory in use at once over the timed steps (bytes); `None` on the CPU.
    pub peak_memory_bytes: Option<u64>,
}

/// The ops one step runs, counted from its autograd graphs and its updates.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct OpCounts {
    /// Graph nodes of the forward pass: the online branch and the loss, plus the target branch.
    pub forward: usize,
    /// Graph nodes whose backward runs (the online branch and the loss).
    pub backward: usize,
    /// Optimiser and EMA ops this device ran.
    pub update: usize,
    /// Optimiser and EMA launches on a GPU (its multi-tensor kernels), on any device.
    pub update_gpu: usize,
}

/// Times `steps` steps (after one warm-up step) of `cfg`.
pub fn time_steps(cfg: &TrainConfig, device: &Device, steps: usize) -> Result<StepTimes> {
    let model = MaskDeep::new(cfg, device)?;
    let optimizer = model.optimizer()?;
    let update_gpu =
        optimizer.gpu_launches() + crate::method::ema::gpu_launches(&model.target_vars);
    let mut trainer = TrainStep::new(model, optimizer);
    let b = cfg.data.batch_size;
    let s = cfg.data.image_size as usize;
    let global = Tensor::randn(0f32, 1.0, (cfg.data.global_views * b, 3, s, s), device)?;
    let l = cfg.data.local_size as usize;
    let local = if cfg.data.local_views > 0 {
        Some(Tensor::randn(
            0f32,
            1.0,
            (cfg.data.local_views * b, 3, l, l),
            device,
        )?)
    } else {
        None
    };
    let positions: Vec<u64> = (0..b as u64).collect();
    let views = Views {
        global: &global,
        local: local.as_ref(),
        positions: &positions,
    };
    let rates = Rates {
        lr: 0.01,
        tau: 0.99,
    };
    let mut samples: Vec<StepProfile> = Vec::new();
    crate::device::reset_peak_memory(device)?;
    for step in 0..=steps {
        let mut profile = StepProfile::default();
        trainer.run(
            std::slice::from_ref(&views),
            step as u64,
            rates,
            Some(&mut profile),
        )?;
        if step > 0 {
            samples.push(profile);
        }
    }
    let median = |f: &dyn Fn(&StepProfile) -> std::time::Duration| {
        shared::stats::median(samples.iter().map(|s| f(s).as_secs_f64() * 1e3).collect())
    };
    let step_ms = median(&|s| s.total);
    let views = (b * (cfg.data.global_views + cfg.data.local_views)) as f64;
    let last = samples.last().copied().unwrap_or_default();
    Ok(StepTimes {
        groups: cfg.method.groups,
        views_per_second: views / (step_ms / 1e3),
        step_ms,
        online_encoder_ms: median(&|s| s.forward.online_encoder),
        heads_ms: median(&|s| s.forward.heads),
        target_ms: median(&|s| s.forward.target),
        backward_ms: median(&|s| s.backward),
        optimizer_ms: median(&|s| s.update),
        ops: OpCounts {
            forward: last.graph_ops + last.forward.target_ops,
            backward: last.graph_ops,
            update: last.update_ops,
            update_gpu,
        },
        peak_memory_bytes: crate::device::peak_memory(device)?,
    })
}
