//! Training configuration: named presets, JSON config files and `--set key=value` overrides, checked
//! before anything runs.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use shared::views::ViewSpec;

use crate::nn::resnet::{Depth, ResNetConfig};

/// Every knob of a pretraining run. Saved as `config.json` in the run folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The preset this configuration started from.
    pub preset: String,
    /// Backbone: `resnet18`, `resnet34` or `resnet50`.
    pub arch: Depth,
    /// 3x3 stride-1 stem without max-pool (32-96 px images).
    pub small_stem: bool,
    /// Width multiplier of the backbone.
    pub width: f64,
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
    /// Masking groups re-pooled from one encoder pass.
    pub groups: usize,
    /// Share of the coarsest masked grid that stays visible.
    pub visible_ratio: f64,
    /// Masked levels, among `c3`, `c4`, `c5`.
    pub levels: Vec<String>,
    /// Loss weight of each level, in the order of `levels`.
    pub level_weights: Vec<f64>,
    /// Targets of each online view: `all` global views (including its own) or `cross` (the others).
    pub targets: String,
    /// Projector hidden width and output width; predictor hidden width.
    pub proj_hidden: usize,
    pub proj_dim: usize,
    pub pred_hidden: usize,
    /// `lars`, `sgd` or `adamw`.
    pub optimizer: String,
    /// Learning rate per 256 samples (scaled by batch_size / 256).
    pub lr: f64,
    /// Learning rate at the end of the cosine, as a fraction of `lr` (0: decay to zero, 1: constant).
    /// Short runs learn more when it stays up.
    #[serde(default)]
    pub lr_final: f64,
    pub weight_decay: f64,
    /// Momentum of LARS and SGD.
    pub momentum: f64,
    /// LARS trust coefficient.
    pub trust: f64,
    /// Linear warmup length in epochs (may be fractional).
    pub warmup_epochs: f64,
    /// Starting EMA momentum of the target; rises to `ema_final` on a cosine.
    pub ema_base: f64,
    /// EMA momentum at the end of the run (1: BYOL's schedule; `ema_base`: constant). Below 1 the
    /// target keeps following the online network to the last step, which short runs need.
    #[serde(default = "one")]
    pub ema_final: f64,
    pub epochs: u64,
    /// Stop after this many steps (0: run all epochs).
    pub max_steps: u64,
    pub batch_size: usize,
    pub seed: u64,
    /// Input-pipeline worker threads (0: all cores).
    pub threads: usize,
    /// Batches the input pipeline may prepare ahead.
    pub prefetch: usize,
    /// Checkpoint every this many steps (0: only at epoch ends and at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept (oldest removed first).
    pub keep_checkpoints: usize,
    /// Mixed precision: bf16 encoder on CUDA.
    pub bf16: bool,
    /// Run a kNN evaluation every this many epochs when `trainer pretrain --val` is given (0: only
    /// at the end).
    pub knn_every: u64,
}

/// Names of the presets, for `--help`.
pub const PRESETS: &[&str] = &[
    "maskdeep-r50-imagenet",
    "maskdeep-r18-imagenet",
    "maskdeep-r18-small",
    "byol-r50-imagenet",
    "byol-r18-imagenet",
    "byol-r18-small",
];

