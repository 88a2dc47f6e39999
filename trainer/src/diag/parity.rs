//! CPU-versus-device parity: the same MaskDeep model, weights, inputs and masks on the CPU (f32, the
//! reference) and on another device (f32 or bf16); relative errors of the encoder output, the loss and
//! every gradient. Run by `trainer parity` (the GPU check script).

use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::method::maskdeep::{MaskDeep, Views};
use crate::nn::params;
use crate::train::step::{GradientHook, Rates, TrainStep};

/// The result of one comparison.
#[derive(Debug, Serialize)]
pub struct ParityReport {
    pub device: String,
    pub dtype: String,
    /// Relative L2 error of the online encoder's C5 output.
    pub output_rel: f64,
    /// Relative error of the loss.
    pub loss_rel: f64,
    /// Largest relative L2 error over all parameter gradients, and its parameter.
    pub grad_rel: f64,
    pub worst_param: String,
    /// The bound it was held to (1e-3 for f32, 2e-2 for bf16); NaN never passes.
    pub bound: f64,
    pub pass: bool,
}

struct Run {
    c5: Tensor,
    loss: f64,
    grads: Vec<(String, Tensor)>,
}

/// The gradient hook of a parity run: copies every trainable parameter's gradient to the CPU in
/// f32, by name.
struct CaptureGrads {
    vars: Vec<(String, candle_core::Var)>,
    grads: Arc<Mutex<Vec<(String, Tensor)>>>,
}

impl GradientHook for CaptureGrads {
    fn on_gradients(&mut self, store: &mut GradStore) -> candle_core::Result<()> {
        let mut out = Vec::new();
        for (name, var) in &self.vars {
            if let Some(g) = store.get(var.as_tensor()) {
                out.push((
                    name.clone(),
                    g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
                ));
            }
        }
        *self.grads.lock().unwrap_or_else(|e| e.into_inner()) = out;
        Ok(())
    }
}

fn run(cfg: &TrainConfig, device: &Device, input: &Tensor) -> candle_core::Result<Run> {
    let model = MaskDeep::new(cfg, device)?;
    let x = input.to_device(device)?;
    let positions: Vec<u64> = (0..cfg.data.batch_size as u64).collect();
    let views = Views {
        global: &x,
        local: None,
        positions: &positions,
    };
    let dtype = cfg.model.compute_dtype();
    let c5 = model
        .online
        .backbone
        .forward(&x.to_dtype(dtype)?, true)?
        .levels[2]
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    let grads = Arc::new(Mutex::new(Vec::new()));
    let hook = CaptureGrads {
        vars: params::trainable(&model.online_vars),
        grads: grads.clone(),
    };
    let optimizer = model.optimizer()?;
    let mut trainer = TrainStep::new(model, optimizer).with_hook(Box::new(hook));
    let rates = Rates { lr: 0.0, tau: 1.0 };
    let loss = trainer.run(std::slice::from_ref(&views), 0, rates, None)?;
    let grads = std::mem::take(&mut *grads.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(Run {
        c5,
        loss: loss.total.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64,
        grads,
    })
}

/// `|a - b| / |b|` in the L2 norm (NaN if either holds a NaN).
fn rel(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let diff = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let norm = b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((diff / norm.max(1e-30)).sqrt())
}

/// Compares a small ResNet-18 MaskDeep step on `device` (bf16 when asked) with the CPU in f32.
pub fn check(device: &Device, name: &str, bf16: bool) -> Result<ParityReport> {
    let mut cfg = TrainConfig::preset("maskdeep-r18-imagenet")?;
    cfg.model.width = 0.5;
    cfg.data.image_size = 64;
    cfg.data.batch_size = 8;
    cfg.model.proj_hidden = 256;
    cfg.model.pred_hidden = 256;
    let n = cfg.data.global_views * cfg.data.batch_size;
    let s = cfg.data.image_size as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let values: Vec<f32> = (0..n * 3 * s * s)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let input = Tensor::from_vec(values, (n, 3, s, s), &Device::Cpu)?;
    let reference = run(&cfg, &Device::Cpu, &input)?;
    cfg.model.bf16 = bf16;
    let other = run(&cfg, device, &input)?;
    // Gradients that are zero in exact arithmetic (the bias of a Linear that feeds a BatchNorm)
    // hold only rounding noise; they are skipped when their norm is below 1e-6 of the largest.
    let norms = reference
        .grads
        .iter()
        .map(|(_, g)| Ok(g.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64))
        .collect::<candle_core::Result<Vec<f64>>>()?;
    let largest = norms.iter().cloned().fold(0.0, f64::max);
    let mut grad_rel = 0.0f64;
    let mut worst_param = String::new();
    for (((name, a), (_, b)), norm) in other.grads.iter().zip(&reference.grads).zip(&norms) {
        if *norm < 1e-6 * largest {
            continue;
        }
        let r = rel(a, b)?;
        if r > grad_rel || r.is_nan() {
            grad_rel = r;
            worst_param = name.clone();
        }
    }
    if other.grads.len() != reference.grads.len() {
        return Err(Error::Mismatch(
            "the two devices produced gradients for different parameters".into(),
        ));
    }
    let output_rel = rel(&other.c5, &reference.c5)?;
    let loss_rel = (other.loss - reference.loss).abs() / reference.loss.abs().max(1e-30);
    let bound = if bf16 { 2e-2 } else { 1e-3 };
    let pass = [output_rel, loss_rel, grad_rel]
        .iter()
        .all(|v| v.is_finite() && *v < bound);
    Ok(ParityReport {
        device: name.to_string(),
        dtype: if bf16 { "bf16" } else { "f32" }.to_string(),
        output_rel,
        loss_rel,
        grad_rel,
        worst_param,
        bound,
        pass,
    })
}
