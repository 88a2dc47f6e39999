//! The pretraining loop: data -> MaskDeep step -> optimiser and EMA -> metrics and checkpoints, with
//! exact resumption.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};
use candle_core::Device;
use serde::Serialize;
use shared::fsutil::write_json_atomic;

use crate::config::TrainConfig;
use crate::dist::gradients::AverageGradients;
use crate::dist::{self, Group};
use crate::eval::{features, knn};
use crate::method::maskdeep::{MaskDeep, Views};
use crate::nn::params;
use crate::train::checkpoint::{self, DataIdentity, TrainState};
use crate::train::data::{self, Batches};
use crate::train::progress::{ProgressMode, Reporter, StepFigures};
use crate::train::schedule::{self, RunLength};
use crate::train::step::{Rates, TrainStep};
use shared::dataset::Dataset;

/// Name of the saved config in a run folder.
pub const CONFIG_FILE: &str = "config.json";
/// Name of the metrics log in a run folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// What `trainer pretrain` was asked to do.
pub struct PretrainJob {
    pub config: TrainConfig,
    pub data: PathBuf,
    pub out: PathBuf,
    pub device: Device,
    pub resume: Resume,
    /// With a resume: accept training data other than the checkpoint's, and any changed config
    /// key (a model that no longer fits the checkpoint still fails to load).
    pub force: bool,
    /// Set (by a signal handler) to stop after the current step with a checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
    /// Stop after this many steps of this invocation (the schedules still span the whole run).
    pub stop_after: Option<u64>,
    /// With `resume`: accept new values of the [`SCHEDULE_KEYS`] (and save them to the run's
    /// config); every other key must still match.
    pub change_schedule: bool,
    /// Labelled shards to score with kNN during training (`knn_every`), with the labelled shards
    /// whose features form the kNN memory.
    pub knn: Option<KnnSets>,
    /// How to report progress on stderr (rank 0's; the other ranks are quiet).
    pub progress: ProgressMode,
    /// The ranks that run the job.
    pub ranks: Ranks,
}

/// Which ranks run a job: the global batch of each step is split over them, and each applies the
/// same averaged update.
pub enum Ranks {
    /// This process alone.
    One,
    /// `n` ranks as threads of this process (CPU; `trainer pretrain --ranks N`).
    Threads(usize),
    /// This process is one rank of `group`, whose other ranks run in other processes (NCCL, one
    /// per GPU), `local` of them (this one included) on this machine.
    Group { group: Group, local: usize },
}

/// Whether a job continues the run in its `out` folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Start a new run; a folder with checkpoints is refused.
    No,
    /// Continue from the newest good checkpoint; having none is an error.
    Required,
    /// Continue when there are checkpoints, else start a new run (for job scripts that are
    /// requeued after a preemption).
    Auto,
}

/// The checkpoint `job` continues from: the newest that verifies (saying which newer ones are
/// damaged, when `lead`), or none for a new run.
fn checkpoint_to_resume(job: &PretrainJob, lead: bool) -> Result<Option<PathBuf>> {
    let existing = checkpoint::list(&job.out)?;
    if job.resume == Resume::No {
        if existing.is_empty() {
            return Ok(None);
        }
        return Err(Error::Run(format!(
            "{} already holds a run with checkpoints: add --resume to continue it, or choose another --out",
            job.out.display()
        )));
    }
    if existing.is_empty() && job.resume == Resume::Auto {
        if lead {
            eprintln!(
                "--resume auto: no checkpoint in {}; starting a new run",
                job.out.display()
            );
        }
        return Ok(None);
    }
    let (good, damaged) = checkpoint::newest_good(&job.out)?;
    for (ckpt, why) in damaged.iter().filter(|_| lead) {
        eprintln!(
            "warning: checkpoint {} is damaged ({why}); falling back to an earlier one",
            ckpt.display()
        );
    }
    match good {
        Some(ckpt) => Ok(Some(ckpt)),
        None if damaged.is_empty() => Err(Error::Run(format!(
            "--resume: {} holds no checkpoint to continue; start without --resume (or use \
             --resume auto in job scripts)",
            job.out.display()
        ))),
        None => Err(Error::Run(format!(
            "--resume: every checkpoint in {} is damaged ({} of them, listed above); \
             `trainer verify {}` shows each",
            job.out.display(),
            damaged.len(),
            job.out.display()
        ))),
    }
}

