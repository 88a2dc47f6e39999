//! Training configuration: named presets, JSON config files and `--set key=value` overrides, checked
//! before anything runs.

use std::path::Path;

use crate::error::{Error, IoContext, Result};
use serde::{Deserialize, Serialize};
use shared::views::ViewSpec;

use crate::nn::resnet::{Depth, ResNetConfig};

/// Every knob of a pretraining run, in typed sections. Saved as `config.json` in the run folder,
/// where the sections are flattened into one object of keys (the format of every earlier run, so
/// old run folders still resume), and set one key at a time by `--set key=value`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The preset this configuration started from.
    pub preset: Preset,
    #[serde(flatten)]
    pub model: ModelConfig,
    #[serde(flatten)]
    pub method: MethodConfig,
    #[serde(flatten)]
    pub optim: OptimConfig,
    #[serde(flatten)]
    pub schedule: ScheduleConfig,
    #[serde(flatten)]
    pub data: DataConfig,
    #[serde(flatten)]
    pub parallel: ParallelConfig,
    #[serde(flatten)]
    pub run: RunConfig,
}

/// The networks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Backbone: `resnet18`, `resnet34` or `resnet50`.
    pub arch: Depth,
    /// 3x3 stride-1 stem without max-pool (32-96 px images).
    pub small_stem: bool,
    /// Width multiplier of the backbone.
    pub width: f64,
    /// Projector hidden width and output width; predictor hidden width.
    pub proj_hidden: usize,
    pub proj_dim: usize,
    pub pred_hidden: usize,
    /// Mixed precision: bf16 encoder (f32 master weights, statistics and heads).
    pub bf16: bool,
}

impl ModelConfig {
    /// The dtype the encoder computes in: bf16 under mixed precision, else f32.
    pub fn compute_dtype(&self) -> candle_core::DType {
        if self.bf16 {
            candle_core::DType::BF16
        } else {
            candle_core::DType::F32
        }
    }
}

/// MaskDeep's masking and loss.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MethodConfig {
    /// Masking groups re-pooled from one encoder pass.
    pub groups: usize,
    /// Share of the coarsest masked grid that stays visible.
    pub visible_ratio: f64,
    /// Masked levels, among `c3`, `c4`, `c5`.
    pub levels: Vec<Level>,
    /// Loss weight of each level, in the order of `levels`.
    pub level_weights: Vec<f64>,
    /// Targets of each online view: `all` global views (including its own) or `cross` (the others).
    pub targets: Targets,
    /// BatchNorm in the projectors and predictors: `joint` statistics over every view's rows at
    /// once, or `per_view`, each view's rows (its samples and groups) on their own, as code that
    /// runs the heads once per view does.
    #[serde(default)]
    pub head_bn: HeadNorm,
    /// The level whose grid the visible cells are drawn on; `null` (the default) draws them on
    /// the coarsest masked level. A masked level coarser than this grid weighs each of its cells
    /// by the visible share of the grid cells it covers.
    #[serde(default)]
    pub mask_grid: Option<Level>,
}

/// The optimiser.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    /// `lars`, `sgd` or `adamw`.
    pub optimizer: OptimizerKind,
    /// Learning rate per 256 samples (scaled by batch_size / 256).
    pub lr: f64,
    pub weight_decay: f64,
    /// Momentum of LARS and SGD.
    pub momentum: f64,
    /// LARS trust coefficient.
    pub trust: f64,
}

/// The run's length and the learning-rate and EMA schedules over it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleConfig {
    pub epochs: u64,
    /// Stop after this many steps (0: run all epochs).
    pub max_steps: u64,
    /// Linear warmup length in epochs (may be fractional).
    pub warmup_epochs: f64,
    /// Learning rate at the end of the cosine, as a fraction of `lr` (0: decay to zero, 1: constant).
    /// Short runs learn more when it stays up.
    #[serde(default)]
    pub lr_final: f64,
    /// Starting EMA momentum of the target; rises to `ema_final` on a cosine.
    pub ema_base: f64,
    /// EMA momentum at the end of the run (1: BYOL's schedule; `ema_base`: constant). Below 1 the
    /// target keeps following the online network to the last step, which short runs need.
    #[serde(default = "one")]
    pub ema_final: f64,
}

