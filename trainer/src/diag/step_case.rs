//! One MaskDeep loss written out for an independent implementation to recompute: the online and
//! target weights, the views, the visible cells, and our loss per level and gradients
//! (`trainer parity --case FILE`; `tools/maskdeep_torch_reference.py` recomputes it in PyTorch
//! from the method's description, which tells a bug in our code from a property of the method).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::method::maskdeep::{MaskDeep, Views};
use crate::nn::params;

/// What [`write`] computed.
pub struct CaseSummary {
    /// Our loss of each level, unweighted, and the weighted total.
    pub per_level: Vec<f32>,
    pub total: f32,
    /// Tensors written.
    pub tensors: usize,
}

/// Builds the model of `cfg` (f32, CPU, initialised from its seed), draws standard-normal views
/// and the visible cells from `seed`, and writes to `path`: `online.<name>` and `target.<name>`
/// (every parameter and BatchNorm statistic), `views` (`[global_views * batch, 3, S, S]`,
/// view-major), `visible` (u8 `[views * batch, groups, cells]` of the mask grid),
/// `loss.<level>` and `loss.total`, and `grad.<name>` for every trainable online parameter; the
/// metadata holds the config (`config`, as `config.json` has it) and the grid (`grid`, `HxW`).
pub fn write(cfg: &TrainConfig, seed: u64, path: &Path) -> Result<CaseSummary> {
    if cfg.data.local_views > 0 || cfg.model.bf16 {
        return Err(Error::config(
            "local_views",
            "a step case has global views only, in f32: set local_views=0 and bf16=false",
        ));
    }
    let dev = Device::Cpu;
    let model = MaskDeep::new(cfg, &dev)?;
    let s = cfg.data.image_size as usize;
    let n = cfg.data.global_views * cfg.data.batch_size;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let values: Vec<f32> = (0..n * 3 * s * s)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    let x = Tensor::from_vec(values, (n, 3, s, s), &dev)?;
    let positions: Vec<u64> = (0..cfg.data.batch_size as u64).collect();
    let views = Views {
        global: &x,
        local: None,
        positions: &positions,
    };
    let masks = model.sample_masks(seed, &views)?;
    let loss = model.loss(&views, &masks, None)?;
    let grads = loss.total.backward()?;

    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (prefix, vars) in [
        ("online", &model.online_vars),
        ("target", &model.target_vars),
    ] {
        for (name, t) in params::external(vars)? {
            tensors.insert(format!("{prefix}.{name}"), t);
        }
    }
    let mut grad_of = HashMap::new();
    for (name, var) in params::trainable(&model.online_vars) {
        if let Some(g) = grads.get(var.as_tensor()) {
            grad_of.insert(format!("grad.{name}"), g.copy()?);
        }
    }
    tensors.extend(params::to_external(grad_of)?);
    tensors.insert("views".into(), x.clone());
    let mask = &masks[0];
    let cells = mask.grid.0 * mask.grid.1;
    let visible: Vec<u8> = mask.visible.iter().map(|&v| v as u8).collect();
    tensors.insert(
        "visible".into(),
        Tensor::from_vec(visible, (mask.rows, mask.groups, cells), &dev)?,
    );
    let mut per_level = Vec::new();
    for (level, l) in cfg.method.levels.iter().zip(&loss.per_level) {
        let v = l.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        per_level.push(v);
        tensors.insert(format!("loss.{}", level.name()), Tensor::new(&[v], &dev)?);
    }
    let total = loss.total.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    tensors.insert("loss.total".into(), Tensor::new(&[total], &dev)?);
    let metadata = HashMap::from([
        (
            "config".to_string(),
            serde_json::to_string(cfg).expect("a config serialises"),
        ),
        (
            "grid".to_string(),
            format!("{}x{}", mask.grid.0, mask.grid.1),
        ),
        ("seed".to_string(), seed.to_string()),
    ]);
    let count = tensors.len();
    let bytes = safetensors::tensor::serialize(tensors, Some(metadata))
        .map_err(|e| Error::Data(format!("cannot serialise the step case: {e}")))?;
    shared::fsutil::write_atomic(path, &bytes)?;
    Ok(CaseSummary {
        per_level,
        total,
        tensors: count,
    })
}