/// Refuses to resume `checkpoint` on data other than it was trained on, unless `job.force`.
fn check_same_data(checkpoint: &Path, data: &DataIdentity, job: &PretrainJob) -> Result<()> {
    let state = checkpoint::read_state(checkpoint)?;
    match state.data {
        Some(was) if &was != data && !job.force => Err(Error::Data(format!(
            "--resume: {} was trained on data with {} records (manifest checksum {:08x}); {} \
             has {} (checksum {:08x}). Resume with the same --data, or add --force to continue \
             on this data",
            checkpoint.display(),
            was.records,
            was.manifest_crc32,
            job.data.display(),
            data.records,
            data.manifest_crc32
        ))),
        _ => Ok(()),
    }
}

/// The packed, labelled shards of a kNN evaluation during training.
pub struct KnnSets {
    pub train: PathBuf,
    pub val: PathBuf,
}

/// The config keys a resumed run may always change: how the global batch is split, not what is
/// trained (a run may continue on fewer GPUs with more micro-batches).
pub const SPLIT_KEYS: &[&str] = &["accumulate"];

/// The config keys a resumed run may change when asked (`--change-schedule`): how fast it learns
/// from here on and how it checkpoints, not what it trains.
pub const SCHEDULE_KEYS: &[&str] = &[
    "lr",
    "lr_final",
    "warmup_epochs",
    "weight_decay",
    "ema_base",
    "ema_final",
    "checkpoint_every",
    "keep_checkpoints",
    "knn_every",
    "knn_per_class",
    "log_every",
];

/// What the steps since the last logged one did: how many, from when, the data wait accumulated
/// before them and the records they skipped.
struct SinceLog {
    steps: u64,
    start: Instant,
    wait: Duration,
    skipped: usize,
}

impl SinceLog {
    /// Nothing yet, from now, after `wait` of data wait in all.
    fn new(wait: Duration) -> Self {
        SinceLog {
            steps: 0,
            start: Instant::now(),
            wait,
            skipped: 0,
        }
    }
}

/// The keys whose values differ between two configs, with both values.
fn differences(saved: &TrainConfig, asked: &TrainConfig) -> Result<Vec<(String, String, String)>> {
    let (a, b) = (serde_json::to_value(saved)?, serde_json::to_value(asked)?);
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return Ok(Vec::new());
    };
    Ok(a.iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, v)| {
            let new = b.get(k).map_or("none".to_string(), |n| n.to_string());
            (k.clone(), v.to_string(), new)
        })
        .collect())
}

/// A kNN line of `metrics.jsonl`.
#[derive(Serialize)]
struct KnnMetrics {
    step: u64,
    epoch: u64,
    knn_k: usize,
    knn_top1: f64,
    knn_top5: f64,
    /// Images of the kNN memory and of the val set it was measured on.
    knn_train_images: usize,
    knn_val_images: usize,
}

/// One line of `metrics.jsonl`.
#[derive(Serialize)]
struct Metrics {
    step: u64,
    epoch: u64,
    loss: f64,
    loss_per_level: Vec<f64>,
    lr: f64,
    ema_momentum: f64,
    views_per_second: f64,
    data_wait: f64,
    skipped: usize,
}

/// How a run ended.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Steps done in the whole run so far.
    pub steps: u64,
    /// Steps of the whole run.
    pub total_steps: u64,
    /// Steps done by this invocation (0 when a finished run was resumed).
    pub steps_this_run: u64,
    /// The last loss of this invocation (NaN when it made no step).
    pub final_loss: f64,
    pub checkpoint: PathBuf,
    pub views_per_second: f64,
    pub data_wait: f64,
}

/// Runs (or resumes) a pretraining job, on one rank or on several (`job.ranks`).
pub fn run(job: &PretrainJob) -> Result<Summary> {
    match &job.ranks {
        Ranks::One => run_rank(job, &dist::solo(), &check(job, 1, true)?, None),
        Ranks::Group { group, .. } => check(job, group.world_size(), group.rank() == 0)
            .and_then(|checked| {
                // NCCL's waits happen on the GPU, out of reach of a timeout of ours.
                let dog = dist::watchdog::exit_when_stuck(group.rank(), dist::DEFAULT_TIMEOUT);
                run_rank(job, group, &checked, Some(&dog))
            })
            .inspect_err(|e| {
                if !agreed(e) {
                    group.abort(&e.to_string());
                }
            }),
        Ranks::Threads(n) => run_threads(job, *n, &check(job, *n, true)?),
    }
}

