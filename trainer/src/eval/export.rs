//! `trainer export`: the online backbone as a torchvision `state_dict` in safetensors.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, IoContext, Result};
use candle_core::{Device, Tensor};

use crate::method::maskdeep::MaskDeep;
use crate::nn::params;

/// The online backbone's tensors under torchvision's names (the `backbone.` prefix dropped), plus
/// the `num_batches_tracked` counter of every BatchNorm (set to `steps`), so that
/// `torchvision.models.resnetNN().load_state_dict(..., strict=False)` misses only `fc.*`.
pub fn torchvision_state_dict(model: &MaskDeep, steps: u64) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, t) in params::external(&model.online_vars)? {
        let Some(key) = name.strip_prefix("backbone.") else {
            continue;
        };
        out.insert(key.to_string(), t.to_device(&Device::Cpu)?);
        if let Some(bn) = key.strip_suffix(".running_mean") {
            let count = Tensor::new(steps as i64, &Device::Cpu)?;
            out.insert(format!("{bn}.num_batches_tracked"), count);
        }
    }
    Ok(out)
}

/// What the export says about itself (the safetensors `__metadata__`): the backbone's
/// architecture, stem, width and training image size, the steps trained, and `torchvision`, the
/// Python that builds the torchvision model this state dict loads into (or why none does).
pub fn metadata(model: &MaskDeep, steps: u64) -> HashMap<String, String> {
    let cfg = model.config();
    let arch = cfg.model.arch.name();
    let stem = if cfg.model.small_stem {
        "small"
    } else {
        "imagenet"
    };
    let recipe = if cfg.model.width != 1.0 {
        format!(
            "none: width {} gives stage widths {:?}, torchvision's are [64, 128, 256, 512]",
            cfg.model.width,
            (0..4)
                .map(|i| ((64 << i) as f64 * cfg.model.width).round().max(1.0) as usize)
                .collect::<Vec<_>>()
        )
    } else if cfg.model.small_stem {
        format!(
            "m = torchvision.models.{arch}(); m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, \
             bias=False); m.maxpool = torch.nn.Identity()"
        )
    } else {
        format!("m = torchvision.models.{arch}()")
    };
    HashMap::from([
        ("arch".to_string(), arch.to_string()),
        ("stem".to_string(), stem.to_string()),
        ("width".to_string(), cfg.model.width.to_string()),
        ("image_size".to_string(), cfg.data.image_size.to_string()),
        ("preset".to_string(), cfg.preset.name().to_string()),
        ("steps".to_string(), steps.to_string()),
        ("torchvision".to_string(), recipe),
    ])
}

/// Writes [`torchvision_state_dict`] with [`metadata`] to `path` (atomically).
pub fn write_torchvision(model: &MaskDeep, steps: u64, path: &Path) -> Result<()> {
    let tensors = torchvision_state_dict(model, steps)?;
    let tmp = shared::fsutil::temp_path(path);
    safetensors::tensor::serialize_to_file(tensors, Some(metadata(model, steps)), &tmp)
        .map_err(|e| Error::Data(format!("cannot write {}: {e}", tmp.display())))?;
    // safetensors writes through a private (0600) temporary file; an export is for sharing.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .io("set the permissions of", &tmp)?;
    }
    std::fs::rename(&tmp, path).io("write", path)?;
    Ok(())
}

/// A fixed input (`probe.input`, `[2, 3, size, size]`, seeded) and the backbone's eval-mode
/// GAP(C5) features of it (`probe.features`), for checking an export in another framework.
pub fn probe(model: &MaskDeep) -> Result<HashMap<String, Tensor>> {
    use rand::{Rng, SeedableRng};
    let size = model.config().data.image_size as usize;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let values: Vec<f32> = (0..2 * 3 * size * size)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let input = Tensor::from_vec(values, (2, 3, size, size), &Device::Cpu)?;
    let features = model
        .online
        .backbone
        .embed(&input.to_device(model.device())?, false)?
        .detach()
        .to_device(&Device::Cpu)?;
    Ok(HashMap::from([
        ("probe.input".to_string(), input),
        ("probe.features".to_string(), features),
    ]))
}
