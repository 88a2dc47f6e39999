//! Data-parallel pretraining on the CPU: ranks as threads of one process (the same split, gradient
//! average and SyncBN as NCCL ranks on GPUs) train what one process on the whole batch trains;
//! accumulated micro-batches equal ranks; a split run resumes, on the same or another number of
//! ranks; a failing rank stops the others.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use support::{shards, tiny};
use trainer::config::TrainConfig;
use trainer::dist::{self, Collective, Group};
use trainer::error::Error;
use trainer::train::checkpoint;
use trainer::train::pretrain::{run, PretrainJob, Ranks, Resume, Summary};

/// [`support::job`] on `ranks`.
fn job(cfg: &TrainConfig, data: &Path, out: &Path, ranks: Ranks) -> PretrainJob {
    PretrainJob {
        ranks,
        ..support::job(cfg, data, out)
    }
}

/// The tensors of a checkpoint's online and target weights, by file and name.
fn weights(checkpoint: &Path) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for file in ["online.safetensors", "target.safetensors"] {
        for (name, t) in
            candle_core::safetensors::load(checkpoint.join(file), &Device::Cpu).unwrap()
        {
            out.insert(format!("{file}:{name}"), t);
        }
    }
    out
}

/// How far the weights of checkpoints `a` and `b` are apart, in L2 norms relative to `a`'s: over
/// all the compared tensors together, and for the worst single tensor (with its name). Left out:
/// tensors whose name contains `skip`, and the heads' biases that a BatchNorm cancels (the first
/// layer's of every head, the projector's last, which feeds the predictor's; and the target's
/// EMA of them): their gradient is zero but for rounding, so they hold rounding noise whose size
/// says nothing.
fn distance(a: &Path, b: &Path, skip: Option<&str>) -> (f64, f64, String) {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    let (mut all, mut all_diff) = (0f64, 0f64);
    let mut worst = (0f64, String::new());
    for (name, ta) in &a {
        let noise =
            name.ends_with(".0.bias") || (name.contains("projector") && name.ends_with(".3.bias"));
        if noise || skip.is_some_and(|s| name.contains(s)) {
            continue;
        }
        let va = ta.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let vb = b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let squares = va.iter().map(|&x| x as f64 * x as f64).sum::<f64>();
        let diff = va
            .iter()
            .zip(&vb)
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum::<f64>();
        (all, all_diff) = (all + squares, all_diff + diff);
        let relative = (diff / squares.max(1e-24)).sqrt();
        if relative > worst.0 {
            worst = (relative, name.clone());
        }
    }
    ((all_diff / all).sqrt(), worst.0, worst.1)
}

/// Asserts that checkpoints `a` and `b` hold the same weights within 1e-5 relative (L2, over the
/// model), and each tensor within 1e-4 (a sum that cancels, such as a BatchNorm bias's gradient
/// early on, carries rounding at a larger relative size).
fn assert_close(a: &Path, b: &Path, skip: Option<&str>, what: &str) {
    let (model, tensor, name) = distance(a, b, skip);
    assert!(
        model <= 1e-5,
        "{what}: the weights differ by {model} (relative, L2)"
    );
    assert!(
        tensor <= 1e-4,
        "{what}: {name} differs by {tensor} (relative, L2)"
    );
}

/// The logged losses of a run.
fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

fn assert_losses_close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "{what}: losses {a:?} vs {b:?}"
        );
    }
}

#[test]
fn two_ranks_with_sync_bn_train_what_one_rank_trains_on_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let cfg = tiny(&[]);
    let one = run(&job(&cfg, &data, &dir.path().join("one"), Ranks::One)).unwrap();
    let two_dir = dir.path().join("two");
    let two = run(&job(&cfg, &data, &two_dir, Ranks::Threads(2))).unwrap();
    assert_eq!((one.steps, two.steps), (6, 6));
    // Running statistics included: SyncBN counts every rank's values.
    assert_close(&one.checkpoint, &two.checkpoint, None, "2 ranks vs 1");
    assert_losses_close(
        &losses(&dir.path().join("one")),
        &losses(&two_dir),
        "losses",
    );
    // Only rank 0 wrote the run folder: one line per step, one set of checkpoints.
    assert_eq!(losses(&two_dir).len(), 6);

    // Four ranks of two samples each: the same again.
    let four = run(&job(
        &cfg,
        &data,
        &dir.path().join("four"),
        Ranks::Threads(4),
    ))
    .unwrap();
    assert_close(&one.checkpoint, &four.checkpoint, None, "4 ranks vs 1");

    // Without SyncBN each rank normalises its own half: a different run.
    let cfg_local = tiny(&["sync_bn=false"]);
    let local = run(&job(
        &cfg_local,
        &data,
        &dir.path().join("local"),
        Ranks::Threads(2),
    ))
    .unwrap();
    let (diff, _, _) = distance(&one.checkpoint, &local.checkpoint, None);
    assert!(
        diff > 1e-3,
        "BatchNorm without SyncBN changed nothing ({diff})"
    );
}