/// Whether `e` ends every rank at the same step by itself (the ranks agreed on it through the
/// per-step reduction), so that the other ranks need not be stopped.
fn agreed(e: &Error) -> bool {
    matches!(e, Error::Interrupted { .. } | Error::NonFiniteLoss { .. })
}

/// Runs `job`, `checked`, on `n` ranks as threads of this process. When a rank fails, the others
/// stop at their next collective call, and the error is the failing rank's.
fn run_threads(job: &PretrainJob, n: usize, checked: &Checked) -> Result<Summary> {
    let groups = dist::threads::group(n, dist::DEFAULT_TIMEOUT);
    let first_failure = std::sync::Mutex::new(None::<usize>);
    let mut results: Vec<Result<Summary>> = std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .iter()
            .map(|group| {
                let first_failure = &first_failure;
                s.spawn(move || {
                    // A panic fails the group at once: the other ranks must not wait for it.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_rank(job, group, checked, None)
                    }))
                    .unwrap_or_else(|panic| {
                        let what = panic
                            .downcast_ref::<String>()
                            .map(String::as_str)
                            .or_else(|| panic.downcast_ref::<&str>().copied())
                            .unwrap_or("unknown");
                        Err(Error::Run(format!("panicked: {what}")))
                    });
                    if let Err(e) = &result {
                        if !agreed(e) {
                            let mut first = first_failure.lock().unwrap_or_else(|p| p.into_inner());
                            first.get_or_insert(group.rank());
                            group.abort(&e.to_string());
                        }
                    }
                    result
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank panics are caught"))
            .collect()
    });
    let failed = first_failure
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    match failed {
        Some(0) | None => results.swap_remove(0),
        Some(rank) => Err(Error::Rank {
            rank,
            source: Box::new(results.swap_remove(rank).expect_err("it failed")),
        }),
    }
}

/// Checks the resumed run's saved config against the job's: changed keys are refused unless
/// allowed (`--force`, `--change-schedule`, or a key that only says how the batch is split).
fn check_resumed_config(job: &PretrainJob, config_path: &Path, lead: bool) -> Result<()> {
    let cfg = &job.config;
    let saved = TrainConfig::load(config_path).map_err(|e| {
        Error::Run(format!(
            "--resume: {} has no readable run config ({e})",
            job.out.display()
        ))
    })?;
    let changed = differences(&saved, cfg)?;
    let allowed = |k: &str| {
        job.force || SPLIT_KEYS.contains(&k) || (job.change_schedule && SCHEDULE_KEYS.contains(&k))
    };
    for (key, was, now) in changed.iter().filter(|(k, _, _)| allowed(k)) {
        if lead {
            eprintln!("--resume: `{key}` changes from {was} to {now}");
        }
    }
    let fixed: Vec<_> = changed.iter().filter(|(k, _, _)| !allowed(k)).collect();
    if let Some((key, was, now)) = fixed.first() {
        let hint = if SCHEDULE_KEYS.contains(&key.as_str()) {
            " (a schedule key: add --change-schedule to resume with the new value)"
        } else {
            " (add --force to resume with it all the same)"
        };
        return Err(Error::Config {
            key: key.clone(),
            message: format!(
                "--resume: the config differs from the run's {} in `{key}` ({was} there, \
                 {now} now){hint}; resume with --config {}",
                config_path.display(),
                config_path.display()
            ),
        });
    }
    Ok(())
}

/// What [`check`] found: the job's inputs, checked once before any rank starts.
#[derive(Clone)]
struct Checked {
    micro_batch: usize,
    resume_from: Option<PathBuf>,
    plan: data::DataPlan,
    total: u64,
    warmup: u64,
}

