//! The data-parallel gradient hook: after each backward, the gradients of the trainable
//! parameters are flattened into buckets, summed over the ranks in place of each bucket, and
//! divided by the number of ranks, so that every rank applies the same update: that of the mean
//! loss over the global batch.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use super::Group;
use crate::train::step::GradientHook;

/// Elements per all-reduce bucket (32 MiB of f32): few calls, bounded extra memory.
const BUCKET: usize = 8 << 20;

/// Averages the gradients of `vars` over the ranks of a group.
pub struct AverageGradients {
    group: Group,
    vars: Vec<Var>,
}

impl AverageGradients {
    /// Averages the gradients of `vars` (every rank lists the same parameters in the same order)
    /// over `group`.
    pub fn new(group: Group, vars: Vec<Var>) -> Self {
        AverageGradients { group, vars }
    }
}

impl GradientHook for AverageGradients {
    fn on_gradients(&mut self, grads: &mut GradStore) -> Result<()> {
        let world = self.group.world_size();
        if world == 1 {
            return Ok(());
        }
        let present: Vec<(&Var, Tensor)> = self
            .vars
            .iter()
            .filter_map(|v| grads.get(v.as_tensor()).map(|g| (v, g.clone())))
            .collect();
        for bucket in buckets(&present) {
            let flat: Vec<Tensor> = bucket
                .iter()
                .map(|(_, g)| g.flatten_all())
                .collect::<Result<_>>()?;
            let summed = self.group.all_reduce(&Tensor::cat(&flat, 0)?)?;
            let mean = (summed / world as f64)?;
            let mut at = 0;
            for (var, g) in bucket {
                let len = g.elem_count();
                let averaged = mean.narrow(0, at, len)?.reshape(g.shape())?;
                grads.insert(var.as_tensor(), averaged);
                at += len;
            }
        }
        Ok(())
    }
}

/// `items` cut, in order, into runs of at most [`BUCKET`] elements (a larger tensor alone).
fn buckets<'a>(items: &'a [(&'a Var, Tensor)]) -> Vec<&'a [(&'a Var, Tensor)]> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, (_, g)) in items.iter().enumerate() {
        if size > 0 && size + g.elem_count() > BUCKET {
            out.push(&items[start..i]);
            (start, size) = (i, 0);
        }
        size += g.elem_count();
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}
