//! The pretraining loop on real shards: exact resumption, NaN handling, config errors; and the one
//! step type that pretraining, bench and parity share.

mod support;

use std::path::{Path, PathBuf};

use candle_core::Device;
use shared::shard::Encoding;
use shared::synth::{write_packed_train, SynthSpec};
use support::{job, shards};
use trainer::config::{Level, TrainConfig};
use trainer::diag::{bench, conv_bench, parity};
use trainer::error::Error;
use trainer::train::checkpoint;
use trainer::train::pretrain::{run, Resume};
use trainer::train::step::steps_run_on_this_thread;

fn tiny() -> TrainConfig {
    support::tiny(&[])
}

fn read(path: PathBuf) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Asserts that two checkpoints hold the same bytes of weights and optimiser state.
fn assert_same_weights(a: &Path, b: &Path, what: &str) {
    for file in [
        "online.safetensors",
        "target.safetensors",
        "optimizer.safetensors",
    ] {
        assert!(
            read(a.join(file)) == read(b.join(file)),
            "{what}: {file} differs from the uninterrupted run's"
        );
    }
}

#[test]
fn a_stopped_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let cfg = tiny();

    let whole = run(&job(&cfg, &data, &dir.path().join("whole"))).unwrap();
    assert_eq!(whole.steps, 6, "24 images, batch 8, 2 epochs");

    let split_dir = dir.path().join("split");
    let mut first = job(&cfg, &data, &split_dir);
    first.stop_after = Some(4);
    assert_eq!(run(&first).unwrap().steps, 4);
    let mut second = job(&cfg, &data, &split_dir);
    second.resume = Resume::Required;
    let resumed = run(&second).unwrap();
    assert_eq!(resumed.steps, 6);

    assert_same_weights(&whole.checkpoint, &resumed.checkpoint, "after resuming");
    let lines = std::fs::read_to_string(split_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(
        lines.lines().count(),
        6,
        "one metrics line per step, none twice"
    );
    assert_eq!(whole.final_loss, resumed.final_loss);

    // A fresh run into a folder that has one is refused.
    let err = run(&job(&cfg, &data, &split_dir)).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    // Resuming with another config is refused.
    let mut other = cfg.clone();
    other.optim.lr = 0.5;
    let mut j = job(&other, &data, &split_dir);
    j.resume = Resume::Required;
    let err = run(&j).unwrap_err();
    assert!(err.to_string().contains("--change-schedule"), "{err}");
    assert_eq!(key_of(err), "lr");
    // A key that is not a schedule key stays refused even when asked.
    let mut wider = cfg.clone();
    wider.model.width = 0.25;
    let mut j = job(&wider, &data, &split_dir);
    (j.resume, j.change_schedule) = (Resume::Required, true);
    let err = run(&j).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(key_of(err), "width");
    // With --force it is accepted, and then the checkpoint no longer fits the model.
    j.force = true;
    assert!(matches!(run(&j).unwrap_err(), Error::Checkpoint { .. }));
    let saved = TrainConfig::load(&split_dir.join("config.json")).unwrap();
    assert_eq!(
        saved, cfg,
        "a failed resume leaves the run's config as it was"
    );
}

#[test]
fn a_resume_may_change_the_schedule_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let cfg = tiny();
    let out = dir.path().join("run");
    let mut first = job(&cfg, &data, &out);
    first.stop_after = Some(2);
    run(&first).unwrap();
    let mut lower = cfg.clone();
    lower.optim.lr = cfg.optim.lr / 10.0;
    let mut second = job(&lower, &data, &out);
    (second.resume, second.change_schedule) = (Resume::Required, true);
    assert_eq!(run(&second).unwrap().steps, 6);
    let saved = TrainConfig::load(&out.join("config.json")).unwrap();
    assert_eq!(
        saved.optim.lr, lower.optim.lr,
        "the new rate is the run's from now on"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let rate = |i: usize| lines[i]["lr"].as_f64().unwrap();
    assert!(
        rate(2) < rate(1) / 5.0,
        "steps 3.. ran at the lower rate: {} {}",
        rate(1),
        rate(2)
    );
}

