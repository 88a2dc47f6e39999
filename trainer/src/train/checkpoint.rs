//! Checkpoints: `RUNDIR/checkpoints/step-NNNNNNNN/` holding `online.safetensors`,
//! `target.safetensors`, `optimizer.safetensors` and `state.json`. Each is written into a temporary
//! folder; every file is flushed to the disk, `state.json` records a CRC-32 of each weights file,
//! and the folder is renamed into place (and the rename flushed) only when complete, so a killed
//! run or a power loss never leaves a checkpoint that looks complete but is not. A resume
//! verifies the newest checkpoint and falls back to the newest good one. Only the newest `keep`
//! are kept.

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use serde::{Deserialize, Serialize};
use shared::fsutil::{read_json, write_json_atomic};

use crate::method::maskdeep::MaskDeep;
use crate::nn::params;
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
    /// CRC-32 of each weights file, by name (empty in checkpoints written before checksums).
    #[serde(default)]
    pub files: std::collections::BTreeMap<String, u32>,
    /// The training data's identity (absent in checkpoints written before it was recorded).
    #[serde(default)]
    pub data: Option<DataIdentity>,
}

/// What identifies a run's training data: its manifest's checksum and its record count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataIdentity {
    /// CRC-32 of the manifest file (`manifest.json`, or `views.json` of view shards).
    pub manifest_crc32: u32,
    /// Records (images, or samples of view shards).
    pub records: u64,
}

const STATE: &str = "state.json";
const ONLINE: &str = "online.safetensors";
const TARGET: &str = "target.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";

/// The checkpoint folder of a run.
pub fn folder(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// The checkpoint folders of a run (`step-N`, finished or not), oldest first.
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
            name.starts_with("step-") && !name.ends_with(".tmp") && p.is_dir()
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Checks a checkpoint: its `state.json` is there and readable, and every weights file is there
/// with the checksum it records. `Err` says what is wrong.
pub fn verify(checkpoint: &Path) -> std::result::Result<TrainState, String> {
    let state_file = checkpoint.join(STATE);
    if !state_file.is_file() {
        return Err("no state.json: the checkpoint is incomplete".into());
    }
    let state: TrainState =
        read_json(&state_file).map_err(|e| format!("state.json is unreadable: {e}"))?;
    for name in [ONLINE, TARGET, OPTIMIZER] {
        let path = checkpoint.join(name);
        let bytes = std::fs::read(&path).map_err(|e| format!("{name}: {e}"))?;
        if let Some(&want) = state.files.get(name) {
            let got = crc32fast::hash(&bytes);
            if got != want {
                return Err(format!(
                    "{name}: checksum {got:08x}, state.json records {want:08x} (damaged or truncated)"
                ));
            }
        }
    }
    Ok(state)
}

/// Checkpoints that failed [`verify`], each with what is wrong.
pub type Damaged = Vec<(PathBuf, String)>;

/// The newest checkpoint of `run` that verifies, with the newer ones that did not and why.
pub fn newest_good(run: &Path) -> Result<(Option<PathBuf>, Damaged)> {
    let mut damaged = Vec::new();
    for ckpt in list(run)?.into_iter().rev() {
        match verify(&ckpt) {
            Ok(_) => return Ok((Some(ckpt), damaged)),
            Err(why) => damaged.push((ckpt, why)),
        }
    }
    Ok((None, damaged))
}

/// Flushes a written file or folder to the disk.
fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .io("flush to disk", path)
}

/// Where the checkpoint of step `step` of the run in `run` is (or will be) saved.
pub fn path(run: &Path, step: u64) -> PathBuf {
    folder(run).join(format!("step-{step:08}"))
}

/// Writes a checkpoint of `model`, `optimizer` and `state` (whose `files` it fills), then removes
/// all but the newest `keep`. On failure (a full disk, say) the earlier checkpoints are untouched.
pub fn save(
    run: &Path,
    model: &MaskDeep,
    optimizer: &Optimizer,
    state: &TrainState,
    keep: usize,
) -> Result<PathBuf> {
    let dir = folder(run);
    let path = path(run, state.step);
    let tmp = dir.join(format!("step-{:08}.tmp", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).io("remove", &tmp)?;
    }
    std::fs::create_dir_all(&tmp).io("create", &tmp)?;
    let written = |name: &str, result: candle_core::Result<()>| -> Result<()> {
        let file = tmp.join(name);
        result.map_err(|e| Error::Data(format!("cannot write {}: {e}", file.display())))?;
        sync(&file)
    };
    written(ONLINE, params::save(&model.online_vars, &tmp.join(ONLINE)))?;
    written(TARGET, params::save(&model.target_vars, &tmp.join(TARGET)))?;
    let optimizer_state = params::to_external(optimizer.state()?)?;
    written(
        OPTIMIZER,
        candle_core::safetensors::save(&optimizer_state, tmp.join(OPTIMIZER)),
    )?;
    let mut state = state.clone();
    for name in [ONLINE, TARGET, OPTIMIZER] {
        let file = tmp.join(name);
        let bytes = std::fs::read(&file).io("read back", &file)?;
        state
            .files
            .insert(name.to_string(), crc32fast::hash(&bytes));
    }
    write_json_atomic(&tmp.join(STATE), &state)?;
    sync(&tmp)?;
    if path.exists() {
        std::fs::remove_dir_all(&path).io("remove", &path)?;
    }
    std::fs::rename(&tmp, &path).io("move a checkpoint into", &path)?;
    sync(&dir)?;
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
    params::load(&model.online_vars, &checkpoint.join(ONLINE))
        .map_err(mismatch("online weights"))?;
    params::load(&model.target_vars, &checkpoint.join(TARGET))
        .map_err(mismatch("target weights"))?;
    if let Some(opt) = optimizer {
        let tensors = candle_core::safetensors::load(checkpoint.join(OPTIMIZER), model.device())
            .and_then(params::to_internal)
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
    match newest_good(path)? {
        (Some(p), damaged) => {
            for (ckpt, why) in damaged {
                eprintln!(
                    "warning: skipped damaged checkpoint {}: {why}",
                    ckpt.display()
                );
            }
            Ok(p)
        }
        (None, damaged) if !damaged.is_empty() => Err(Error::Run(format!(
            "{} holds no good checkpoint: {}",
            path.display(),
            damaged
                .iter()
                .map(|(c, why)| format!("{}: {why}", c.display()))
                .collect::<Vec<_>>()
                .join("; ")
        ))),
        (None, _) => Err(Error::Run(format!(
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