/// The views and the input pipeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataConfig {
    /// Side of the global views in pixels.
    pub image_size: u32,
    /// Number of global views (targets come from these).
    pub global_views: usize,
    /// Largest random rotation of every view, in degrees (0: none, as in BYOL). For data without
    /// an upright, whose orientation both views of an image would otherwise share.
    #[serde(default)]
    pub rotation: f64,
    /// Number of local (multi-crop) views, online branch only.
    pub local_views: usize,
    /// Side of the local views.
    pub local_size: u32,
    /// The global batch: samples per optimiser step, over every rank and micro-batch (each of
    /// `world` ranks runs `accumulate` micro-batches of `batch_size / (world * accumulate)`).
    /// The learning rate scales with it.
    pub batch_size: usize,
    /// Input-pipeline worker threads of each rank (0: this machine's cores shared by its ranks).
    pub threads: usize,
    /// Batches the input pipeline may prepare ahead.
    pub prefetch: usize,
}

/// How a step is split: over data-parallel ranks (`trainer pretrain --ranks/--gpus`, torchrun,
/// srun) and over micro-batches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParallelConfig {
    /// Micro-batches per optimiser step (gradient accumulation): their gradients are averaged,
    /// so a step equals one on the whole batch, except that BatchNorm sees each micro-batch on
    /// its own. Lets the paper's global batch fit on fewer GPUs.
    #[serde(default = "one_usize")]
    pub accumulate: usize,
    /// With several ranks: BatchNorm normalises with the statistics of the batch of every rank
    /// together (SyncBN), as with one device; off, each rank with its own part's.
    #[serde(default = "yes")]
    pub sync_bn: bool,
}

/// Seeding, checkpoints and monitoring.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub seed: u64,
    /// Checkpoint every this many steps (0: only at epoch ends and at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept (oldest removed first).
    pub keep_checkpoints: usize,
    /// Run a kNN evaluation every this many epochs when `trainer pretrain --val` is given (0: only
    /// at the end).
    pub knn_every: u64,
    /// The kNN evaluations during training use at most this many images per class of the kNN
    /// memory and of the val set (a fixed random choice from `seed`), so that their cost does not
    /// grow with the dataset; the evaluation at the end uses every image (0: every image always).
    #[serde(default = "knn_per_class_default")]
    pub knn_per_class: usize,
    /// Read the loss from the device and log it (metrics line, progress) every this many steps,
    /// and at every checkpoint, kNN evaluation and the last step; in between nothing waits for
    /// the device, so a GPU's queue stays full. Views/s are averaged since the last logged step;
    /// a non-finite loss is caught at the next read (before any checkpoint) and reported there.
    #[serde(default = "one_u64")]
    pub log_every: u64,
}

/// A named starting point (see [`PRESETS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Preset {
    #[serde(rename = "maskdeep-r50-imagenet")]
    MaskDeepR50ImageNet,
    #[serde(rename = "maskdeep-r18-imagenet")]
    MaskDeepR18ImageNet,
    #[serde(rename = "maskdeep-r18-small")]
    MaskDeepR18Small,
    #[serde(rename = "maskdeep-r18-small-paper")]
    MaskDeepR18SmallPaper,
    #[serde(rename = "byol-r50-imagenet")]
    ByolR50ImageNet,
    #[serde(rename = "byol-r18-imagenet")]
    ByolR18ImageNet,
    #[serde(rename = "byol-r18-small")]
    ByolR18Small,
}

impl Preset {
    /// Every preset, in [`PRESETS`] order.
    pub const ALL: [Preset; 7] = [
        Preset::MaskDeepR50ImageNet,
        Preset::MaskDeepR18ImageNet,
        Preset::MaskDeepR18Small,
        Preset::MaskDeepR18SmallPaper,
        Preset::ByolR50ImageNet,
        Preset::ByolR18ImageNet,
        Preset::ByolR18Small,
    ];