/// `cfg` with a learning rate that makes the loss non-finite within a few steps.
fn diverging(mut cfg: TrainConfig) -> TrainConfig {
    for kv in ["optimizer=\"sgd\"", "lr=1e30", "warmup_epochs=0"] {
        cfg.set(kv).unwrap();
    }
    cfg
}

#[test]
fn a_diverging_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let mut cfg = diverging(tiny());
    cfg.set("checkpoint_every=1").unwrap();
    let out = dir.path().join("run");
    let err = run(&job(&cfg, &data, &out)).unwrap_err();
    let Error::NonFiniteLoss {
        step,
        last_checkpoint,
        ..
    } = err
    else {
        panic!("not a non-finite loss: {err}");
    };
    let kept = checkpoint::list(&out).unwrap();
    assert!(!kept.is_empty(), "the last good checkpoint is kept");
    assert_eq!(last_checkpoint.as_ref(), kept.last(), "the error names it");
    // Steps count as metrics.jsonl counts them: the bad step follows the last good checkpoint.
    assert_eq!(
        checkpoint::read_state(kept.last().unwrap()).unwrap().step + 1,
        step
    );
    let state = checkpoint::read_state(kept.last().unwrap()).unwrap();
    assert!(state.loss.is_finite());
}

#[test]
fn logging_every_few_steps_reads_the_loss_then_and_at_checkpoints_and_trains_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let steps_logged = |cfg: &TrainConfig, name: &str| -> Vec<u64> {
        let out = dir.path().join(name);
        run(&job(cfg, &data, &out)).unwrap();
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| v["loss"].as_f64().map(|_| v["step"].as_u64().unwrap()))
            .collect()
    };
    // 6 steps, 3 per epoch: every step with 1; with 4 step 4, the epoch ends (3, 6), the last.
    assert_eq!(steps_logged(&tiny(), "every"), [1, 2, 3, 4, 5, 6]);
    let mut sparse = tiny();
    sparse.set("log_every=4").unwrap();
    assert_eq!(steps_logged(&sparse, "sparse"), [3, 4, 6]);
    assert_same_weights(
        &dir.path().join("every/checkpoints/step-00000006"),
        &dir.path().join("sparse/checkpoints/step-00000006"),
        "logging does not change training",
    );

    // A diverging loss is still caught before a checkpoint is written from it.
    let mut sparse = diverging(sparse);
    sparse.set("log_every=100").unwrap();
    let out = dir.path().join("diverging");
    let err = run(&job(&sparse, &data, &out)).unwrap_err();
    assert!(matches!(err, Error::NonFiniteLoss { .. }), "{err}");
    for kept in checkpoint::list(&out).unwrap() {
        assert!(checkpoint::read_state(&kept).unwrap().loss.is_finite());
    }
}

/// The key a config error names.
fn key_of(err: Error) -> String {
    match err {
        Error::Config { key, .. } => key,
        other => panic!("not a config error: {other}"),
    }
}

