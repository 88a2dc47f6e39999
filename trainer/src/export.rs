//! `trainer export`: the online backbone as a torchvision `state_dict` in safetensors.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::maskdeep::MaskDeep;
use crate::params;

/// The online backbone's tensors under torchvision's names (the `backbone.` prefix dropped), plus
/// the `num_batches_tracked` counter of every BatchNorm (set to `steps`), so that
/// `torchvision.models.resnetNN().load_state_dict(..., strict=False)` misses only `fc.*`.
pub fn torchvision_state_dict(model: &MaskDeep, steps: u64) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, var) in params::sorted(&model.online_vars) {
        let Some(key) = name.strip_prefix("backbone.") else {
            continue;
        };
        out.insert(key.to_string(), var.as_tensor().to_device(&Device::Cpu)?);
        if let Some(bn) = key.strip_suffix(".running_mean") {
            let count = Tensor::new(steps as i64, &Device::Cpu)?;
            out.insert(format!("{bn}.num_batches_tracked"), count);
        }
    }
    Ok(out)
}

/// Writes [`torchvision_state_dict`] to `path` (atomically).
pub fn write_torchvision(model: &MaskDeep, steps: u64, path: &Path) -> Result<()> {
    let tensors = torchvision_state_dict(model, steps)?;
    let tmp = shared::fsutil::temp_path(path);
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
