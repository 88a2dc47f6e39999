//! The projector and predictor MLPs: Linear -> BatchNorm -> ReLU -> Linear, named like PyTorch's
//! `Sequential` (`0`, `1`, `3`).

use candle_core::{Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::nn::batch_norm::BatchNorm;
use crate::ops::linear::linear;

/// A two-layer MLP head.
pub struct Mlp {
    fc1: Linear,
    bn: BatchNorm,
    fc2: Linear,
}

impl Mlp {
    /// `input -> hidden -> output` under `vb`.
    pub fn new(vb: VarBuilder, input: usize, hidden: usize, output: usize) -> Result<Self> {
        Ok(Mlp {
            fc1: candle_nn::linear(input, hidden, vb.pp("0"))?,
            bn: BatchNorm::new(vb.pp("1"), hidden)?,
            fc2: candle_nn::linear(hidden, output, vb.pp("3"))?,
        })
    }

    /// Maps `[n, input]` to `[n, output]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.bn.forward(&apply(&self.fc1, x)?, train, true, None)?;
        apply(&self.fc2, &h)
    }
}

/// `layer` on `x` as one autograd node.
fn apply(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    let Some(bias) = layer.bias() else {
        candle_core::bail!("a head's layer without a bias");
    };
    linear(x, layer.weight(), bias)
}