#[test]
fn bad_config_values_are_refused_with_the_key_named() {
    let mut c = tiny();
    assert_eq!(key_of(c.set("no_such_key=1").unwrap_err()), "no_such_key");
    assert_eq!(
        key_of(c.set("batch_size=\"big\"").unwrap_err()),
        "batch_size"
    );
    let err = c.set("no_such_key=1").unwrap_err().to_string();
    assert!(err.contains("no_such_key"), "{err}");
    let err = c.set("batch_size=\"big\"").unwrap_err().to_string();
    assert!(err.contains("batch_size"), "{err}");
    c.set("visible_ratio=0").unwrap();
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("visible_ratio"));
    let mut c = tiny();
    let err = c.set("levels=[\"c6\"]").unwrap_err().to_string();
    assert!(err.contains("levels") && err.contains("c6"), "{err}");
    for bad in [
        "lr_final=1.5",
        "ema_final=0.5",
        "rotation=200",
        "width=0",
        "width=1000",
        "proj_dim=0",
        "epochs=0",
        "warmup_epochs=-1",
        "trust=0",
        "level_weights=[-1, 1]",
        "level_weights=[0, 0]",
        "image_size=4096",
        "image_size=8",
        "weight_decay=-1e-4",
        "log_every=0",
    ] {
        let mut c = tiny();
        c.set(bad).unwrap();
        let key = bad.split('=').next().unwrap();
        assert_eq!(key_of(c.validate().unwrap_err()), key, "{bad}");
    }
    assert!(TrainConfig::preset("maskdeep-r99-imagenet").is_err());
    // In code, a NaN is refused by name too.
    let mut c = tiny();
    c.schedule.warmup_epochs = f64::NAN;
    assert_eq!(key_of(c.validate().unwrap_err()), "warmup_epochs");
    // The ImageNet stem at 32 px leaves a 1x1 C5 grid: masking could not mask anything.
    let mut c = TrainConfig::preset("maskdeep-r18-imagenet").unwrap();
    c.set("image_size=32").unwrap();
    let err = c.validate().unwrap_err();
    assert!(err.to_string().contains("1x1"), "{err}");
    assert_eq!(key_of(err), "visible_ratio");
    // A finer mask grid (C4: 2x2 there) masks where C5 cannot.
    c.set("mask_grid=c4").unwrap();
    c.validate().unwrap();
    assert_eq!(c.mask_grid(), Some(Level::C4));
    c.set("mask_grid=null").unwrap();
    c.set("small_stem=true").unwrap();
    c.validate().unwrap();
    assert_eq!(
        c.mask_grid(),
        Some(Level::C5),
        "the coarsest masked level by default"
    );
}

#[test]
fn pretraining_reads_view_shards_and_checks_they_fit_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let cfg = tiny();
    let views_dir = dir.path().join("views");
    support::view_shards(&cfg, &data, &views_dir);

    // One epoch of views: 3 steps; the config asks for 2 epochs, so it is refused, naming the fix.
    let err = run(&job(&cfg, &views_dir, &dir.path().join("r1")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("loader views"), "{err}");
    let mut one = cfg.clone();
    one.schedule.epochs = 1;
    let summary = run(&job(&one, &views_dir, &dir.path().join("r2"))).unwrap();
    assert_eq!(summary.steps, 3);
    // Another view size, or a rotation the shards were not made with, does not fit them.
    for misfit in ["image_size=48", "rotation=90"] {
        let key = misfit.split('=').next().unwrap();
        let mut other = one.clone();
        other.set(misfit).unwrap();
        let err = run(&job(&other, &views_dir, &dir.path().join(key)))
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{err}");
    }
}

#[test]
fn pretraining_bench_and_parity_run_the_step_type() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let mut cfg = tiny();
    cfg.set("epochs=1").unwrap();

    let before = steps_run_on_this_thread();
    let summary = run(&job(&cfg, &data, &dir.path().join("run"))).unwrap();
    assert_eq!(summary.steps, 3, "24 images in batches of 8");
    assert_eq!(steps_run_on_this_thread() - before, 3, "pretraining");

    let before = steps_run_on_this_thread();
    let times = bench::time_steps(&cfg, &Device::Cpu, 2).unwrap();
    assert_eq!(
        steps_run_on_this_thread() - before,
        3,
        "bench: a warm-up and two timed steps"
    );
    assert!(times.ops.backward > 0 && times.ops.forward > times.ops.backward);
    assert!(times.ops.update > 0);
    // On the CPU two ops per parameter; a GPU launches one or two per group of 32.
    assert!(times.ops.update_gpu > 0 && times.ops.update_gpu < times.ops.update);

    let convs = conv_bench::time_convs(&cfg, &Device::Cpu, 1).unwrap();
    assert_eq!(convs.images, cfg.data.batch_size * cfg.data.global_views);
    assert_eq!(convs.layers.iter().map(|l| l.count).sum::<usize>(), 20);
    assert!(!convs.layers[0].input_gradient && convs.layers[1..].iter().all(|l| l.input_gradient));
    let forward: f64 = convs
        .layers
        .iter()
        .map(|l| l.count as f64 * l.forward_ms)
        .sum();
    assert!(forward > 0.0 && (forward - convs.forward_ms).abs() < 1e-9);

    let before = steps_run_on_this_thread();
    let report = parity::check(&Device::Cpu, "cpu", false).unwrap();
    assert_eq!(
        steps_run_on_this_thread() - before,
        2,
        "parity: the reference and the device"
    );
    assert!(report.pass, "{report:?}");
}

