//! Optimisers over named parameters: LARS, SGD with momentum and AdamW. Biases and BatchNorm
//! parameters (rank 1) get neither weight decay nor LARS adaptation. Every update stays on the
//! device (LARS's trust ratio included): no host synchronisation per tensor.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use crate::params;

/// Which update rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rule {
    /// SGD with momentum whose step is scaled per tensor by `trust * |w| / |g + wd * w|`.
    Lars { trust: f64 },
    /// `v = m * v + (g + wd * w); w -= lr * v` (PyTorch's SGD).
    Sgd,
    /// Adam with decoupled weight decay (betas 0.9, 0.999; eps 1e-8).
    AdamW,
}

impl Rule {
    /// From the config's `optimizer` name and LARS trust coefficient.
    pub fn parse(name: &str, trust: f64) -> Option<Self> {
        match name {
            "lars" => Some(Rule::Lars { trust }),
            "sgd" => Some(Rule::Sgd),
            "adamw" => Some(Rule::AdamW),
            _ => None,
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

    /// Applies one update with learning rate `lr`. A parameter without a gradient is left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let w = slot.var.as_tensor().detach();
            let g = g.detach();
            let decay = if slot.exempt { 0.0 } else { self.weight_decay };
            match self.rule {
                Rule::Sgd | Rule::Lars { .. } => {
                    let mut d = if decay > 0.0 {
                        (&g + (&w * decay)?)?
                    } else {
                        g
                    };
                    if let (Rule::Lars { trust }, false) = (self.rule, slot.exempt) {
                        d = d.broadcast_mul(&trust_ratio(&w, &d, trust)?)?;
                    }
                    slot.first = ((&slot.first * self.momentum)? + d)?;
                    slot.var.set(&(&w - (&slot.first * lr)?)?)?;
                }
                Rule::AdamW => {
                    let second = slot
                        .second
                        .as_mut()
                        .expect("AdamW slots have a second moment");
                    slot.first = ((&slot.first * BETA1)? + (&g * (1.0 - BETA1))?)?;
                    *second = ((&*second * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
                    let m_hat = (&slot.first / (1.0 - BETA1.powi(self.steps as i32)))?;
                    let v_hat = (&*second / (1.0 - BETA2.powi(self.steps as i32)))?;
                    let mut update = (m_hat / (v_hat.sqrt()? + ADAM_EPS)?)?;
                    if decay > 0.0 {
                        update = (update + (&w * decay)?)?;
                    }
                    slot.var.set(&(&w - (update * lr)?)?)?;
                }
            }
        }
        Ok(())
    }

    /// The state as named tensors (`<param>.first`, `<param>.second`, `steps`), for checkpoints.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for slot in &self.slots {
            out.insert(format!("{}.first", slot.name), slot.first.clone());
            if let Some(s) = &slot.second {
                out.insert(format!("{}.second", slot.name), s.clone());
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
            t.to_device(like.device())
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

/// LARS's per-tensor factor `trust * |w| / |d|`, or 1 where either norm is 0; a 1-element tensor.
fn trust_ratio(w: &Tensor, d: &Tensor, trust: f64) -> Result<Tensor> {
    let w_norm = w.sqr()?.sum_all()?.sqrt()?;
    let d_norm = d.sqr()?.sum_all()?.sqrt()?;
    let both = w_norm.gt(0.0)?.mul(&d_norm.gt(0.0)?)?;
    let ratio = ((w_norm * trust)? / d_norm.maximum(1e-30)?)?;
    let one = Tensor::ones_like(&ratio)?;
    both.where_cond(&ratio, &one)?.reshape(1)
}