/// Checks everything `job` needs on `world` ranks before anything is written to `--out`.
fn check(job: &PretrainJob, world: usize, lead: bool) -> Result<Checked> {
    let cfg = &job.config;
    cfg.validate()?;
    let micro_batch = cfg.micro_batch(world)?;
    let resume_from = checkpoint_to_resume(job, lead)?;
    if resume_from.is_some() {
        check_resumed_config(job, &job.out.join(CONFIG_FILE), lead)?;
    }
    let plan = data::plan(&job.data, cfg)?;
    let RunLength { total, warmup } = RunLength::new(&cfg.schedule, plan.steps_per_epoch as u64);
    if let Some(available) = plan.max_steps {
        if total > available as u64 {
            return Err(Error::Data(format!(
                "{} holds view shards for {available} steps but the run needs {total}: \
                 lower epochs/max_steps or make more epochs with `loader views`",
                job.data.display()
            )));
        }
    }
    if let Some(ckpt) = &resume_from {
        check_same_data(ckpt, &plan.identity, job)?;
    }
    Ok(Checked {
        micro_batch,
        resume_from,
        plan,
        total,
        warmup,
    })
}

/// Every rank's copy of rank 0's parameters (online and target), so that the ranks start equal.
fn broadcast_parameters(model: &MaskDeep, group: &Group) -> Result<()> {
    if group.world_size() == 1 {
        return Ok(());
    }
    for vars in [&model.online_vars, &model.target_vars] {
        let mut named = vars
            .data()
            .lock()
            .expect("var map")
            .clone()
            .into_iter()
            .collect::<Vec<_>>();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, var) in named {
            var.set(&group.broadcast(var.as_tensor(), 0)?)?;
        }
    }
    Ok(())
}