#[test]
fn a_damaged_newest_checkpoint_is_skipped_and_the_resume_still_ends_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let cfg = tiny();
    let whole = run(&job(&cfg, &data, &dir.path().join("whole"))).unwrap();
    type Damage = fn(&Path);
    let damages: [(&str, Damage); 3] = [
        ("flipped byte", |ckpt| {
            let file = ckpt.join("online.safetensors");
            let mut bytes = read(file.clone());
            let at = bytes.len() - 5;
            bytes[at] ^= 1;
            std::fs::write(file, bytes).unwrap();
        }),
        ("truncated file", |ckpt| {
            let file = ckpt.join("target.safetensors");
            let bytes = read(file.clone());
            std::fs::write(file, &bytes[..bytes.len() / 2]).unwrap();
        }),
        ("missing state.json", |ckpt| {
            std::fs::remove_file(ckpt.join("state.json")).unwrap();
        }),
    ];
    for (what, damage) in damages {
        let out = dir.path().join(what.replace(' ', "-"));
        let mut first = job(&cfg, &data, &out);
        first.stop_after = Some(5);
        let stopped = run(&first).unwrap();
        assert_eq!(stopped.steps, 5);
        damage(&stopped.checkpoint);
        let why = checkpoint::verify(&stopped.checkpoint).unwrap_err();
        assert!(!why.is_empty(), "{what}");
        let (good, damaged) = checkpoint::newest_good(&out).unwrap();
        assert_eq!(damaged.len(), 1, "{what}");
        assert!(
            good.unwrap().ends_with("step-00000003"),
            "{what}: falls back to the epoch end"
        );
        let mut second = job(&cfg, &data, &out);
        second.resume = Resume::Required;
        let resumed = run(&second).unwrap();
        assert_eq!(resumed.steps, 6);
        assert_same_weights(&whole.checkpoint, &resumed.checkpoint, what);
    }
}

#[test]
fn resuming_needs_a_checkpoint_and_the_same_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let cfg = tiny();
    let out = dir.path().join("run");
    // --resume with nothing to resume is an error; --resume auto starts a new run.
    let mut j = job(&cfg, &data, &out);
    j.resume = Resume::Required;
    assert!(run(&j).unwrap_err().to_string().contains("no checkpoint"));
    j.resume = Resume::Auto;
    j.stop_after = Some(2);
    assert_eq!(run(&j).unwrap().steps, 2);
    // Another dataset (more images): refused, then accepted with force.
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let spec = SynthSpec {
        seed: 4,
        classes: 3,
        train_per_class: 9,
        val_per_class: 0,
        test_per_class: 0,
        size: 40,
    };
    let other = write_packed_train(&spec, &other_dir, Encoding::Raw).unwrap();
    let mut j = job(&cfg, &other, &out);
    j.resume = Resume::Required;
    let err = run(&j).unwrap_err();
    assert!(matches!(err, Error::Data(_)), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    j.force = true;
    run(&j).unwrap();
}

#[test]
fn data_too_small_for_a_batch_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let mut cfg = tiny();
    cfg.set("batch_size=32").unwrap();
    let out = dir.path().join("run");
    let err = run(&job(&cfg, &data, &out)).unwrap_err();
    assert!(matches!(err, Error::Data(_)), "{err}");
    assert!(
        err.to_string().contains("fewer than one batch of 32"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written to --out");
}