#[test]
fn two_accumulated_micro_batches_train_what_two_ranks_without_sync_bn_train() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let accumulated = run(&job(
        &tiny(&["accumulate=2"]),
        &data,
        &dir.path().join("accumulated"),
        Ranks::One,
    ))
    .unwrap();
    let ranks = run(&job(
        &tiny(&["sync_bn=false"]),
        &data,
        &dir.path().join("ranks"),
        Ranks::Threads(2),
    ))
    .unwrap();
    // BatchNorm sees the same halves either way; its running statistics are updated once per
    // micro-batch on one rank and once per step on each of two (rank 0's are kept), so only the
    // trained parameters are compared.
    assert_close(
        &accumulated.checkpoint,
        &ranks.checkpoint,
        Some("running_"),
        "accumulate 2 vs 2 ranks",
    );
    assert_losses_close(
        &losses(&dir.path().join("accumulated")),
        &losses(&dir.path().join("ranks")),
        "losses",
    );
    // Accumulation really splits the batch: it differs from one step on the whole batch.
    let whole = run(&job(
        &tiny(&[]),
        &data,
        &dir.path().join("whole"),
        Ranks::One,
    ))
    .unwrap();
    let (diff, _, _) = distance(&whole.checkpoint, &accumulated.checkpoint, Some("running_"));
    assert!(diff > 1e-3, "accumulation changed nothing ({diff})");
}

#[test]
fn a_split_run_resumes_exactly_on_the_same_or_another_number_of_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let cfg = tiny(&[]);
    let whole = run(&job(
        &cfg,
        &data,
        &dir.path().join("whole"),
        Ranks::Threads(2),
    ))
    .unwrap();

    let resume = |out: &Path, ranks: Ranks, cfg: &TrainConfig| -> Summary {
        let mut first = job(&tiny(&[]), &data, out, Ranks::Threads(2));
        first.stop_after = Some(4);
        assert_eq!(run(&first).unwrap().steps, 4);
        let mut second = job(cfg, &data, out, ranks);
        second.resume = Resume::Required;
        run(&second).unwrap()
    };
    let same = resume(&dir.path().join("same"), Ranks::Threads(2), &cfg);
    for file in [
        "online.safetensors",
        "target.safetensors",
        "optimizer.safetensors",
    ] {
        let a = candle_core::safetensors::load(whole.checkpoint.join(file), &Device::Cpu).unwrap();
        let b = candle_core::safetensors::load(same.checkpoint.join(file), &Device::Cpu).unwrap();
        for (name, t) in &a {
            let (x, y) = (t.flatten_all().unwrap(), b[name].flatten_all().unwrap());
            assert_eq!(
                x.to_vec1::<f32>().unwrap(),
                y.to_vec1::<f32>().unwrap(),
                "{file}:{name} after resuming on 2 ranks"
            );
        }
    }
    // One rank on the whole global batch normalises as SyncBN over two ranks did: the resumed
    // run continues the same training.
    let fewer = resume(&dir.path().join("fewer"), Ranks::One, &cfg);
    assert_close(
        &whole.checkpoint,
        &fewer.checkpoint,
        None,
        "resumed on 1 rank",
    );
    // The split may change on resume: accumulate says how, not what, to train.
    let accumulated = resume(
        &dir.path().join("accumulated"),
        Ranks::One,
        &tiny(&["accumulate=2"]),
    );
    assert_eq!(accumulated.steps, 6);
}

/// A rank's collective that fails at its `fail_at`-th call, as a crashed peer or an NCCL error
/// would make it.
struct FailingAt {
    inner: Group,
    calls: AtomicUsize,
    fail_at: usize,
}

impl FailingAt {
    fn tick(&self) -> candle_core::Result<()> {
        if self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_at {
            candle_core::bail!("injected NCCL error");
        }
        Ok(())
    }
}