    /// The preset's name, as `--preset` takes it.
    pub fn name(self) -> &'static str {
        PRESETS[Self::ALL.iter().position(|&p| p == self).expect("listed")]
    }

    /// The preset called `name`.
    pub fn parse(name: &str) -> Result<Self> {
        match PRESETS.iter().position(|&p| p == name) {
            Some(i) => Ok(Self::ALL[i]),
            None => Err(Error::config(
                "preset",
                format!("unknown preset `{name}`; known: {}", PRESETS.join(", ")),
            )),
        }
    }

    fn byol(self) -> bool {
        self.name().starts_with("byol")
    }

    fn imagenet(self) -> bool {
        self.name().ends_with("imagenet")
    }

    /// The method as the paper reads it, where a preset's own default departs from it.
    fn paper(self) -> bool {
        self.name().ends_with("-paper")
    }

    fn depth(self) -> Depth {
        if self.name().contains("-r50-") {
            Depth::R50
        } else {
            Depth::R18
        }
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A feature level of the backbone that MaskDeep masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    C3,
    C4,
    C5,
}

impl Level {
    /// The level's index into the backbone's (C3, C4, C5).
    pub fn index(self) -> usize {
        self as usize
    }

    /// `c3`, `c4` or `c5`.
    pub fn name(self) -> &'static str {
        ["c3", "c4", "c5"][self.index()]
    }
}

/// Which global views each online view is compared with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Targets {
    /// Every global view, its own included (MaskDeep).
    All,
    /// The other global views (BYOL).
    Cross,
}

/// How the heads' BatchNorm groups its rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadNorm {
    /// One set of statistics over every view's rows.
    #[default]
    Joint,
    /// Statistics over each view's rows alone.
    PerView,
}

/// The update rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Lars,
    Sgd,
    Adamw,
}

/// Names of the presets, for `--help`.
pub const PRESETS: &[&str] = &[
    "maskdeep-r50-imagenet",
    "maskdeep-r18-imagenet",
    "maskdeep-r18-small",
    "maskdeep-r18-small-paper",
    "byol-r50-imagenet",
    "byol-r18-imagenet",
    "byol-r18-small",
];

