//! Pretraining, `trainer bench` and `trainer parity` all train through the one step type.

use candle_core::Device;
use shared::shard::Encoding;
use shared::synth::{write_packed_train, SynthSpec};
use trainer::config::TrainConfig;
use trainer::diag::{bench, parity};
use trainer::train::pretrain::{run, PretrainJob};
use trainer::train::step::steps_run_on_this_thread;

fn tiny() -> TrainConfig {
    let mut c = TrainConfig::preset("maskdeep-r18-small").unwrap();
    for kv in [
        "width=0.125",
        "image_size=32",
        "proj_hidden=32",
        "proj_dim=16",
        "pred_hidden=32",
        "batch_size=8",
        "epochs=1",
        "warmup_epochs=0",
        "threads=2",
        "checkpoint_every=0",
    ] {
        c.set(kv).unwrap();
    }
    c
}

#[test]
fn pretraining_bench_and_parity_run_the_step_type() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        seed: 3,
        classes: 2,
        train_per_class: 8,
        val_per_class: 0,
        size: 40,
    };
    let data = write_packed_train(&spec, dir.path(), Encoding::Raw).unwrap();
    let cfg = tiny();

    let before = steps_run_on_this_thread();
    let job = PretrainJob {
        config: cfg.clone(),
        data,
        out: dir.path().join("run"),
        device: Device::Cpu,
        resume: false,
        stop_after: None,
        knn: None,
        progress: false,
    };
    let summary = run(&job).unwrap();
    assert_eq!(summary.steps, 2);
    assert_eq!(steps_run_on_this_thread() - before, 2, "pretraining");

    let before = steps_run_on_this_thread();
    let times = bench::time_steps(&cfg, &Device::Cpu, 2).unwrap();
    assert_eq!(
        steps_run_on_this_thread() - before,
        3,
        "bench: a warm-up and two timed steps"
    );
    assert!(times.ops.backward > 0 && times.ops.forward > times.ops.backward);
    assert!(times.ops.update > 0);

    let before = steps_run_on_this_thread();
    let report = parity::check(&Device::Cpu, "cpu", false).unwrap();
    assert_eq!(
        steps_run_on_this_thread() - before,
        2,
        "parity: the reference and the device"
    );
    assert!(report.pass, "{report:?}");
}