impl TrainConfig {
    /// A named preset (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self> {
        let (method, arch, data) = match name.split('-').collect::<Vec<_>>()[..] {
            [m, a, d] => (m, a, d),
            _ => bail!("unknown preset `{name}`; known: {}", PRESETS.join(", ")),
        };
        if !PRESETS.contains(&name) {
            bail!("unknown preset `{name}`; known: {}", PRESETS.join(", "));
        }
        let imagenet = data == "imagenet";
        let mut c = TrainConfig {
            preset: name.to_string(),
            arch: Depth::parse(&arch[1..]).context("preset architecture")?,
            small_stem: !imagenet,
            width: 1.0,
            image_size: if imagenet { 224 } else { 64 },
            global_views: 2,
            rotation: 0.0,
            local_views: 0,
            local_size: if imagenet { 96 } else { 32 },
            groups: 4,
            visible_ratio: 0.25,
            levels: vec!["c4".into(), "c5".into()],
            level_weights: vec![1.0, 1.0],
            targets: "all".into(),
            proj_hidden: 4096,
            proj_dim: 256,
            pred_hidden: 4096,
            optimizer: "lars".into(),
            lr: if imagenet { 0.2 } else { 1.0 },
            lr_final: 0.0,
            weight_decay: if imagenet { 1.5e-6 } else { 1e-5 },
            momentum: 0.9,
            trust: 0.001,
            warmup_epochs: 10.0,
            ema_base: if imagenet { 0.996 } else { 0.99 },
            ema_final: 1.0,
            epochs: if imagenet { 200 } else { 100 },
            max_steps: 0,
            batch_size: 256,
            seed: 0,
            threads: 0,
            prefetch: 4,
            checkpoint_every: 1000,
            keep_checkpoints: 3,
            bf16: false,
            knn_every: 1,
        };
        if method == "byol" {
            c.groups = 1;
            c.visible_ratio = 1.0;
            c.levels = vec!["c5".into()];
            c.level_weights = vec![1.0];
            c.targets = "cross".into();
        }
        Ok(c)
    }

    /// Reads a JSON config file (as written to a run's `config.json`: every key required except
    /// `lr_final`, `ema_final` and `rotation`, which configs written before they existed lack).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let c: TrainConfig = serde_json::from_str(&text)
            .with_context(|| format!("config {} is not a valid training config", path.display()))?;
        c.validate()?;
        Ok(c)
    }

    /// Applies one `key=value` override; the value is JSON (`0.5`, `true`, `["c5"]`) or a bare string.
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let Some((key, value)) = assignment.split_once('=') else {
            bail!("--set expects key=value, got `{assignment}`");
        };
        let mut json = serde_json::to_value(&*self)?;
        let obj = json
            .as_object_mut()
            .expect("config serialises to an object");
        if !obj.contains_key(key) {
            let keys: Vec<&String> = obj.keys().collect();
            bail!("unknown config key `{key}`; known keys: {keys:?}");
        }
        let parsed = serde_json::from_str(value)
            .unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
        obj.insert(key.to_string(), parsed);
        *self = serde_json::from_value(json)
            .with_context(|| format!("--set {assignment}: wrong type of value for `{key}`"))?;
        Ok(())
    }

    /// Checks that the values make sense together.
    pub fn validate(&self) -> Result<()> {
        let check = |ok: bool, msg: &str| if ok { Ok(()) } else { bail!("{msg}") };
        check(self.width > 0.0, "width must be > 0")?;
        check(self.image_size >= 16, "image_size must be at least 16")?;
        check(self.global_views >= 1, "global_views must be at least 1")?;
        check(
            (0.0..=180.0).contains(&self.rotation),
            "rotation must be in [0, 180] degrees",
        )?;
        check(self.local_size >= 16, "local_size must be at least 16")?;
        check(self.groups >= 1, "groups must be at least 1")?;
        check(
            self.visible_ratio > 0.0 && self.visible_ratio <= 1.0,
            "visible_ratio must be in (0, 1]",
        )?;
        check(
            !self.levels.is_empty(),
            "levels must name at least one of c3, c4, c5",
        )?;
        self.level_indices()?;
        check(
            self.level_weights.len() == self.levels.len(),
            "level_weights needs one weight per entry of levels",
        )?;
        check(
            self.targets == "all" || self.targets == "cross",
            "targets must be `all` or `cross`",
        )?;
        check(
            self.targets == "all" || self.global_views >= 2,
            "targets = cross needs at least 2 global views",
        )?;
        check(
            ["lars", "sgd", "adamw"].contains(&self.optimizer.as_str()),
            "optimizer must be lars, sgd or adamw",
        )?;
        check(self.lr > 0.0 && self.lr.is_finite(), "lr must be > 0")?;
        check(
            (0.0..=1.0).contains(&self.lr_final),
            "lr_final must be in [0, 1] (a fraction of lr)",
        )?;
        check(self.weight_decay >= 0.0, "weight_decay must be >= 0")?;
        check(
            (0.0..1.0).contains(&self.momentum),
            "momentum must be in [0, 1)",
        )?;
        check(
            (0.0..=1.0).contains(&self.ema_base),
            "ema_base must be in [0, 1]",
        )?;
        check(
            self.ema_base <= self.ema_final && self.ema_final <= 1.0,
            "ema_final must be in [ema_base, 1]",
        )?;
        check(
            self.batch_size >= 2,
            "batch_size must be at least 2 (BatchNorm)",
        )?;
        check(
            self.epochs > 0 || self.max_steps > 0,
            "set epochs or max_steps above 0",
        )?;
        check(self.prefetch >= 1, "prefetch must be at least 1")?;
        check(
            self.keep_checkpoints >= 1,
            "keep_checkpoints must be at least 1",
        )?;
        check(
            self.proj_hidden > 0 && self.proj_dim > 0 && self.pred_hidden > 0,
            "head widths must be > 0",
        )
    }

    /// The masked levels as indices into (C3, C4, C5), in config order.
    pub fn level_indices(&self) -> Result<Vec<usize>> {
        self.levels
            .iter()
            .map(|l| match l.as_str() {
                "c3" => Ok(0),
                "c4" => Ok(1),
                "c5" => Ok(2),
                other => bail!("unknown level `{other}` (use c3, c4, c5)"),
            })
            .collect()
    }

    /// The backbone's shape.
    pub fn resnet(&self) -> ResNetConfig {
        ResNetConfig {
            depth: self.arch,
            small_stem: self.small_stem,
            width: self.width,
        }
    }

    /// The augmentation of every view: global views alternate BYOL's asymmetric pair (blur p
    /// 1.0 / 0.1, solarize p 0.0 / 0.2; no blur below 96 px), then the local views; each turned
    /// by up to `rotation` degrees.
    pub fn view_specs(&self) -> Vec<ViewSpec> {
        let blur = self.image_size > 96;
        let mut views: Vec<ViewSpec> = (0..self.global_views)
            .map(|i| match (i % 2, blur) {
                (0, true) => ViewSpec::byol(self.image_size, 1.0, 0.0),
                (0, false) => ViewSpec::byol(self.image_size, 0.0, 0.0),
                (_, true) => ViewSpec::byol(self.image_size, 0.1, 0.2),
                (_, false) => ViewSpec::byol(self.image_size, 0.0, 0.2),
            })
            .collect();
        let local = ViewSpec {
            scale: (0.05, 0.14),
            ..ViewSpec::byol(
                self.local_size,
                if self.local_size > 96 { 0.5 } else { 0.0 },
                0.0,
            )
        };
        views.extend(std::iter::repeat_n(local, self.local_views));
        for v in &mut views {
            v.rotation = self.rotation as f32;
        }
        views
    }

    /// Learning rate after scaling by the batch size.
    pub fn scaled_lr(&self) -> f64 {
        self.lr * self.batch_size as f64 / 256.0
    }
}

/// Serde default of `ema_final` for configs written before it existed.
fn one() -> f64 {
    1.0
}