impl TrainConfig {
    /// A named preset (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self> {
        let preset = Preset::parse(name)?;
        let imagenet = preset.imagenet();
        let byol = preset.byol();
        Ok(TrainConfig {
            preset,
            model: ModelConfig {
                arch: preset.depth(),
                small_stem: !imagenet,
                width: 1.0,
                proj_hidden: 4096,
                proj_dim: 256,
                pred_hidden: 4096,
                bf16: false,
            },
            method: if byol {
                MethodConfig {
                    groups: 1,
                    visible_ratio: 1.0,
                    levels: vec![Level::C5],
                    level_weights: vec![1.0],
                    targets: Targets::Cross,
                    head_bn: HeadNorm::Joint,
                    mask_grid: None,
                }
            } else {
                MethodConfig {
                    groups: 4,
                    visible_ratio: 0.25,
                    levels: vec![Level::C4, Level::C5],
                    level_weights: vec![1.0, 1.0],
                    // The paper's reading (each view also predicts its own unmasked target) on
                    // ImageNet and in `maskdeep-r18-small-paper`; cross-view targets on small
                    // images, where the own target is a shortcut (issue 22: MNIST, Tux Paint and
                    // the shapes, BENCHMARKS.md).
                    targets: if imagenet || preset.paper() {
                        Targets::All
                    } else {
                        Targets::Cross
                    },
                    head_bn: HeadNorm::Joint,
                    mask_grid: None,
                }
            },
            optim: OptimConfig {
                optimizer: OptimizerKind::Lars,
                lr: if imagenet { 0.2 } else { 1.0 },
                weight_decay: if imagenet { 1.5e-6 } else { 1e-5 },
                momentum: 0.9,
                trust: 0.001,
            },
            schedule: ScheduleConfig {
                epochs: if imagenet { 200 } else { 100 },
                max_steps: 0,
                warmup_epochs: 10.0,
                lr_final: 0.0,
                ema_base: if imagenet { 0.996 } else { 0.99 },
                ema_final: 1.0,
            },
            data: DataConfig {
                image_size: if imagenet { 224 } else { 64 },
                global_views: 2,
                rotation: 0.0,
                local_views: 0,
                local_size: if imagenet { 96 } else { 32 },
                batch_size: 256,
                threads: 0,
                prefetch: 4,
            },
            parallel: ParallelConfig {
                accumulate: 1,
                sync_bn: true,
            },
            run: RunConfig {
                seed: 0,
                checkpoint_every: 1000,
                keep_checkpoints: 3,
                knn_every: 1,
                knn_per_class: knn_per_class_default(),
                // A step on a GPU is short beside its synchronisation; on small data every step.
                log_every: if imagenet { 20 } else { 1 },
            },
        })
    }

    /// The names of every key of the flat form (`config.json`, `--set`).
    pub fn keys(&self) -> Vec<String> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Parses the flat JSON form, refusing keys that no section has.
    pub fn from_json(value: serde_json::Value) -> Result<Self> {
        if let serde_json::Value::Object(map) = &value {
            let known = TrainConfig::preset(PRESETS[0])?.keys();
            if let Some(unknown) = map.keys().find(|k| !known.contains(k)) {
                return Err(Error::config(
                    unknown.as_str(),
                    format!("unknown config key `{unknown}`; known keys: {known:?}"),
                ));
            }
        }
        Ok(serde_json::from_value(value)?)
    }

    /// Reads a JSON config file (as written to a run's `config.json`: every key required except
    /// `lr_final`, `ema_final`, `rotation`, `knn_per_class`, `log_every`, `accumulate`, `sync_bn`,
    /// `head_bn` and `mask_grid`, which configs written before they existed lack).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).io("read config", path)?;
        let c = serde_json::from_str(&text)
            .map_err(Error::from)
            .and_then(TrainConfig::from_json)
            .map_err(|e| Error::BadFile {
                path: path.to_path_buf(),
                message: format!("not a valid training config: {e}"),
            })?;
        c.validate()?;
        Ok(c)
    }

    /// Applies one `key=value` override; the value is JSON (`0.5`, `true`, `["c5"]`) or a bare string.
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let Some((key, value)) = assignment.split_once('=') else {
            return Err(Error::config(
                assignment,
                format!("--set expects key=value, got `{assignment}`"),
            ));
        };
        let mut json = serde_json::to_value(&*self)?;
        let obj = json
            .as_object_mut()
            .expect("config serialises to an object");
        if !obj.contains_key(key) {
            let keys: Vec<&String> = obj.keys().collect();
            return Err(Error::config(
                key,
                format!("unknown config key `{key}`; known keys: {keys:?}"),
            ));
        }
        let parsed = serde_json::from_str(value)
            .unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
        obj.insert(key.to_string(), parsed);
        *self = TrainConfig::from_json(json).map_err(|e| {
            Error::config(
                key,
                format!("--set {assignment}: wrong type of value for `{key}` ({e})"),
            )
        })?;
        Ok(())
    }

    /// Checks that the values make sense together.
    pub fn validate(&self) -> Result<()> {
        // Each failure names the key, its value and what is allowed.
        fn check(ok: bool, key: &str, value: impl std::fmt::Display, allowed: &str) -> Result<()> {
            if ok {
                Ok(())
            } else {
                Err(Error::config(
                    key,
                    format!("{key} = {value}: must be {allowed}"),
                ))
            }
        }
        let (m, me, o, sc, d, r) = (
            &self.model,
            &self.method,
            &self.optim,
            &self.schedule,
            &self.data,
            &self.run,
        );
        check(
            m.width.is_finite() && m.width > 0.0 && m.width <= 16.0,
            "width",
            m.width,
            "in (0, 16]",
        )?;
        check(m.proj_hidden > 0, "proj_hidden", m.proj_hidden, "> 0")?;
        check(m.proj_dim > 0, "proj_dim", m.proj_dim, "> 0")?;
        check(m.pred_hidden > 0, "pred_hidden", m.pred_hidden, "> 0")?;
        check(
            (16..=1024).contains(&d.image_size),
            "image_size",
            d.image_size,
            "in [16, 1024] px",
        )?;
        check(
            (16..=1024).contains(&d.local_size),
            "local_size",
            d.local_size,
            "in [16, 1024] px",
        )?;
        check(d.global_views >= 1, "global_views", d.global_views, ">= 1")?;
        check(
            (0.0..=180.0).contains(&d.rotation),
            "rotation",
            d.rotation,
            "in [0, 180] degrees",
        )?;
        check(
            d.batch_size >= 2,
            "batch_size",
            d.batch_size,
            ">= 2 (BatchNorm)",
        )?;
        check(d.prefetch >= 1, "prefetch", d.prefetch, ">= 1")?;
        check(
            self.parallel.accumulate >= 1 && d.batch_size.is_multiple_of(self.parallel.accumulate),
            "accumulate",
            self.parallel.accumulate,
            "a divisor of batch_size, >= 1",
        )?;
        check(me.groups >= 1, "groups", me.groups, ">= 1")?;
        check(
            me.visible_ratio > 0.0 && me.visible_ratio <= 1.0,
            "visible_ratio",
            me.visible_ratio,
            "in (0, 1]",
        )?;
        check(
            !me.levels.is_empty(),
            "levels",
            "[]",
            "at least one of c3, c4, c5",
        )?;
        check(
            me.level_weights.len() == me.levels.len(),
            "level_weights",
            format!("{:?}", me.level_weights),
            "one weight per entry of levels",
        )?;
        check(
            me.level_weights.iter().all(|w| w.is_finite() && *w >= 0.0)
                && me.level_weights.iter().any(|w| *w > 0.0),
            "level_weights",
            format!("{:?}", me.level_weights),
            "finite, >= 0, and not all 0",
        )?;
        check(
            me.targets == Targets::All || d.global_views >= 2,
            "targets",
            "cross",
            "`all` with a single global view (cross needs global_views >= 2)",
        )?;
        self.check_masked_grid()?;
        check(o.lr.is_finite() && o.lr > 0.0, "lr", o.lr, "finite and > 0")?;
        check(
            o.weight_decay.is_finite() && o.weight_decay >= 0.0,
            "weight_decay",
            o.weight_decay,
            "finite and >= 0",
        )?;
        check(
            (0.0..1.0).contains(&o.momentum),
            "momentum",
            o.momentum,
            "in [0, 1)",
        )?;
        check(
            o.trust.is_finite() && o.trust > 0.0,
            "trust",
            o.trust,
            "finite and > 0 (0 would freeze every weight under LARS)",
        )?;
        check(
            (0.0..=1.0).contains(&sc.lr_final),
            "lr_final",
            sc.lr_final,
            "in [0, 1] (a fraction of lr)",
        )?;
        check(
            sc.warmup_epochs.is_finite() && sc.warmup_epochs >= 0.0,
            "warmup_epochs",
            sc.warmup_epochs,
            "finite and >= 0",
        )?;
        check(
            (0.0..=1.0).contains(&sc.ema_base),
            "ema_base",
            sc.ema_base,
            "in [0, 1]",
        )?;
        check(
            sc.ema_base <= sc.ema_final && sc.ema_final <= 1.0,
            "ema_final",
            sc.ema_final,
            "in [ema_base, 1]",
        )?;
        check(
            sc.epochs > 0 || sc.max_steps > 0,
            "epochs",
            sc.epochs,
            "above 0 unless max_steps is",
        )?;
        check(
            r.keep_checkpoints >= 1,
            "keep_checkpoints",
            r.keep_checkpoints,
            ">= 1",
        )?;
        check(r.log_every >= 1, "log_every", r.log_every, ">= 1")
    }

    /// Refuses masking that cannot mask: when the mask grid at `image_size` is so small that
    /// `visible_ratio` keeps every cell (the ImageNet stem's C5 at 32 px is 1x1).
    fn check_masked_grid(&self) -> Result<()> {
        let ratio = self.method.visible_ratio;
        let Some(grid) = self.mask_grid() else {
            return Ok(());
        };
        if ratio >= 1.0 {
            return Ok(());
        }
        let stride = self.resnet().strides()[grid.index()] as u32;
        let side = self.data.image_size.div_ceil(stride) as usize;
        let cells = side * side;
        let visible = crate::method::masking::visible_count(ratio, cells);
        if visible >= cells {
            return Err(Error::config(
                "visible_ratio",
                format!(
                    "visible_ratio = {ratio}: at image_size {} the {} grid is {side}x{side}, so it \
                     keeps all {cells} cells visible and nothing is masked; use larger images, the \
                     small stem (small_stem=true), a finer level or mask_grid, or visible_ratio = 1 \
                     (BYOL)",
                    self.data.image_size,
                    grid.name()
                ),
            ));
        }
        Ok(())
    }

    /// The level whose grid the visible cells are drawn on: `mask_grid`, else the coarsest masked
    /// level (`None` only for a config without levels, which validation refuses).
    pub fn mask_grid(&self) -> Option<Level> {
        self.method
            .mask_grid
            .or_else(|| self.method.levels.iter().copied().max_by_key(|l| l.index()))
    }

    /// The masked levels as indices into (C3, C4, C5), in config order.
    pub fn level_indices(&self) -> Vec<usize> {
        self.method.levels.iter().map(|l| l.index()).collect()
    }

    /// The backbone's shape.
    pub fn resnet(&self) -> ResNetConfig {
        ResNetConfig {
            depth: self.model.arch,
            small_stem: self.model.small_stem,
            width: self.model.width,
        }
    }

    /// The augmentation of every view: global views alternate BYOL's asymmetric pair (blur p
    /// 1.0 / 0.1, solarize p 0.0 / 0.2; no blur below 96 px), then the local views; each turned
    /// by up to `rotation` degrees.
    pub fn view_specs(&self) -> Vec<ViewSpec> {
        let blur = self.data.image_size > 96;
        let mut views: Vec<ViewSpec> = (0..self.data.global_views)
            .map(|i| match (i % 2, blur) {
                (0, true) => ViewSpec::byol(self.data.image_size, 1.0, 0.0),
                (0, false) => ViewSpec::byol(self.data.image_size, 0.0, 0.0),
                (_, true) => ViewSpec::byol(self.data.image_size, 0.1, 0.2),
                (_, false) => ViewSpec::byol(self.data.image_size, 0.0, 0.2),
            })
            .collect();
        let local = ViewSpec {
            scale: (0.05, 0.14),
            ..ViewSpec::byol(
                self.data.local_size,
                if self.data.local_size > 96 { 0.5 } else { 0.0 },
                0.0,
            )
        };
        views.extend(std::iter::repeat_n(local, self.data.local_views));
        for v in &mut views {
            v.rotation = self.data.rotation as f32;
        }
        views
    }

    /// Samples of one micro-batch on each of `world` ranks, or why `batch_size` cannot be split so.
    pub fn micro_batch(&self, world: usize) -> Result<usize> {
        let parts = world * self.parallel.accumulate;
        let micro = self.data.batch_size / parts;
        if !self.data.batch_size.is_multiple_of(parts) || micro == 0 {
            return Err(Error::config(
                "batch_size",
                format!(
                    "batch_size = {} cannot be split into {world} ranks x {} micro-batches                      (accumulate): make it a multiple of {parts}",
                    self.data.batch_size, self.parallel.accumulate
                ),
            ));
        }
        if micro < 2 && !(world > 1 && self.parallel.sync_bn) {
            return Err(Error::config(
                "batch_size",
                format!(
                    "batch_size = {} over {world} ranks x {} micro-batches leaves {micro} sample                      per BatchNorm batch: raise batch_size or lower accumulate",
                    self.data.batch_size, self.parallel.accumulate
                ),
            ));
        }
        Ok(micro)
    }

    /// Learning rate after scaling by the (global) batch size.
    pub fn scaled_lr(&self) -> f64 {
        self.optim.lr * self.data.batch_size as f64 / 256.0
    }
}

/// Serde default of `ema_final` for configs written before it existed.
fn one() -> f64 {
    1.0
}

/// Serde default of `log_every` for configs written before it existed.
fn one_u64() -> u64 {
    1
}

/// Serde default of `accumulate` for configs written before it existed.
fn one_usize() -> usize {
    1
}

/// Serde default of `sync_bn` for configs written before it existed.
fn yes() -> bool {
    true
}

/// Serde default of `knn_per_class` for configs written before it existed.
fn knn_per_class_default() -> usize {
    100
}
