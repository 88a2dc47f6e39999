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

    /// Maps `[n, input]` to `[n, output]`. In training, BatchNorm takes its statistics over
    /// each of `blocks` equal runs of rows on its own (1: over all rows at once).
    pub fn forward(&self, x: &Tensor, train: bool, blocks: usize) -> Result<Tensor> {
        let h = apply(&self.fc1, x)?;
        let n = h.dim(0)?;
        let h = if train && blocks > 1 {
            if n % blocks != 0 {
                candle_core::bail!("a head's {n} rows do not split into {blocks} equal blocks");
            }
            let rows = n / blocks;
            let parts = (0..blocks)
                .map(|b| {
                    self.bn
                        .forward(&h.narrow(0, b * rows, rows)?, true, true, None)
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)?
        } else {
            self.bn.forward(&h, train, true, None)?
        };
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