/// One rank's share of a pretraining job: the whole job when `group` has one rank. Every rank
/// trains on its part of each step's global batch and applies the same averaged update; only
/// rank 0 writes the run folder (config, metrics, checkpoints) and shows progress. Each step
/// beats `watchdog`, when given.
fn run_rank(
    job: &PretrainJob,
    group: &Group,
    checked: &Checked,
    watchdog: Option<&dist::watchdog::Watchdog>,
) -> Result<Summary> {
    let cfg = &job.config;
    let (rank, world) = (group.rank(), group.world_size());
    let lead = rank == 0;
    let accumulate = cfg.parallel.accumulate;
    let config_path = job.out.join(CONFIG_FILE);
    let Checked {
        micro_batch,
        resume_from,
        plan,
        total,
        warmup,
    } = checked.clone();
    let knn_sets = match &job.knn {
        Some(sets) if lead => Some(KnnMonitor::open(sets, cfg)?),
        _ => None,
    };
    let base_lr = cfg.scaled_lr();
    let mut model = MaskDeep::new(cfg, &job.device)?;
    let mut optimizer = model.optimizer()?;
    let mut start = 0u64;
    let mut last_checkpoint = None;
    if let Some(ckpt) = resume_from {
        let state = checkpoint::load(&ckpt, &mut model, Some(&mut optimizer))?;
        start = state.step;
        last_checkpoint = Some(ckpt);
    }
    broadcast_parameters(&model, group)?;
    let mut trainer = TrainStep::new(model, optimizer);
    if world > 1 {
        let vars = params::trainable(&trainer.model.online_vars)
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        trainer = trainer.with_hook(Box::new(AverageGradients::new(group.clone(), vars)));
        if cfg.parallel.sync_bn {
            trainer = trainer.with_sync_bn(group.clone());
        }
    }
    // Only now, with the inputs checked and the checkpoint loaded, is --out written (by rank 0).
    let metrics_path = job.out.join(METRICS_FILE);
    let mut metrics = if lead {
        std::fs::create_dir_all(&job.out).io("create", &job.out)?;
        write_json_atomic(&config_path, cfg)?;
        truncate_metrics(&metrics_path, start)?;
        Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .io("open", &metrics_path)?,
        )
    } else {
        None
    };

    let end = job.stop_after.map_or(total, |n| total.min(start + n));
    let progress = if lead {
        job.progress
    } else {
        ProgressMode::Off
    };
    let mut reporter = Reporter::new(progress, start, end, total);
    let split = data::Split {
        rank,
        world,
        accumulate,
        local_ranks: match &job.ranks {
            Ranks::One => 1,
            Ranks::Threads(n) => *n,
            Ranks::Group { local, .. } => *local,
        },
    };
    let mut batches = Batches::open(&job.data, cfg, start as usize, end as usize, split)?;
    let views_per_sample = cfg.data.global_views + cfg.data.local_views;
    let (mut wait, mut busy) = (Duration::ZERO, Duration::ZERO);
    let mut last_loss = f64::NAN;
    let mut step = start;
    let mut since_log = SinceLog::new(wait);
    loop {
        let t0 = Instant::now();
        let Some(batch) = batches.next_batch()? else {
            break;
        };
        let t1 = Instant::now();
        for (index, reason) in &batch.skipped {
            reporter.say(&format!("warning: skipped record {index}: {reason}"));
        }
        let lr = schedule::learning_rate(base_lr, cfg.schedule.lr_final, step, warmup, total);
        let tau =
            schedule::ema_momentum(cfg.schedule.ema_base, cfg.schedule.ema_final, step, total);
        let inputs = (0..accumulate)
            .map(|k| {
                let micro = split.micro(k, micro_batch);
                let (global, local) =
                    data::to_device(&batch, &micro, cfg.data.global_views, &job.device)?;
                Ok((global, local, micro.positions))
            })
            .collect::<Result<Vec<_>>>()?;
        let micro: Vec<Views> = inputs
            .iter()
            .map(|(global, local, positions)| Views {
                global,
                local: local.as_ref(),
                positions,
            })
            .collect();
        let (epoch, skipped) = (batch.epoch, batch.skipped.len());
        batches.recycle(batch);
        let loss = trainer.run(&micro, step, Rates { lr, tau }, None)?;
        drop(micro);
        drop(inputs);
        wait += t1 - t0;
        step += 1;
        since_log.steps += 1;
        since_log.skipped += skipped;
        // One host reduction per step: whether any rank was asked to stop, so that every rank
        // reads, logs, checks and stops alike.
        let stop_here = job.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst));
        let mut flag = [if stop_here { 1.0 } else { 0.0 }];
        group.all_reduce_host(&mut flag)?;
        let stop_requested = flag[0] > 0.0;
        if let Some(dog) = watchdog {
            dog.beat();
        }
        let epoch_end = step.is_multiple_of(plan.steps_per_epoch as u64);
        let periodic =
            cfg.run.checkpoint_every > 0 && step.is_multiple_of(cfg.run.checkpoint_every);
        let epochs_done = step / plan.steps_per_epoch as u64;
        let knn_due =
            epoch_end && cfg.run.knn_every > 0 && epochs_done.is_multiple_of(cfg.run.knn_every);
        let checkpoint_due = epoch_end || periodic || step == end || stop_requested;
        let read =
            step.is_multiple_of(cfg.run.log_every) || checkpoint_due || knn_due || step == total;
        if read {
            // Waits for the device: the loss terms averaged over the ranks, and never a
            // checkpoint of weights that a non-finite loss has reached.
            let mut terms = loss.values()?;
            group.all_reduce_host(&mut terms)?;
            let value = terms[0] / world as f64;
            let per_level: Vec<f64> = terms[1..].iter().map(|t| t / world as f64).collect();
            if !value.is_finite() {
                return Err(Error::NonFiniteLoss {
                    step,
                    value,
                    last_checkpoint,
                });
            }
            last_loss = value;
            let elapsed = since_log.start.elapsed().as_secs_f64().max(1e-9);
            let views = since_log.steps as usize * cfg.data.batch_size * views_per_sample;
            let views_per_second = views as f64 / elapsed;
            if let Some(metrics) = &mut metrics {
                let line = Metrics {
                    step,
                    epoch,
                    loss: value,
                    loss_per_level: per_level,
                    lr,
                    ema_momentum: tau,
                    views_per_second,
                    data_wait: (wait - since_log.wait).as_secs_f64() / elapsed,
                    skipped: since_log.skipped,
                };
                serde_json::to_writer(&mut *metrics, &line)?;
                writeln!(metrics).io("write", &metrics_path)?;
            }
            reporter.step(&StepFigures {
                step,
                epoch,
                loss: value,
                lr,
                views_per_second,
            });
        }
        busy += t1.elapsed();
        if let (Some(monitor), Some(metrics)) = (&knn_sets, &mut metrics) {
            if knn_due || step == total {
                let line =
                    monitor.score(&trainer.model, step, epoch, step == total, &job.device)?;
                let (top1, top5) = (line.knn_top1, line.knn_top5);
                serde_json::to_writer(&mut *metrics, &line)?;
                writeln!(metrics).io("write", &metrics_path)?;
                reporter.say(&format!(
                    "step {step}: kNN (k={KNN_K}) top-1 {top1:.2}%  top-5 {top5:.2}%"
                ));
            }
        }
        if checkpoint_due {
            last_checkpoint = Some(match &mut metrics {
                Some(metrics) => {
                    let state = TrainState {
                        step,
                        epoch,
                        total_steps: total,
                        loss: last_loss,
                        files: Default::default(),
                        data: Some(plan.identity),
                    };
                    metrics.flush().io("write", &metrics_path)?;
                    checkpoint::save(
                        &job.out,
                        &trainer.model,
                        &trainer.optimizer,
                        &state,
                        cfg.run.keep_checkpoints,
                    )?
                }
                None => checkpoint::path(&job.out, step),
            });
        }
        if read {
            since_log = SinceLog::new(wait);
        }
        if stop_requested && step < end {
            reporter.finish();
            return Err(Error::Interrupted {
                step,
                checkpoint: last_checkpoint.clone().unwrap_or_default(),
            });
        }
    }
    reporter.finish();
    let elapsed = (wait + busy).as_secs_f64().max(1e-9);
    let ran = step - start;
    Ok(Summary {
        steps: step,
        total_steps: total,
        steps_this_run: ran,
        final_loss: last_loss,
        checkpoint: last_checkpoint
            .ok_or_else(|| Error::Run("the run made no step: nothing to train".into()))?,
        views_per_second: (ran as usize * cfg.data.batch_size * views_per_sample) as f64 / elapsed,
        data_wait: wait.as_secs_f64() / elapsed,
    })
}

