//! The BatchNorm layer: affine parameters and running statistics, over
//! [`crate::ops::batch_norm`] in training; in eval mode a plain affine map by the running
//! statistics. Computed in f32 whatever the input dtype, so that it serves mixed precision.

use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::dist::sync_bn;
use crate::nn::conv::Conv;
use crate::ops::batch_norm::{self, EPS};

/// PyTorch's default momentum of the running statistics.
const MOMENTUM: f64 = 0.1;

/// BatchNorm with the affine parameters packed as `affine` (`[weight | bias]`; files hold
/// torchvision's `weight` and `bias`, see [`crate::nn::params`]) and buffers `running_mean`,
/// `running_var`.
pub struct BatchNorm {
    affine: Tensor,
    running_mean: Var,
    running_var: Var,
}

impl BatchNorm {
    /// Creates the parameters for `channels` under `vb`.
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let buffer = |name: &str, value: f64| -> Result<Var> {
            Var::from_tensor(&vb.get_with_hints(channels, name, Init::Const(value))?)
        };
        Ok(BatchNorm {
            affine: vb.get_with_hints(2 * channels, "affine", Init::Const(0.0))?,
            running_mean: buffer("running_mean", 0.0)?,
            running_var: buffer("running_var", 1.0)?,
        })
    }

    /// Normalises `x` with batch statistics (updating the running ones) when `train`, else with
    /// the running statistics, adds `residual` (shaped like `x`) when given, then applies a ReLU
    /// when `relu`. The output has `x`'s dtype.
    pub fn forward(
        &self,
        x: &Tensor,
        train: bool,
        relu: bool,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        if train {
            let (y, stats) = batch_norm::train(x, &self.affine, residual, relu)?;
            self.record(&stats, &y)?;
            return Ok(y);
        }
        let dims = x.dims().to_vec();
        let (n, c) = (dims[0], dims[1]);
        let x32 = x.to_dtype(DType::F32)?.reshape((n, c, ()))?;
        let per_channel = |t: Tensor| t.reshape((1, c, 1));
        let mean = per_channel(self.running_mean.as_tensor().detach())?;
        let var = per_channel(self.running_var.as_tensor().detach())?;
        let (weight, bias) = (self.affine.narrow(0, 0, c)?, self.affine.narrow(0, c, c)?);
        let scale = per_channel(weight)?.broadcast_div(&(var + EPS)?.sqrt()?)?;
        let y = x32
            .broadcast_sub(&mean)?
            .broadcast_mul(&scale)?
            .broadcast_add(&per_channel(bias)?)?;
        let y = match residual {
            Some(r) => (y + r.to_dtype(DType::F32)?.reshape((n, c, ()))?)?,
            None => y,
        };
        let y = if relu { y.relu()? } else { y };
        y.to_dtype(x.dtype())?.reshape(dims)
    }

    /// `conv` of `x`, then this BatchNorm and a ReLU when `relu`: in training one autograd node
    /// (see [`batch_norm::conv_train`]).
    pub fn forward_conv(&self, conv: &Conv, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if !train {
            return self.forward(&conv.forward(x)?, false, relu, None);
        }
        let weight = conv.weight_as(x.dtype())?;
        let (y, stats) = batch_norm::conv_train(x, &weight, conv.geometry(), &self.affine, relu)?;
        self.record(&stats, &y)?;
        Ok(y)
    }

    /// Blends the batch statistics `stats` of the training output `y` into the running ones;
    /// under SyncBN they are over every rank's values.
    fn record(&self, stats: &Tensor, y: &Tensor) -> Result<()> {
        let ranks = sync_bn::current().map_or(1, |g| g.world_size());
        self.update_running(stats, ranks * y.elem_count() / y.dim(1)?)
    }

    /// Blends the batch statistics `[mean, biased variance]` of `count` values per channel into
    /// the running ones (the variance unbiased, as PyTorch does).
    fn update_running(&self, stats: &Tensor, count: usize) -> Result<()> {
        let c = stats.elem_count() / 2;
        let mean = stats.narrow(0, 0, c)?;
        let unbiased = stats.narrow(0, c, c)? * (count as f64 / (count as f64 - 1.0).max(1.0));
        let blend = |old: &Var, new: Tensor| -> Result<()> {
            old.set(&((old.as_tensor().detach() * (1.0 - MOMENTUM))? + (new * MOMENTUM)?)?)
        };
        blend(&self.running_mean, mean)?;
        blend(&self.running_var, unbiased?)
    }
}
