//! Checkpoints: `RUNDIR/checkpoints/step-NNNNNNNN/` holding `online.safetensors`,
//! `target.safetensors`, `optimizer.safetensors` and `state.json`. Each is written into a temporary
//! folder that is renamed into place when complete, so a killed run never leaves a torn checkpoint;
//! only the newest `keep` are kept.

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use serde::{Deserialize, Serialize};
use shared::fsutil::{read_json, write_json_atomic};

use crate::method::maskdeep::MaskDeep;
use crate::train::optim::Optimizer;

/// Where a run stands, saved beside the weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps completed; the next step to run.
    pub step: u64,
    /// Epoch of the last completed step.
    pub epoch: u64,
    /// Steps the schedules run over.
    pub total_steps: u64,
    /// Loss of the last completed step.
    pub loss: f64,
}

const STATE: &str = "state.json";
const ONLINE: &str = "online.safetensors";
const TARGET: &str = "target.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";

/// The checkpoint folder of a run.
pub fn folder(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// Complete checkpoints of a run, oldest first.
pub fn list(run: &Path) -> Result<Vec<PathBuf>> {
    let dir = folder(run);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .io("list", &dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("step-") && !name.ends_with(".tmp") && p.join(STATE).is_file()
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Writes a checkpoint of `model`, `optimizer` and `state`, then removes all but the newest `keep`.
pub fn save(
    run: &Path,
    model: &MaskDeep,
    optimizer: &Optimizer,
    state: &TrainState,
    keep: usize,
) -> Result<PathBuf> {
    let dir = folder(run);
    let path = dir.join(format!("step-{:08}", state.step));
    let tmp = dir.join(format!("step-{:08}.tmp", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).io("remove", &tmp)?;
    }
    std::fs::create_dir_all(&tmp).io("create", &tmp)?;
    model.online_vars.save(tmp.join(ONLINE))?;
    model.target_vars.save(tmp.join(TARGET))?;
    candle_core::safetensors::save(&optimizer.state()?, tmp.join(OPTIMIZER))?;
    write_json_atomic(&tmp.join(STATE), state)?;
    if path.exists() {
        std::fs::remove_dir_all(&path).io("remove", &path)?;
    }
    std::fs::rename(&tmp, &path).io("move a checkpoint into", &path)?;
    let all = list(run)?;
    for old in &all[..all.len().saturating_sub(keep)] {
        std::fs::remove_dir_all(old).io("remove the old checkpoint", old)?;
    }
    Ok(path)
}

/// Reads a checkpoint's state.
pub fn read_state(checkpoint: &Path) -> Result<TrainState> {
    Ok(read_json(&checkpoint.join(STATE))?)
}

/// Loads the weights of a checkpoint into `model` (and the optimiser state, when given).
pub fn load(
    checkpoint: &Path,
    model: &mut MaskDeep,
    optimizer: Option<&mut Optimizer>,
) -> Result<TrainState> {
    let state = read_state(checkpoint)?;
    let mismatch = |what: &'static str| {
        move |source| Error::Checkpoint {
            path: checkpoint.to_path_buf(),
            what,
            source: Box::new(source),
        }
    };
    model
        .online_vars
        .load(checkpoint.join(ONLINE))
        .map_err(mismatch("online weights"))?;
    model
        .target_vars
        .load(checkpoint.join(TARGET))
        .map_err(mismatch("target weights"))?;
    if let Some(opt) = optimizer {
        let tensors = candle_core::safetensors::load(checkpoint.join(OPTIMIZER), model.device())
            .map_err(mismatch("optimiser state"))?;
        opt.load_state(&tensors)
            .map_err(mismatch("optimiser state"))?;
    }
    Ok(state)
}

/// The checkpoint a `--checkpoint` argument names: a checkpoint folder, or a run folder (its newest).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(STATE).is_file() {
        return Ok(path.to_path_buf());
    }
    match list(path)?.pop() {
        Some(p) => Ok(p),
        None => Err(Error::Run(format!(
            "{} is neither a checkpoint folder nor a run folder with checkpoints",
            path.display()
        ))),
    }
}

/// The run configuration a checkpoint was trained with (`RUNDIR/config.json` above
/// `RUNDIR/checkpoints/step-N`).
pub fn run_config(checkpoint: &Path) -> Result<crate::config::TrainConfig> {
    let run = checkpoint.parent().and_then(Path::parent).ok_or_else(|| {
        Error::Run(format!(
            "{}: a checkpoint folder lies in RUNDIR/checkpoints/",
            checkpoint.display()
        ))
    })?;
    crate::config::TrainConfig::load(&run.join(crate::train::pretrain::CONFIG_FILE))
}

/// Rebuilds the model of a checkpoint (its run's config) on `device` with its weights loaded.
pub fn load_model(
    checkpoint: &Path,
    device: &candle_core::Device,
) -> Result<(MaskDeep, TrainState)> {
    let cfg = run_config(checkpoint)?;
    let mut model = MaskDeep::new(&cfg, device)?;
    let state = load(checkpoint, &mut model, None)?;
    Ok((model, state))
}
