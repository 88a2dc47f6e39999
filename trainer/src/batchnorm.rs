//! Batch normalisation over `[batch, channels, ...]` with running statistics, computed in f32 whatever
//! the input dtype (so that it serves mixed precision) and with fewer passes than candle-nn's.

use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

/// PyTorch's defaults.
const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

/// BatchNorm with affine parameters `weight`, `bias` and buffers `running_mean`, `running_var`
/// (torchvision's names).
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
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
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            running_mean: buffer("running_mean", 0.0)?,
            running_var: buffer("running_var", 1.0)?,
        })
    }

    /// Normalises `x` with batch statistics (updating the running ones) when `train`, else with
    /// the running statistics, adds `residual` (shaped like `x`) when given, then applies a ReLU
    /// when `relu` (in training on the CPU, one fused kernel each way). The output has `x`'s
    /// dtype.
    pub fn forward(
        &self,
        x: &Tensor,
        train: bool,
        relu: bool,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (n, c) = (dims[0], dims[1]);
        if train && x.device().is_cpu() {
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            let (x32, residual) = (f32(x)?, residual.map(f32).transpose()?);
            let (y, mean, var) = crate::batchnorm_cpu::forward_train(
                &x32,
                &self.weight,
                &self.bias,
                relu,
                residual.as_ref(),
            )?;
            self.update_running(&mean, &var, x32.elem_count() / c)?;
            return y.to_dtype(x.dtype());
        }
        let x32 = x.to_dtype(DType::F32)?.reshape((n, c, ()))?;
        let per_channel = |t: Tensor| t.reshape((1, c, 1));
        let (centred, var) = if train {
            let count = x32.elem_count() / c;
            let mean = per_channel((x32.sum(2)?.sum_keepdim(0)? / count as f64)?)?;
            let centred = x32.broadcast_sub(&mean)?;
            let var = per_channel((centred.sqr()?.sum(2)?.sum_keepdim(0)? / count as f64)?)?;
            self.update_running(&mean.detach(), &var.detach(), count)?;
            (centred, var)
        } else {
            let mean = per_channel(self.running_mean.as_tensor().detach())?;
            let var = per_channel(self.running_var.as_tensor().detach())?;
            (x32.broadcast_sub(&mean)?, var)
        };
        let scale = per_channel(self.weight.clone())?.broadcast_div(&(var + EPS)?.sqrt()?)?;
        let y = centred
            .broadcast_mul(&scale)?
            .broadcast_add(&per_channel(self.bias.clone())?)?;
        let y = match residual {
            Some(r) => (y + r.to_dtype(DType::F32)?.reshape((n, c, ()))?)?,
            None => y,
        };
        let y = if relu { y.relu()? } else { y };
        y.to_dtype(x.dtype())?.reshape(dims)
    }

    fn update_running(&self, mean: &Tensor, var: &Tensor, count: usize) -> Result<()> {
        let unbiased = var.flatten_all()? * (count as f64 / (count as f64 - 1.0).max(1.0));
        let blend = |old: &Var, new: Tensor| -> Result<()> {
            old.set(&((old.as_tensor().detach() * (1.0 - MOMENTUM))? + (new * MOMENTUM)?)?)
        };
        blend(&self.running_mean, mean.flatten_all()?)?;
        blend(&self.running_var, unbiased?)
    }
}