/// Neighbours of the kNN evaluation during training.
const KNN_K: usize = knn::DEFAULT_K[0];

/// The kNN evaluation during training: the datasets, and the fixed subsets (`knn_per_class`)
/// that the evaluations before the last one use.
struct KnnMonitor {
    train: Dataset,
    val: Dataset,
    train_subset: Vec<usize>,
    val_subset: Vec<usize>,
}

impl KnnMonitor {
    /// Opens and checks both sets and draws the subsets from the run's seed.
    fn open(sets: &KnnSets, cfg: &TrainConfig) -> Result<Self> {
        let (train, val) = (Dataset::open(&sets.train)?, Dataset::open(&sets.val)?);
        features::check_eval_sets(&train, &val)?;
        let per_class = cfg.run.knn_per_class;
        Ok(KnnMonitor {
            train_subset: features::per_class_subset(&train, per_class, cfg.run.seed)?,
            val_subset: features::per_class_subset(&val, per_class, cfg.run.seed + 1)?,
            train,
            val,
        })
    }

    /// kNN top-1 and top-5 of the online backbone (eval mode: the running statistics do not
    /// change), on every image when `everything`, else on the subsets.
    fn score(
        &self,
        model: &MaskDeep,
        step: u64,
        epoch: u64,
        everything: bool,
        device: &Device,
    ) -> Result<KnnMetrics> {
        let origin = features::Origin::of(model, format!("step {step}"))?;
        let extract = |set: &Dataset, subset: &[usize]| {
            let indices = (!everything).then_some(subset);
            features::extract(model, &origin, set, indices, 256, device, &mut |_, _| {})
        };
        let train = extract(&self.train, &self.train_subset)?;
        let val = extract(&self.val, &self.val_subset)?;
        let acc = knn::knn(
            &train,
            &val,
            &[KNN_K],
            knn::TEMPERATURE,
            device,
            &mut |_, _| {},
        )?[0];
        Ok(KnnMetrics {
            step,
            epoch,
            knn_k: KNN_K,
            knn_top1: acc.top1,
            knn_top5: acc.top5,
            knn_train_images: train.len(),
            knn_val_images: val.len(),
        })
    }
}

/// Drops metric lines of steps after `start` (they are about to be run again).
fn truncate_metrics(path: &Path, start: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).io("read", path)?;
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= start)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    shared::fsutil::write_atomic(path, kept.as_bytes())?;
    Ok(())
}
