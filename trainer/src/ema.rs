//! The target network's exponential moving average of the online parameters.

use candle_core::Result;
use candle_nn::VarMap;

use crate::params;
use crate::update_cpu::{self, Blend};

/// `target = tau * target + (1 - tau) * online` for every trained parameter of the target (matched
/// by name). BatchNorm running statistics are not averaged: the target keeps its own, updated by
/// its train-mode forward passes as in BYOL. On CPU one in-place pass per parameter.
pub fn update(online: &VarMap, target: &VarMap, tau: f64) -> Result<()> {
    let online = online.data().lock().expect("var map lock");
    for (name, t) in params::trainable(target) {
        let Some(o) = online.get(&name) else {
            candle_core::bail!("online network lacks `{name}`");
        };
        if update_cpu::applies(t.as_tensor()) && update_cpu::applies(o.as_tensor()) {
            let blend = Blend {
                keep: tau,
                take: 1.0 - tau,
                square: false,
            };
            t.as_tensor().inplace_op2(o.as_tensor(), &blend)?;
            continue;
        }
        let blended = ((t.as_tensor().detach() * tau)? + (o.as_tensor().detach() * (1.0 - tau))?)?;
        t.set(&blended)?;
    }
    Ok(())
}
