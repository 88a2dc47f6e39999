//! What the pretraining tests share: a tiny packed dataset, a tiny config and a job on them.

use std::path::{Path, PathBuf};

use candle_core::Device;
use shared::shard::Encoding;
use shared::synth::{write_packed_train, SynthSpec};
use trainer::config::TrainConfig;
use trainer::train::pretrain::{PretrainJob, Ranks, Resume};
use trainer::train::progress::ProgressMode;

/// 24 packed images of 3 classes under `dir`.
pub fn shards(dir: &Path) -> PathBuf {
    let spec = SynthSpec {
        seed: 3,
        classes: 3,
        train_per_class: 8,
        val_per_class: 0,
        test_per_class: 0,
        size: 40,
    };
    write_packed_train(&spec, dir, Encoding::Raw).unwrap()
}

/// One epoch of `cfg`'s views of the packed shards `data`, written as view shards to `out`.
pub fn view_shards(cfg: &TrainConfig, data: &Path, out: &Path) {
    let job = shared::viewshards::ViewsJob {
        source: data.to_path_buf(),
        views: cfg.view_specs(),
        seed: cfg.run.seed,
        epochs: 1,
        batch_size: cfg.data.batch_size,
        threads: 2,
        shard_size: 1 << 20,
        out: out.to_path_buf(),
    };
    shared::viewshards::write_views(&job, &mut |_, _| {}).unwrap();
}

/// A tiny MaskDeep run on [`shards`]: global batch 8, 2 epochs = 6 steps; then `extra` values.
/// Targets are the paper's (`all`), with which the data-parallel tolerances were measured: with
/// cross-view targets this tiny net agrees across rank counts to 3e-8 for four steps, then the
/// runs part (2e-5 by step 6; rounding amplified, not examined further).
pub fn tiny(extra: &[&str]) -> TrainConfig {
    let mut c = TrainConfig::preset("maskdeep-r18-small").unwrap();
    for kv in [
        "width=0.125",
        "image_size=32",
        "proj_hidden=32",
        "proj_dim=16",
        "pred_hidden=32",
        "batch_size=8",
        "epochs=2",
        "warmup_epochs=1",
        "threads=2",
        "checkpoint_every=0",
        "targets=all",
    ]
    .iter()
    .chain(extra)
    {
        c.set(kv).unwrap();
    }
    c
}

/// A new, quiet, single-process CPU job of `cfg` on `data` into `out`.
pub fn job(cfg: &TrainConfig, data: &Path, out: &Path) -> PretrainJob {
    PretrainJob {
        config: cfg.clone(),
        data: data.to_path_buf(),
        out: out.to_path_buf(),
        device: Device::Cpu,
        resume: Resume::No,
        force: false,
        stop_after: None,
        change_schedule: false,
        stop: None,
        knn: None,
        progress: ProgressMode::Off,
        ranks: Ranks::One,
    }
}