impl Collective for FailingAt {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_host(&self, values: &mut [f64]) -> candle_core::Result<()> {
        self.tick()?;
        self.inner.all_reduce_host(values)
    }
    fn all_reduce(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        self.tick()?;
        self.inner.all_reduce(t)
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> candle_core::Result<Tensor> {
        self.tick()?;
        self.inner.broadcast(t, root)
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
}

/// Runs `cfg` on two thread ranks into `out`, rank 1 failing at its `fail_at`-th collective call
/// (`stop_after` steps when given); each rank's result and rank 1's number of calls.
fn two_ranks(
    cfg: &TrainConfig,
    data: &Path,
    out: &Path,
    fail_at: usize,
    stop_after: Option<u64>,
) -> (Vec<Result<Summary, Error>>, usize) {
    let ranks = dist::threads::group(2, Duration::from_secs(120));
    let counter = Arc::new(FailingAt {
        inner: ranks[1].clone(),
        calls: AtomicUsize::new(0),
        fail_at,
    });
    let groups: [Group; 2] = [ranks[0].clone(), counter.clone()];
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|group| {
                let mut j = job(cfg, data, out, Ranks::Group { group, local: 2 });
                j.stop_after = stop_after;
                s.spawn(move || run(&j))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (results, counter.calls.load(Ordering::SeqCst))
}

/// Rank 1's collective calls in a two-rank run of `steps` steps.
fn calls(cfg: &TrainConfig, data: &Path, steps: u64) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let (results, calls) = two_ranks(cfg, data, dir.path(), usize::MAX, Some(steps));
    assert!(results.iter().all(Result::is_ok));
    calls
}

/// [`two_ranks`] over the whole run.
fn on_two_ranks(
    cfg: &TrainConfig,
    data: &Path,
    out: &Path,
    fail_at: usize,
) -> Vec<Result<Summary, Error>> {
    two_ranks(cfg, data, out, fail_at, None).0
}

#[test]
fn a_failing_rank_stops_the_others_and_the_last_checkpoint_stays_intact() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let cfg = tiny(&[]);
    let out = dir.path().join("run");
    // Rank 1 fails in the middle of step 5, after the epoch-end checkpoint of step 3.
    let (first, per_step) = {
        let (one, two) = (calls(&cfg, &data, 1), calls(&cfg, &data, 2));
        (one, two - one)
    };
    let fail_at = first + 3 * per_step + per_step / 2;
    let results = on_two_ranks(&cfg, &data, &out, fail_at);
    let e1 = results[1].as_ref().expect_err("rank 1 failed").to_string();
    assert!(e1.contains("injected NCCL error"), "{e1}");
    let e0 = results[0]
        .as_ref()
        .expect_err("rank 0 was stopped")
        .to_string();
    assert!(
        e0.contains("rank 1 failed: ") && e0.contains("injected"),
        "{e0}"
    );
    // The epoch-end checkpoint of step 3 verifies, and nothing later was half-written.
    let list = checkpoint::list(&out).unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(checkpoint::verify(&list[0]).unwrap().step, 3);
}

#[test]
fn a_batch_that_cannot_be_split_is_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let err = run(&job(
        &tiny(&[]),
        &data,
        &dir.path().join("r3"),
        Ranks::Threads(3),
    ))
    .unwrap_err();
    assert!(
        matches!(&err, Error::Config { key, .. } if key == "batch_size"),
        "{err}"
    );
    assert!(err.to_string().contains("multiple of 3"), "{err}");
    assert!(!dir.path().join("r3").exists(), "nothing written");
    let mut c = tiny(&[]);
    c.set("accumulate=3").unwrap();
    let e = c.validate().unwrap_err();
    assert!(
        matches!(&e, Error::Config { key, .. } if key == "accumulate"),
        "{e}"
    );
}

#[test]
fn view_shards_split_over_ranks_train_what_one_rank_trains() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let cfg = tiny(&["epochs=1"]);
    let views = dir.path().join("views");
    support::view_shards(&cfg, &data, &views);
    let one = run(&job(&cfg, &views, &dir.path().join("one"), Ranks::One)).unwrap();
    let two = run(&job(
        &cfg,
        &views,
        &dir.path().join("two"),
        Ranks::Threads(2),
    ))
    .unwrap();
    assert_eq!((one.steps, two.steps), (3, 3));
    assert_close(
        &one.checkpoint,
        &two.checkpoint,
        None,
        "view shards, 2 ranks vs 1",
    );
    assert_losses_close(
        &losses(&dir.path().join("one")),
        &losses(&dir.path().join("two")),
        "losses",
    );
}
