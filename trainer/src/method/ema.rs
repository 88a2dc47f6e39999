//! The target network's exponential moving average of the online parameters.

use candle_core::Result;
use candle_nn::VarMap;

use crate::nn::params;
use crate::ops::update::{self, Blend};

/// `target = tau * target + (1 - tau) * online` for every trained parameter of the target (matched
/// by name). BatchNorm running statistics are not averaged: the target keeps its own, updated by
/// its train-mode forward passes as in BYOL. One in-place op per parameter, or a few
/// multi-tensor launches on a GPU; returns how many ran.
pub fn update(online: &VarMap, target: &VarMap, tau: f64) -> Result<usize> {
    let online = online.data().lock().expect("var map lock");
    let blend = Blend {
        keep: tau,
        take: 1.0 - tau,
        square: false,
    };
    let mut pairs = Vec::new();
    for (name, t) in params::trainable(target) {
        let Some(o) = online.get(&name) else {
            candle_core::bail!("online network lacks `{name}`");
        };
        pairs.push((t, o.clone()));
    }
    let pairs: Vec<_> = pairs
        .iter()
        .map(|(t, o)| (t.as_tensor(), o.as_tensor()))
        .collect();
    update::blends(&pairs, &blend)
}

/// The launches [`update`] makes on a GPU for `target`'s parameters (the multi-tensor kernel),
/// whatever device they are on.
pub fn gpu_launches(target: &VarMap) -> usize {
    update::single_pass_launches(params::trainable(target).len())
}
