//! Optimisers over named parameters: LARS, SGD with momentum (plain or Nesterov) and AdamW. Biases and BatchNorm
//! parameters (rank 1) get neither weight decay nor LARS adaptation. Every update stays on the
//! device (LARS's trust ratio included): no host synchronisation per tensor. The updates are the
//! in-place ops of [`crate::ops::update`].

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use crate::config::OptimizerKind;
use crate::nn::params;
use crate::ops::update::{self, AdamStep, Blend, Momentum, Param};

/// Which update rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rule {
    /// SGD with momentum whose step is scaled per tensor by `trust * |w| / |g + wd * w|`.
    Lars { trust: f64 },
    /// `v = m * v + (g + wd * w); w -= lr * v` (PyTorch's SGD).
    Sgd,
    /// Nesterov momentum: `d = g + wd * w; v = m * v + d; w -= lr * (d + m * v)` (PyTorch's SGD
    /// with `nesterov=True`), the linear-evaluation protocol's rule.
    Nesterov,
    /// Adam with decoupled weight decay (betas 0.9, 0.999; eps 1e-8).
    AdamW,
}

impl Rule {
    /// The rule a config names, with its LARS trust coefficient.
    pub fn from_config(kind: OptimizerKind, trust: f64) -> Self {
        match kind {
            OptimizerKind::Lars => Rule::Lars { trust },
            OptimizerKind::Sgd => Rule::Sgd,
            OptimizerKind::Adamw => Rule::AdamW,
        }
    }
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;

struct Slot {
    name: String,
    var: Var,
    exempt: bool,
    /// Momentum buffer (LARS, SGD) or first moment (AdamW).
    first: Tensor,
    /// Second moment (AdamW only).
    second: Option<Tensor>,
}

/// An optimiser and its state.
pub struct Optimizer {
    rule: Rule,
    momentum: f64,
    weight_decay: f64,
    slots: Vec<Slot>,
    steps: u64,
}

impl Optimizer {
    /// Optimises `vars` (name, parameter).
    pub fn new(
        rule: Rule,
        vars: Vec<(String, Var)>,
        momentum: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                Ok(Slot {
                    exempt: params::is_exempt(&var),
                    first: params::zeros_like(&var)?,
                    second: match rule {
                        Rule::AdamW => Some(params::zeros_like(&var)?),
                        _ => None,
                    },
                    name,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Optimizer {
            rule,
            momentum,
            weight_decay,
            slots,
            steps: 0,
        })
    }

    /// The update launches a GPU makes per step for these parameters (the multi-tensor kernels),
    /// whatever device this optimiser runs on.
    pub fn gpu_launches(&self) -> usize {
        let lars: Vec<bool> = self.slots.iter().map(|s| !s.exempt).collect();
        match self.rule {
            Rule::Lars { trust } => update::momentum_launches(&lars, Some(trust)),
            Rule::Sgd => update::momentum_launches(&lars, None),
            Rule::AdamW => update::single_pass_launches(lars.len()),
            Rule::Nesterov => 3 * lars.len(),
        }
    }

    /// Applies one update with learning rate `lr` and returns the number of update ops (GPU
    /// launches) it ran. A parameter without a gradient is left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<usize> {
        self.steps += 1;
        let params: Vec<Param> = self
            .slots
            .iter()
            .filter_map(|slot| {
                let g = grads.get(slot.var.as_tensor())?;
                Some(Param {
                    w: slot.var.as_tensor(),
                    first: &slot.first,
                    second: slot.second.as_ref(),
                    g,
                    decay: if slot.exempt { 0.0 } else { self.weight_decay },
                    lars: !slot.exempt,
                })
            })
            .collect();
        match self.rule {
            Rule::Lars { trust } => update::momentum_steps(&params, self.momentum, Some(trust), lr),
            Rule::Sgd => update::momentum_steps(&params, self.momentum, None, lr),
            Rule::AdamW => {
                let t = self.steps as i32;
                let step = AdamStep {
                    lr,
                    decay: 0.0,
                    corrections: (1.0 - BETA1.powi(t), 1.0 - BETA2.powi(t)),
                    eps: ADAM_EPS,
                };
                update::adam_steps(&params, (BETA1, BETA2), &step)
            }
            Rule::Nesterov => {
                for p in &params {
                    self.nesterov(p, lr)?;
                }
                Ok(3 * params.len())
            }
        }
    }

    /// The Nesterov step of one parameter (the linear protocol's few parameters: per tensor).
    fn nesterov(&self, p: &Param, lr: f64) -> Result<()> {
        Momentum {
            momentum: self.momentum,
            decay: p.decay,
            trust: None,
        }
        .apply(p.first, p.w, p.g)?;
        // w(1 - lr wd) - lr g is w - lr d; then the look-ahead - lr m v.
        let gradient = Blend {
            keep: 1.0 - lr * p.decay,
            take: -lr,
            square: false,
        };
        gradient.apply(p.w, p.g)?;
        let look_ahead = Blend {
            keep: 1.0,
            take: -lr * self.momentum,
            square: false,
        };
        look_ahead.apply(p.w, p.first)
    }

    /// The state as named tensors (`<param>.first`, `<param>.second`, `steps`), for checkpoints.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for slot in &self.slots {
            // Copies: the CPU kernels update the buffers in place.
            out.insert(format!("{}.first", slot.name), slot.first.copy()?);
            if let Some(s) = &slot.second {
                out.insert(format!("{}.second", slot.name), s.copy()?);
            }
        }
        let steps = Tensor::new(&[self.steps as f32], &candle_core::Device::Cpu)?;
        out.insert("steps".to_string(), steps);
        Ok(out)
    }

    /// Restores what [`Self::state`] saved; every buffer must be there with the right shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: &str, like: &Tensor| -> Result<Tensor> {
            let t = state
                .get(key)
                .ok_or_else(|| candle_core::Error::Msg(format!("optimiser state lacks `{key}`")))?;
            if t.dims() != like.dims() {
                candle_core::bail!("optimiser state `{key}` has shape {:?}", t.dims());
            }
            // A copy: the CPU kernels update the buffers in place.
            t.to_device(like.device())?.copy()
        };
        for slot in &mut self.slots {
            slot.first = get(&format!("{}.first", slot.name), &slot.first)?;
            if let Some(s) = &mut slot.second {
                *s = get(&format!("{}.second", slot.name), s)?;
            }
        }
        let steps = state
            .get("steps")
            .ok_or_else(|| candle_core::Error::Msg("optimiser state lacks `steps`".into()))?;
        self.steps = steps.to_vec1::<f32>()?[0] as u64;
        Ok(())
    }
}
