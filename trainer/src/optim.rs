//! Optimisers over named parameters: LARS, SGD with momentum and AdamW. Biases and BatchNorm
//! parameters (rank 1) get neither weight decay nor LARS adaptation. Every update stays on the
//! device (LARS's trust ratio included): no host synchronisation per tensor. On CPU the updates
//! are in-place kernels ([`crate::update_cpu`]); elsewhere tensor ops.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use crate::params;
use crate::update_cpu::{self, AdamStep, Blend, Momentum};

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
    /// Tensor ops even on CPU (see [`Optimizer::use_tensor_ops`]).
    tensor_ops: bool,
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
            tensor_ops: false,
        })
    }

    /// Updates with tensor ops on every device, as on CUDA, instead of the CPU's in-place
    /// kernels: the two agree to rounding (tested).
    pub fn use_tensor_ops(&mut self) {
        self.tensor_ops = true;
    }

    /// Applies one update with learning rate `lr`. A parameter without a gradient is left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let decay = if slot.exempt { 0.0 } else { self.weight_decay };
            let in_place = [slot.var.as_tensor(), g, &slot.first]
                .iter()
                .all(|t| update_cpu::applies(t));
            if in_place && !self.tensor_ops {
                self.step_in_place(slot, g, lr, decay)?;
                continue;
            }
            let slot = &mut self.slots[i];
            let w = slot.var.as_tensor().detach();
            let g = g.detach();
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

    /// [`Self::step`] for one parameter with the CPU kernels.
    fn step_in_place(&self, slot: &Slot, g: &Tensor, lr: f64, decay: f64) -> Result<()> {
        let w = slot.var.as_tensor();
        match self.rule {
            Rule::Sgd | Rule::Lars { .. } => {
                let trust = match self.rule {
                    Rule::Lars { trust } if !slot.exempt => Some(trust),
                    _ => None,
                };
                let momentum = Momentum {
                    momentum: self.momentum,
                    decay,
                    trust,
                };
                slot.first.inplace_op3(w, g, &momentum)?;
                let step = Blend {
                    keep: 1.0,
                    take: -lr,
                    square: false,
                };
                w.inplace_op2(&slot.first, &step)
            }
            Rule::AdamW => {
                let second = slot
                    .second
                    .as_ref()
                    .expect("AdamW slots have a second moment");
                let moment = |keep: f64, square| Blend {
                    keep,
                    take: 1.0 - keep,
                    square,
                };
                slot.first.inplace_op2(g, &moment(BETA1, false))?;
                second.inplace_op2(g, &moment(BETA2, true))?;
                let t = self.steps as i32;
                let step = AdamStep {
                    lr,
                    decay,
                    corrections: (1.0 - BETA1.powi(t), 1.0 - BETA2.powi(t)),
                    eps: ADAM_EPS,
                };
                w.inplace_op3(&slot.first, second, &step)
            }
        }
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

/// LARS's per-tensor factor `trust * |w| / |d|`, or 1 where either norm is 0; a 1-element tensor.
fn trust_ratio(w: &Tensor, d: &Tensor, trust: f64) -> Result<Tensor> {
    let w_norm = w.sqr()?.sum_all()?.sqrt()?;
    let d_norm = d.sqr()?.sum_all()?.sqrt()?;
    let both = w_norm.gt(0.0)?.mul(&d_norm.gt(0.0)?)?;
    let ratio = ((w_norm * trust)? / d_norm.maximum(1e-30)?)?;
    let one = Tensor::ones_like(&ratio)?;
    both.where_cond(&ratio, &one)?.reshape(1)
}
