//! `trainer`: MaskDeep pretraining of ResNets on shards made by `loader`, on CPU or CUDA.
//!
//! The binary only parses arguments, shows progress and wires the library's pieces.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// mimalloc reuses freed tensor buffers instead of returning them to the OS and page-faulting them
/// back in at the next step (the system allocator's behaviour for large blocks).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context, Result};

use clap::{Args, Parser, Subcommand, ValueEnum};
use shared::cpu::Isa;
use shared::dataset::Dataset;
use trainer::config::{TrainConfig, PRESETS};
use trainer::diag::bench;
use trainer::eval::{cache, features, knn, linear};
use trainer::method::maskdeep::MaskDeep;
use trainer::train::checkpoint;
use trainer::train::pretrain::{self, PretrainJob, Resume};
use trainer::train::progress::ProgressMode;

#[derive(Parser)]
#[command(
    name = "trainer",
    version,
    about = "MaskDeep self-supervised pretraining of ResNets on loader shards"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pretrain a backbone with MaskDeep (or BYOL) on packed shards or view shards.
    Pretrain(PretrainArgs),
    /// Time training steps on synthetic inputs: views/s and where a step's time goes.
    Bench(BenchArgs),
    /// Evaluate a frozen backbone on labelled shards: weighted kNN or a linear probe.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Write a checkpoint's online backbone for another framework. The file's metadata names the
    /// architecture, the stem and the width, and (key `torchvision`) how to build the torchvision
    /// model it loads into: `torchvision.models.resnetNN()` for the ImageNet stem; for the small
    /// stem (the `*-small` presets) the same with `conv1 = Conv2d(3, 64, 3, 1, 1, bias=False)`
    /// and `maxpool = Identity()`. A width other than 1 has no torchvision model.
    Export {
        /// A checkpoint folder, or a run folder (its newest checkpoint).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Only `torchvision`: torchvision's parameter names and layouts, safetensors.
        #[arg(long, default_value = "torchvision")]
        format: String,
        /// The .safetensors file to write.
        #[arg(long)]
        out: PathBuf,
        /// Also write a fixed input and the backbone's features of it to this .safetensors file,
        /// to check the export in another framework (tools/check_export.py).
        #[arg(long)]
        probe: Option<PathBuf>,
    },
    /// Check every checkpoint of a run: each file is there with the checksum its state.json
    /// records. Exits non-zero, naming each damaged checkpoint, if any is.
    Verify {
        /// A run folder (from `trainer pretrain --out`).
        run: PathBuf,
    },
    /// Plot training loss and kNN accuracy of one or more runs over their steps into a PNG.
    Plot {
        /// A run folder (with metrics.jsonl), as NAME=DIR to name its line; repeat for more runs.
        #[arg(long = "run", required = true)]
        runs: Vec<String>,
        /// A dashed reference line on the kNN panel, as NAME=PERCENT (e.g. "random=12.5").
        #[arg(long)]
        reference: Option<String>,
        /// The PNG file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write one MaskDeep loss of the config (CPU, f32) for another implementation to recompute:
    /// weights, standard-normal views and visible cells drawn from --seed, our loss per level and
    /// every gradient, in one safetensors file. `tools/maskdeep_torch_reference.py FILE` recomputes
    /// it in PyTorch from the method's description.
    StepCase {
        #[command(flatten)]
        config: ConfigArgs,
        /// Seed of the views and the visible cells (the weights come from the config's seed).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The safetensors file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Compare one small MaskDeep step on --device (f32, and bf16 on CUDA) with the CPU in f32:
    /// relative errors of the encoder output, the loss and every gradient. Exits non-zero on a
    /// failure.
    Parity {
        /// The device to check against the CPU (cuda, cuda:N).
        #[arg(long, default_value = "cuda")]
        device: String,
        /// Print one JSON object per comparison.
        #[arg(long)]
        json: bool,
    },
}

/// Where the configuration comes from.
#[derive(Args)]
struct ConfigArgs {
    /// Named preset: maskdeep-r50-imagenet (the paper's setting: ResNet-50, 224 px, 200 epochs,
    /// batch 256), maskdeep-r18-imagenet, maskdeep-r18-small (small stem, 32-96 px data,
    /// cross-view targets), maskdeep-r18-small-paper (the same with the paper's targets: each
    /// view also predicts its own), and the BYOL twin of each (byol-r50-imagenet,
    /// byol-r18-imagenet, byol-r18-small).
    #[arg(long, conflicts_with = "config")]
    preset: Option<String>,
    /// A JSON config file with every key (a run's config.json is one).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override one config key, e.g. --set epochs=10 --set levels='["c5"]'. Keys include epochs,
    /// max_steps, batch_size, lr, seed, image_size, width, groups, visible_ratio, levels,
    /// mask_grid (c3, c4 or c5; the coarsest masked level by default), optimizer, weight_decay,
    /// warmup_epochs, lr_final, ema_base, ema_final, local_views, rotation, targets, head_bn (joint
    /// or per_view), bf16, threads.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl ConfigArgs {
    /// Whether any of --preset, --config, --set was given.
    fn describes_a_model(&self) -> bool {
        self.preset.is_some() || self.config.is_some() || !self.sets.is_empty()
    }

    fn resolve(&self) -> Result<TrainConfig> {
        let mut cfg = match (&self.preset, &self.config) {
            (Some(name), None) => TrainConfig::preset(name)?,
            (None, Some(path)) => TrainConfig::load(path)?,
            _ => bail!(
                "give --preset NAME or --config FILE (presets: {})",
                PRESETS.join(", ")
            ),
        };
        for s in &self.sets {
            cfg.set(s)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The values of `--resume`.
#[derive(Clone, Copy, ValueEnum)]
enum ResumeArg {
    /// `--resume` alone: a checkpoint must be there.
    Yes,
    /// `--resume auto`: resume if there is a checkpoint, else start.
    Auto,
}

#[derive(Args)]
struct PretrainArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Packed shards (from `loader pack`) or view shards (from `loader views`).
    #[arg(long)]
    data: PathBuf,
    /// Run folder: config.json, metrics.jsonl, checkpoints/.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its newest good checkpoint (give the run's config.json as
    /// --config, or the same preset and --set values); a damaged newest checkpoint is reported and
    /// the one before it used. Without any checkpoint this is an error; `--resume auto` starts a
    /// new run instead (for job scripts that are requeued after a preemption).
    #[arg(long, num_args = 0..=1, default_missing_value = "yes", value_name = "auto")]
    resume: Option<ResumeArg>,
    /// With --resume: continue even if --data is not the data the checkpoint was trained on, or
    /// config keys changed (each change is printed; a model that no longer fits the checkpoint
    /// still fails to load).
    #[arg(long, requires = "resume")]
    force: bool,
    /// With --resume: accept new values of the schedule keys (lr, lr_final, warmup_epochs,
    /// weight_decay, ema_base, ema_final, checkpoint_every, keep_checkpoints, knn_every,
    /// knn_per_class, log_every), e.g. a
    /// lower lr after the loss went bad; they are saved to the run's config.json. Every other
    /// key must match the run's.
    #[arg(long, requires = "resume")]
    change_schedule: bool,
    /// Labelled packed shards to score with kNN every `knn_every` epochs (logged to metrics.jsonl).
    #[arg(long)]
    val: Option<PathBuf>,
    /// Labelled packed shards whose features are the kNN memory (default: --data).
    #[arg(long, requires = "val")]
    knn_train: Option<PathBuf>,
    /// Stop after this many steps of this invocation (checkpointing first); the schedules still
    /// run over the whole run, so --resume later continues exactly. For time-limited job slots.
    #[arg(long)]
    stop_after: Option<u64>,
    /// Data-parallel on N GPUs of this machine (needs a build with `--features nccl` and
    /// `--device cuda`): starts one process per GPU (rank i on GPU i), which split each step's
    /// global batch (`batch_size`, whose learning-rate scaling is unchanged) and average their
    /// gradients through NCCL; BatchNorm uses the statistics of the global batch unless
    /// `--set sync_bn=false`. Only rank 0 writes the run folder and shows progress. When one
    /// rank fails, the others are stopped and the error names it. Across machines, start the
    /// trainer once per GPU with torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    /// MASTER_PORT) or srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, and MASTER_ADDR set by
    /// the job script) instead: see the README. A run resumes on any number of GPUs that divides
    /// batch_size; with `--set accumulate=K` each rank runs K micro-batches per step and
    /// averages their gradients, so fewer GPUs hold the same global batch (BatchNorm then sees
    /// each micro-batch alone, as it would on K times as many GPUs without SyncBN).
    #[arg(long, value_name = "N", conflicts_with = "ranks")]
    gpus: Option<usize>,
    /// Data-parallel over N ranks as threads of this process (any device; for several CPU
    /// sockets, or to check a multi-GPU setting on one machine): the same split of the global
    /// batch, averaged gradients and SyncBN as --gpus, with an in-process reduction.
    #[arg(long, value_name = "N", default_value_t = 1)]
    ranks: usize,
    /// Print a JSON summary at the end instead of text.
    #[arg(long)]
    json: bool,
    /// Without a terminal (a job's log file) or with --json: print a plain progress line (step,
    /// epoch, loss, lr, views/s, ETA) to stderr every this many seconds (0: every step).
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    log_every: f64,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Extract a backbone's features of every image of labelled shards once into a feature file
    /// (memory-mapped by `eval knn` and `eval linear`: one extraction serves every k, temperature
    /// and learning rate). The centre square of each image, resized to the training size, through
    /// the backbone in eval mode, average-pooled and L2-normalised. A killed extraction continues
    /// where it stopped when run again (from FILE.partial).
    Features {
        #[command(flatten)]
        backbone: BackboneArgs,
        /// Labelled packed shards.
        #[arg(long)]
        data: PathBuf,
        /// The feature file to write.
        #[arg(long)]
        out: PathBuf,
        /// Storage of the values: f32 (exact) or f16 (half the size; rounding can reorder
        /// neighbours whose similarities differ by less than about 1e-3).
        #[arg(long, value_enum, default_value_t = cache::Precision::F32)]
        precision: cache::Precision,
        /// Images per forward pass.
        #[arg(long, default_value_t = 256)]
        batch: usize,
    },
    /// Weighted kNN on L2-normalised features (DINO / solo-learn protocol): top-1 and top-5. The
    /// training features stream past in blocks, so memory stays small whatever their number.
    Knn {
        #[command(flatten)]
        common: EvalArgs,
        /// Neighbour counts to report (one neighbour search serves them all).
        #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = knn::DEFAULT_K)]
        k: Vec<usize>,
        /// Temperature of the neighbours' weights exp(cos / T).
        #[arg(long, default_value_t = knn::TEMPERATURE)]
        temperature: f64,
    },
    /// Linear evaluation. By default the standard protocol of the BYOL, SimCLR and MoCo papers
    /// (and torchvision's ImageNet reference): the backbone frozen with BatchNorm in eval mode;
    /// linear classifiers on its average-pooled features of training images augmented on the fly
    /// (RandomResizedCrop to the backbone's size, area 8-100%, and a horizontal flip); SGD with
    /// Nesterov momentum 0.9, cosine schedule, no weight decay, batch --batch with each rate
    /// scaled by batch/256; scored on the centre crop: at 128 px and more, the centre 224/256 of
    /// the shorter side resized to the size (ImageNet's resize 256, crop 224); below 128 px
    /// (CIFAR-like data) the whole centre square at the size, as those papers do. One classifier
    /// per --lr trains on the same batches; each is reported on --val, the best on --test.
    /// Checkpoints every epoch into --out; --resume continues; SIGTERM/SIGINT checkpoint first.
    /// With --fast: the quick probe on L2-normalised centre-square features (extracted once, or
    /// read from `eval features` files), batch 256, momentum 0.9, cosine, no augmentation.
    Linear {
        #[command(flatten)]
        common: EvalArgs,
        /// The quick probe on frozen features instead of the protocol.
        #[arg(long)]
        fast: bool,
        /// Passes over the training set [default: 90 for the protocol, 100 with --fast].
        #[arg(long)]
        epochs: Option<usize>,
        /// Learning rates, one classifier each, trained side by side in one pass; for the
        /// protocol per 256 images [default: 0.01,0.03,0.1,0.3,1 for the protocol, 0.3,1,3
        /// with --fast].
        #[arg(long, value_delimiter = ',', num_args = 1..)]
        lr: Option<Vec<f64>>,
        /// A third set (shards, or with --fast a feature file) on which the rate chosen on --val
        /// is reported.
        #[arg(long)]
        test: Option<PathBuf>,
        /// The protocol's folder: a checkpoint each epoch (probe-state.json and the heads) and,
        /// at the end, results.json.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the protocol run in --out from its checkpoint.
        #[arg(long)]
        resume: bool,
        /// The protocol's threads decoding and augmenting images (0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// The protocol's seed: the classifiers' initialisation, the epoch orders and the crops.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// Which backbone to evaluate.
#[derive(Args)]
struct BackboneArgs {
    /// A checkpoint folder, or a run folder (its newest checkpoint).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Evaluate a randomly initialised backbone instead (the baseline every report shows), of the
    /// architecture and image size that --preset (with --set values) or --config gives: a run's
    /// config.json makes the baseline match that run by construction.
    #[arg(long)]
    random: bool,
    /// With --random: where the backbone's config comes from, and the device for both.
    #[command(flatten)]
    config: ConfigArgs,
}

/// A loaded backbone, what made it and what its features are called.
struct Backbone {
    model: MaskDeep,
    origin: features::Origin,
    /// The checkpoint folder and its step (none for a random backbone).
    checkpoint: Option<(PathBuf, u64)>,
}

impl BackboneArgs {
    fn load(&self, device: &candle_core::Device) -> Result<Backbone> {
        match (&self.checkpoint, self.random) {
            (Some(_), false) if self.config.describes_a_model() => bail!(
                "--preset, --config and --set describe the --random backbone; a checkpoint brings its own config"
            ),
            (Some(path), false) => {
                let ckpt = checkpoint::resolve(path)?;
                let (model, state) = checkpoint::load_model(&ckpt, device)?;
                let what = format!(
                    "{} step {} ({})",
                    model.config().preset,
                    state.step,
                    backbone_summary(model.config())
                );
                let origin = features::Origin::of(&model, what)?;
                Ok(Backbone {
                    model,
                    origin,
                    checkpoint: Some((ckpt, state.step)),
                })
            }
            (None, true) => {
                let cfg = self.config.resolve()?;
                let what = format!("random backbone ({})", backbone_summary(&cfg));
                let model = MaskDeep::new(&cfg, device)?;
                let origin = features::Origin::of(&model, what)?;
                Ok(Backbone {
                    model,
                    origin,
                    checkpoint: None,
                })
            }
            (Some(_), true) => bail!("give --checkpoint or --random, not both"),
            (None, false) => bail!("give --checkpoint RUN or --random"),
        }
    }
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    backbone: BackboneArgs,
    /// The kNN memory / probe training set: labelled packed shards, or a feature file from
    /// `trainer eval features` (then no backbone is needed unless --val is shards).
    #[arg(long)]
    train: PathBuf,
    /// The set to score: labelled packed shards or a feature file.
    #[arg(long)]
    val: PathBuf,
    /// Images per forward pass (and per step of the linear protocol).
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

impl EvalArgs {
    /// A description of the backbone, with the features of the sets `(name, path)` in order
    /// (read from feature files, or extracted from packed shards with the backbone).
    fn features(
        &self,
        sets: &[(&str, &PathBuf)],
    ) -> Result<(String, Vec<features::LabelledFeatures>)> {
        let device = trainer::device::parse(&self.backbone.config.device)?;
        let gave_backbone = self.backbone.checkpoint.is_some() || self.backbone.random;
        if let Some((name, path)) = sets.iter().find(|(_, path)| !path.is_file()) {
            if !gave_backbone {
                bail!(
                    "--{name} {} is packed shards, not a feature file: give --checkpoint RUN (or \
                     --random) to extract its features",
                    path.display()
                );
            }
        }
        let backbone = if gave_backbone {
            Some(self.backbone.load(&device)?)
        } else {
            None
        };
        // Every input is opened and checked before any features are extracted.
        enum Source {
            File(features::LabelledFeatures),
            Shards(Box<Dataset>),
        }
        let mut sources = Vec::new();
        let mut first_classes: Option<(Vec<String>, String)> = None;
        for (name, path) in sets {
            let source = if path.is_file() {
                let f = cache::open(path)?.1;
                if let Some(b) = backbone.as_ref().filter(|b| b.origin != f.origin) {
                    bail!(
                        "the --{name} feature file was made by {} (fingerprint {:08x}), not by \
                         the backbone given here, {} (fingerprint {:08x})",
                        f.origin.backbone,
                        f.origin.fingerprint,
                        b.origin.backbone,
                        b.origin.fingerprint
                    );
                }
                Source::File(f)
            } else {
                Source::Shards(Box::new(Dataset::open(path)?))
            };
            let classes = match &source {
                Source::File(f) => f.classes.clone(),
                Source::Shards(set) => features::labelled_classes(set)?,
            };
            let here = path.display().to_string();
            match &first_classes {
                Some((first, there)) => features::same_classes(first, &classes, there, &here)?,
                None => first_classes = Some((classes, here)),
            }
            sources.push(source);
        }
        let mut out: Vec<features::LabelledFeatures> = Vec::new();
        for ((name, _), source) in sets.iter().zip(sources) {
            let f = match (source, &backbone) {
                (Source::File(f), _) => f,
                (Source::Shards(set), Some(b)) => features::extract(
                    &b.model,
                    &b.origin,
                    &set,
                    None,
                    self.batch,
                    &device,
                    &mut extraction_progress(name, self.json),
                )?,
                (Source::Shards(_), None) => bail!("--{name}: no backbone to extract features"),
            };
            if let Some(first) = out.first() {
                features::check_comparable(first, &f)?;
            }
            out.push(f);
        }
        let what = out
            .first()
            .map_or_else(String::new, |f| f.origin.backbone.clone());
        Ok((what, out))
    }
}

/// A flag that the first SIGTERM or SIGINT sets (pretraining then finishes its step, writes a
/// checkpoint and exits); a second one ends the process at once, leaving the last complete
/// checkpoint as it was.
/// Fails unless this binary can talk NCCL.
fn require_nccl() -> Result<()> {
    if cfg!(feature = "nccl") {
        Ok(())
    } else {
        Err(trainer::error::Error::Device(
            "several GPUs need NCCL: rebuild with `cargo build --release --features nccl`              (tools/build-cuda.sh builds it); on the CPU, --ranks N runs N ranks as threads"
                .into(),
        )
        .into())
    }
}

/// This process's GPU and its place in the NCCL group that `env` (from the launcher) describes.
fn join_group(
    env: &trainer::dist::launch::RankEnv,
    device: &str,
) -> Result<(candle_core::Device, pretrain::Ranks)> {
    require_nccl()?;
    if !device.starts_with("cuda") {
        return Err(trainer::error::Error::Device(format!(
            "rank {} of {} (set by the launcher) runs on GPU {}: use --device cuda, not {device}",
            env.rank, env.world_size, env.local_rank
        ))
        .into());
    }
    let gpu = trainer::device::parse(&format!("cuda:{}", env.local_rank))?;
    #[cfg(feature = "nccl")]
    {
        let group = trainer::dist::nccl::join(env, &gpu)?;
        let local = env.local_world_size;
        Ok((gpu, pretrain::Ranks::Group { group, local }))
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = gpu;
        bail!("this trainer was built without NCCL")
    }
}

fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        // The shutdown must be registered first: it fires only once the flag is set.
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&flag))?;
        signal_hook::flag::register(signal, Arc::clone(&flag))?;
    }
    Ok(flag)
}

/// Progress of a feature extraction on stderr (images done, images).
fn extraction_progress(name: &str, json: bool) -> impl FnMut(usize, usize) {
    progress(format!("features of {name}"), "images", json)
}

/// Progress of long work on stderr as (done, total) `unit`s: a bar on a terminal, otherwise a
/// line every 30 s (and at the end), so that long work in a job's log is not silent.
fn progress(what: String, unit: &'static str, json: bool) -> impl FnMut(usize, usize) {
    let terminal = std::io::stderr().is_terminal() && !json;
    let mut bar: Option<indicatif::ProgressBar> = None;
    let started = std::time::Instant::now();
    let mut last = started;
    move |done, total| {
        if terminal {
            let bar = bar.get_or_insert_with(|| {
                let b = indicatif::ProgressBar::new(total as u64);
                b.set_style(
                    indicatif::ProgressStyle::with_template(&format!(
                        "{{msg}} {{bar:30}} {{pos}}/{{len}} {unit}  ETA {{eta}}"
                    ))
                    .expect("valid template"),
                );
                b.set_message(what.clone());
                b
            });
            bar.set_position(done as u64);
            if done == total {
                bar.finish_and_clear();
            }
        } else if done == total || last.elapsed().as_secs() >= 30 {
            last = std::time::Instant::now();
            eprintln!(
                "{what}: {done}/{total} {unit} ({:.0} {unit}/s)",
                done as f64 / started.elapsed().as_secs_f64().max(1e-9)
            );
        }
    }
}

/// Prints a linear evaluation: each rate on val as `(base rate, peak rate, accuracy)`, the one
/// chosen on val, and its test accuracy; or one JSON object.
fn report_linear(
    what: &str,
    kind: &str,
    rows: &[(f64, f64, knn::Accuracy)],
    (best_lr, best_val): (f64, &knn::Accuracy),
    test: Option<knn::Accuracy>,
    json: bool,
) {
    if json {
        let val: Vec<_> = rows
            .iter()
            .map(|(lr, peak, a)| serde_json::json!({"lr": lr, "peak_lr": peak, "val": a}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"model": what, "evaluation": kind, "linear": val,
                "best_lr": best_lr, "best_val": best_val, "test": test})
        );
        return;
    }
    for (lr, peak, a) in rows {
        let peak = if peak != lr {
            format!(" (peak {peak})")
        } else {
            String::new()
        };
        let mark = if *lr == best_lr {
            "  <- best on val"
        } else {
            ""
        };
        println!(
            "{what}: {kind} lr {lr}{peak}: val top-1 {:.2}%  top-5 {:.2}%{mark}",
            a.top1, a.top5
        );
    }
    if let Some(t) = test {
        println!(
            "{what}: {kind} lr {best_lr} (chosen on val): test top-1 {:.2}%  top-5 {:.2}%",
            t.top1, t.top5
        );
    }
}

/// What an evaluation report says about the backbone: architecture, stem, width, image size.
fn backbone_summary(cfg: &TrainConfig) -> String {
    let stem = if cfg.model.small_stem {
        "small stem"
    } else {
        "ImageNet stem"
    };
    format!(
        "{}, {stem}, width {}, {} px",
        cfg.model.arch.name(),
        cfg.model.width,
        cfg.data.image_size
    )
}

/// The model and the batch a benchmark runs.
#[derive(Args)]
struct BenchShape {
    #[command(flatten)]
    config: ConfigArgs,
    /// Samples per batch (overrides the preset's batch_size).
    #[arg(long)]
    batch: Option<usize>,
    /// Global view side in pixels (overrides image_size).
    #[arg(long)]
    size: Option<u32>,
}

impl BenchShape {
    /// The config with --batch and --size applied, checked, and the device to run on.
    fn resolve(&self) -> Result<(TrainConfig, candle_core::Device)> {
        let mut cfg = self.config.resolve()?;
        if let Some(b) = self.batch {
            cfg.data.batch_size = b;
        }
        if let Some(s) = self.size {
            cfg.data.image_size = s;
        }
        cfg.validate()?;
        let device = trainer::device::parse(&self.config.device)?;
        trainer::device::drive_from_this_thread_only(&device);
        Ok((cfg, device))
    }
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchArgs {
    /// Time something other than training steps.
    #[command(subcommand)]
    other: Option<BenchCommand>,
    #[command(flatten)]
    shape: BenchShape,
    /// Timed steps (after one warm-up step); medians are reported.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Also time these group counts, to show that the encoder's time does not grow with G.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<usize>,
    /// Print one JSON object (`views_per_second` at the top level).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time the forward and the backward of each distinct convolution of the config's backbone,
    /// on as many images as a step's online encoder gets (batch times global views), at the
    /// global view size: a step's convolution time, layer by layer. `tools/bench-convs.sh` sets
    /// PyTorch's beside it.
    Convs {
        #[command(flatten)]
        shape: BenchShape,
        /// Timed calls of each pass (after one warm-up call); medians are reported.
        #[arg(long, default_value_t = 9)]
        reps: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Time the streamed weighted kNN (`eval knn`) on random unit features and print its time
    /// and the process's peak memory beside the size of the dense similarity matrix.
    Knn {
        /// Training features (the kNN memory).
        #[arg(long, default_value_t = 200_000)]
        train: usize,
        /// Val features to score.
        #[arg(long, default_value_t = 10_000)]
        val: usize,
        /// Feature width (512: ResNet-18, 2048: ResNet-50).
        #[arg(long, default_value_t = 512)]
        dim: usize,
        /// Classes of the random labels.
        #[arg(long, default_value_t = 1000)]
        classes: usize,
        /// Neighbour counts.
        #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = knn::DEFAULT_K)]
        k: Vec<usize>,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// mimalloc's `mi_option_purge_delay` (its `mi_option_e` value in mimalloc 2.x).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    shared::process::quiet_on_closed_pipe();
    // Keep freed memory instead of returning it to the OS after 10 ms: a training step frees and
    // reallocates the same large buffers, and fresh pages cost a kernel page-zeroing each time.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; mimalloc reads it when it next considers purging.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    let cli = Cli::parse();
    let in_process_ranks = matches!(&cli.command, Command::Pretrain(args) if args.ranks > 1);
    share_cores_between_pools(!in_process_ranks);
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// How many rounds Candle's element-wise workers spin after an op before they sleep (Candle's own
/// default is 25,000, about half a millisecond).
const CANDLE_SPIN_ROUNDS: &str = "200";

/// Arranges the CPU threads as OpenMP would: one worker per core, the calling thread among them.
///
/// Our kernels run on rayon's global pool and Candle's element-wise ops on its own barrier pool,
/// so a step alternates between the two many times. With rayon's default pool, the main thread
/// hands every kernel to other threads and sleeps, and Candle's idle worker keeps spinning through
/// the next kernel, taking a core from it. Here the main thread is rayon's worker 0
/// (`use_current_thread`), and Candle's workers sleep soon after an op, unless
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set. With ranks as threads of this process the main thread
/// only waits for them, so there the pool keeps its own workers (`main_joins_pool` false).
fn share_cores_between_pools(main_joins_pool: bool) {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // Set before any other thread exists, and before Candle first reads it.
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_ROUNDS);
    }
    if main_joins_pool {
        // An error means a pool already exists, which then serves as it is.
        let _ = rayon::ThreadPoolBuilder::new()
            .use_current_thread()
            .build_global();
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Pretrain(args) => {
            let stop = stop_on_signals()?;
            let launched = trainer::dist::launch::RankEnv::from_env()?;
            if let (None, Some(gpus)) = (&launched, args.gpus) {
                if gpus > 1 {
                    require_nccl()?;
                    return Ok(trainer::dist::launch::spawn_local(gpus, &stop)?);
                }
            }
            let (device, ranks) = match &launched {
                Some(env) => join_group(env, &args.config.device)?,
                None if args.ranks > 1 => (
                    trainer::device::parse(&args.config.device)?,
                    pretrain::Ranks::Threads(args.ranks),
                ),
                None => (
                    trainer::device::parse(&args.config.device)?,
                    pretrain::Ranks::One,
                ),
            };
            // One process per GPU, one thread driving it (not so for in-process ranks).
            if !matches!(ranks, pretrain::Ranks::Threads(_)) {
                trainer::device::drive_from_this_thread_only(&device);
            }
            let lead = launched.as_ref().is_none_or(|env| env.rank == 0);
            let job = PretrainJob {
                config: args.config.resolve()?,
                data: args.data.clone(),
                out: args.out,
                device,
                ranks,
                resume: match args.resume {
                    None => Resume::No,
                    Some(ResumeArg::Yes) => Resume::Required,
                    Some(ResumeArg::Auto) => Resume::Auto,
                },
                force: args.force,
                stop_after: args.stop_after,
                change_schedule: args.change_schedule,
                stop: Some(stop),
                knn: args.val.map(|val| pretrain::KnnSets {
                    train: args.knn_train.unwrap_or_else(|| args.data.clone()),
                    val,
                }),
                progress: if std::io::stderr().is_terminal() && !args.json {
                    ProgressMode::Bar
                } else {
                    ProgressMode::Lines {
                        every: std::time::Duration::from_secs_f64(args.log_every),
                    }
                },
            };
            let summary = pretrain::run(&job)?;
            if !lead {
                // Rank 0 reports for the job.
            } else if args.json {
                println!("{}", serde_json::to_string(&summary)?);
            } else if summary.steps_this_run == 0 {
                println!(
                    "the run in {} had already finished ({} of {} steps); nothing to do\ncheckpoint: {}",
                    job.out.display(),
                    summary.steps,
                    summary.total_steps,
                    summary.checkpoint.display()
                );
            } else {
                println!(
                    "{}: {} steps ({} of {} done), final loss {:.4}, {:.1} views/s, {:.1}% of the time waiting for data\ncheckpoint: {}",
                    if summary.steps < summary.total_steps { "stopped" } else { "done" },
                    summary.steps_this_run,
                    summary.steps,
                    summary.total_steps,
                    summary.final_loss,
                    summary.views_per_second,
                    summary.data_wait * 100.0,
                    summary.checkpoint.display()
                );
                if summary.steps < summary.total_steps {
                    println!(
                        "the run is incomplete: continue it with the same command and --resume \
                         (or --config {} --resume)",
                        job.out.join(pretrain::CONFIG_FILE).display()
                    );
                }
            }
        }
        Command::Bench(BenchArgs {
            other:
                Some(BenchCommand::Knn {
                    train,
                    val,
                    dim,
                    classes,
                    k,
                    device,
                    json,
                }),
            ..
        }) => {
            let spec = trainer::diag::knn_bench::KnnBenchSpec {
                train,
                val,
                dim,
                classes,
                ks: k,
            };
            let r = trainer::diag::knn_bench::run(&spec, &trainer::device::parse(&device)?)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let gb = |b: u64| b as f64 / 1e9;
                println!(
                    "kNN k={:?} of {val} val against {train} train features of {dim} on {device}: \
                     {:.2} s; peak memory {} (features {:.2} GB; the dense matrix would be {:.2} GB)",
                    r.spec.ks,
                    r.seconds,
                    r.peak_memory_bytes
                        .map_or("unknown".into(), |b| format!("{:.2} GB", gb(b))),
                    gb(r.features_bytes),
                    gb(r.dense_matrix_bytes)
                );
            }
        }
        Command::Bench(BenchArgs {
            other: Some(BenchCommand::Convs { shape, reps, json }),
            ..
        }) => {
            let (cfg, device) = shape.resolve()?;
            let times = trainer::diag::conv_bench::time_convs(&cfg, &device, reps)?;
            if json {
                let out = serde_json::json!({
                    "preset": cfg.preset,
                    "device": shape.config.device,
                    "instruction_set": Isa::widest().name(),
                    "kernels": Isa::active().name(),
                    "threads": rayon::current_num_threads(),
                    "convs": times,
                });
                println!("{out}");
            } else {
                println!(
                    "{}: the backbone's convolutions on {} images on {} (gemm on {}, our kernels on {}, {} threads), medians of {reps}",
                    cfg.preset,
                    times.images,
                    shape.config.device,
                    Isa::widest(),
                    Isa::active(),
                    rayon::current_num_threads(),
                );
                println!("c_in  side  c_out  k  stride  count  forward ms  backward ms");
                for l in &times.layers {
                    let s = l.shape;
                    println!(
                        "{:4}  {:4}  {:5}  {}  {:6}  {:5}  {:10.2}  {:11.2}{}",
                        s.c_in,
                        s.side,
                        s.c_out,
                        s.geometry.k,
                        s.geometry.stride,
                        l.count,
                        l.forward_ms,
                        l.backward_ms,
                        if l.input_gradient {
                            ""
                        } else {
                            "  (weight gradient only)"
                        }
                    );
                }
                println!(
                    "all {} convolutions: forward {:.1} ms, backward {:.1} ms",
                    times.layers.iter().map(|l| l.count).sum::<usize>(),
                    times.forward_ms,
                    times.backward_ms
                );
            }
        }
        Command::Bench(args) => {
            let (cfg, device) = args.shape.resolve()?;
            let main = bench::time_steps(&cfg, &device, args.steps)?;
            let mut sweep = Vec::new();
            for &g in &args.groups {
                let mut c = cfg.clone();
                c.method.groups = g;
                sweep.push(bench::time_steps(&c, &device, args.steps)?);
            }
            if args.json {
                let out = serde_json::json!({
                    "preset": cfg.preset,
                    "device": args.shape.config.device,
                    "instruction_set": Isa::widest().name(),
                    "kernels": Isa::active().name(),
                    "batch": cfg.data.batch_size,
                    "size": cfg.data.image_size,
                    "bf16": cfg.model.bf16,
                    "views_per_second": main.views_per_second,
                    "step": main,
                    "groups": sweep,
                });
                println!("{out}");
            } else {
                println!(
                    "{} batch {} at {} px on {} (gemm on {}, our kernels on {}, {} threads): {:.1} views/s ({:.1} ms/step)",
                    cfg.preset,
                    cfg.data.batch_size,
                    cfg.data.image_size,
                    args.shape.config.device,
                    Isa::widest(),
                    Isa::active(),
                    rayon::current_num_threads(),
                    main.views_per_second,
                    main.step_ms
                );
                println!(
                    "ops per step: forward {} (graph nodes, target branch included), backward {}, update {} (on a GPU {} multi-tensor launches)",
                    main.ops.forward, main.ops.backward, main.ops.update, main.ops.update_gpu
                );
                if let Some(bytes) = main.peak_memory_bytes {
                    println!(
                        "peak GPU memory over the steps: {:.2} GiB",
                        bytes as f64 / (1u64 << 30) as f64
                    );
                }
                println!("groups  views/s  step ms  encoder ms  heads ms  target ms  backward ms  optim ms");
                for t in std::iter::once(&main).chain(&sweep) {
                    println!(
                        "{:>6}  {:>7.1}  {:>7.1}  {:>10.1}  {:>8.1}  {:>9.1}  {:>11.1}  {:>8.1}",
                        t.groups,
                        t.views_per_second,
                        t.step_ms,
                        t.online_encoder_ms,
                        t.heads_ms,
                        t.target_ms,
                        t.backward_ms,
                        t.optimizer_ms
                    );
                }
            }
        }
        Command::Eval(EvalCommand::Features {
            backbone,
            data,
            out,
            precision,
            batch,
        }) => {
            let device = trainer::device::parse(&backbone.config.device)?;
            let dataset = Dataset::open(&data)?;
            let b = backbone.load(&device)?;
            let extraction = cache::Extraction {
                model: &b.model,
                origin: &b.origin,
                checkpoint: b.checkpoint.clone(),
                dataset: &dataset,
                precision,
                batch,
                device: &device,
            };
            let header = extraction.header()?;
            if cache::holds(&out, &header) {
                println!(
                    "{} already holds these features (same backbone, data and precision); \
                     nothing to do",
                    out.display()
                );
                return Ok(());
            }
            let partial = cache::partial_path(&out);
            if partial.exists() {
                eprintln!(
                    "continuing {} if it is this extraction's",
                    partial.display()
                );
            }
            let name = data.display().to_string();
            extraction.write(&out, &header, &mut extraction_progress(&name, false))?;
            println!(
                "wrote {}: {} images x {} {:?} features of {}",
                out.display(),
                header.rows,
                header.dim,
                header.precision,
                header.origin.backbone
            );
        }
        Command::Eval(EvalCommand::Knn {
            common,
            k,
            temperature,
        }) => {
            let (what, sets) =
                common.features(&[("train", &common.train), ("val", &common.val)])?;
            let (train, val) = (&sets[0], &sets[1]);
            let device = trainer::device::parse(&common.backbone.config.device)?;
            let mut results = Vec::new();
            let mut report = progress("kNN".into(), "training features", common.json);
            let scores = knn::knn(train, val, &k, temperature, &device, &mut report)?;
            for (&kk, acc) in k.iter().zip(scores) {
                results.push(serde_json::json!({"k": kk, "top1": acc.top1, "top5": acc.top5}));
                if !common.json {
                    println!(
                        "{what}: kNN k={kk}: top-1 {:.2}%  top-5 {:.2}%",
                        acc.top1, acc.top5
                    );
                }
            }
            if common.json {
                println!("{}", serde_json::json!({"model": what, "knn": results}));
            }
        }
        Command::Eval(EvalCommand::Linear {
            common,
            fast: true,
            epochs,
            lr,
            test,
            out,
            resume,
            threads: _,
            seed,
        }) => {
            if out.is_some() || resume {
                bail!("--out and --resume belong to the protocol: the --fast probe keeps nothing");
            }
            let epochs = epochs.unwrap_or(100);
            let lr = lr.unwrap_or_else(|| vec![0.3, 1.0, 3.0]);
            let mut named = vec![("train", &common.train), ("val", &common.val)];
            if let Some(test) = &test {
                named.push(("test", test));
            }
            let (what, sets) = common.features(&named)?;
            let results = linear::sweep(&sets[0], &sets[1], epochs, &lr, seed)?;
            let best = linear::best(&results).context("give at least one --lr")?;
            let on_test = sets.get(2).map(|t| best.0.score(t)).transpose()?;
            let rows: Vec<_> = results.iter().map(|(p, a)| (p.lr, p.lr, *a)).collect();
            report_linear(
                &what,
                "linear probe",
                &rows,
                (best.0.lr, &best.1),
                on_test,
                common.json,
            );
        }
        Command::Eval(EvalCommand::Linear {
            common,
            fast: false,
            epochs,
            lr,
            test,
            out,
            resume,
            threads,
            seed,
        }) => {
            let out = out.context(
                "the linear protocol needs --out DIR for its checkpoints and results (or use --fast)",
            )?;
            let device = trainer::device::parse(&common.backbone.config.device)?;
            let mut sets = Vec::new();
            for (name, path) in [
                ("train", Some(&common.train)),
                ("val", Some(&common.val)),
                ("test", test.as_ref()),
            ] {
                let Some(path) = path else { continue };
                if path.is_file() {
                    bail!(
                        "--{name} {} is a feature file: the protocol augments images, so it needs \
                         packed shards (feature files serve --fast)",
                        path.display()
                    );
                }
                sets.push(Dataset::open(path)?);
            }
            let b = common.backbone.load(&device)?;
            let mut sets = sets.into_iter();
            let train = Arc::new(sets.next().expect("train"));
            let val = sets.next().expect("val");
            let test = sets.next();
            let job = trainer::eval::protocol::ProtocolJob {
                backbone: &b.model.online.backbone,
                origin: &b.origin,
                spec: trainer::eval::protocol::ProtocolSpec {
                    epochs: epochs.unwrap_or(90),
                    batch: common.batch,
                    lrs: lr.unwrap_or_else(|| vec![0.01, 0.03, 0.1, 0.3, 1.0]),
                    seed,
                    image_size: b.origin.image_size,
                },
                train,
                val: &val,
                test: test.as_ref(),
                out: &out,
                resume,
                threads: if threads == 0 {
                    std::thread::available_parallelism().map_or(1, |n| n.get())
                } else {
                    threads
                },
                device: &device,
            };
            let flag = stop_on_signals()?;
            let mut steps = progress("linear protocol".into(), "steps", common.json);
            let mut val_bar = progress("scoring val".into(), "images", common.json);
            let mut test_bar = progress("scoring test".into(), "images", common.json);
            let report = job.run(trainer::eval::protocol::Hooks {
                steps: &mut steps,
                scoring: &mut |name, done, all| match name {
                    "val" => val_bar(done, all),
                    _ => test_bar(done, all),
                },
                stop: &|_| flag.load(std::sync::atomic::Ordering::SeqCst),
            })?;
            let what = &b.origin.backbone;
            report_linear(
                what,
                "linear protocol",
                &report.val,
                (report.best_lr, &report.best_val),
                report.test,
                common.json,
            );
            if !common.json {
                println!(
                    "wrote {}",
                    out.join(trainer::eval::protocol::RESULTS_FILE).display()
                );
            }
        }
        Command::Export {
            checkpoint: path,
            format,
            out,
            probe,
        } => {
            if format != "torchvision" {
                bail!("unknown export format `{format}`: only torchvision");
            }
            let ckpt = checkpoint::resolve(&path)?;
            let (model, state) = checkpoint::load_model(&ckpt, &candle_core::Device::Cpu)?;
            trainer::eval::export::write_torchvision(&model, state.step, &out)?;
            if let Some(path) = probe {
                candle_core::safetensors::save(&trainer::eval::export::probe(&model)?, &path)?;
            }
            let meta = trainer::eval::export::metadata(&model, state.step);
            println!(
                "wrote {} ({} backbone, {} stem, width {}); torchvision: {}",
                out.display(),
                meta["arch"],
                meta["stem"],
                meta["width"],
                meta["torchvision"]
            );
        }
        Command::Verify { run } => {
            let all = checkpoint::list(&run)?;
            if all.is_empty() {
                bail!(
                    "{} holds no checkpoints (is it a run folder?)",
                    run.display()
                );
            }
            let mut damaged = 0;
            for ckpt in &all {
                match checkpoint::verify(ckpt) {
                    Ok(state) => println!(
                        "ok       {} (step {}, loss {:.4})",
                        ckpt.display(),
                        state.step,
                        state.loss
                    ),
                    Err(why) => {
                        damaged += 1;
                        println!("damaged  {}: {why}", ckpt.display());
                    }
                }
            }
            if damaged > 0 {
                bail!(
                    "{damaged} of {} checkpoints in {} are damaged; --resume uses the newest good one",
                    all.len(),
                    run.display()
                );
            }
        }
        Command::Plot {
            runs,
            reference,
            out,
        } => {
            let curves = runs
                .iter()
                .map(|r| {
                    let (name, dir) = r.split_once('=').unwrap_or((r.as_str(), r.as_str()));
                    trainer::diag::plot::read_run(std::path::Path::new(dir), name)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let reference = match &reference {
                Some(r) => {
                    let (name, value) = r
                        .split_once('=')
                        .with_context(|| format!("--reference `{r}`: expected NAME=PERCENT"))?;
                    let value: f64 = value
                        .trim()
                        .parse()
                        .with_context(|| format!("--reference `{r}`: `{value}` is not a number"))?;
                    Some((name, value))
                }
                None => None,
            };
            trainer::diag::plot::draw(&curves, reference, &out)?;
            println!("wrote {}", out.display());
        }
        Command::StepCase { config, seed, out } => {
            let cfg = config.resolve()?;
            let case = trainer::diag::step_case::write(&cfg, seed, &out)?;
            println!(
                "wrote {} ({} tensors): loss per level {:?}, total {}",
                out.display(),
                case.tensors,
                case.per_level,
                case.total
            );
        }
        Command::Parity { device, json } => {
            let dev = trainer::device::parse(&device)?;
            let mut failed = false;
            // bf16 runs on CUDA only (the CPU's matmuls have none).
            let precisions: &[bool] = if dev.is_cpu() {
                &[false]
            } else {
                &[false, true]
            };
            for &bf16 in precisions {
                let r = trainer::diag::parity::check(&dev, &device, bf16)?;
                failed |= !r.pass;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                        "parity {} {}: output {:.2e}  loss {:.2e}  gradients {:.2e} (worst {})  bound {:.0e}  {}",
                        r.device, r.dtype, r.output_rel, r.loss_rel, r.grad_rel, r.worst_param,
                        r.bound, if r.pass { "PASS" } else { "FAIL" }
                    );
                }
            }
            if failed {
                bail!("parity check failed");
            }
        }
    }
    Ok(())
}
