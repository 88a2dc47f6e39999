//! The standard linear-evaluation protocol of self-supervised ResNets (as in the BYOL, SimCLR and
//! MoCo papers and torchvision's ImageNet reference): a frozen backbone with BatchNorm in eval
//! mode; linear classifiers on its pooled features of training images augmented on the fly
//! (RandomResizedCrop + horizontal flip); SGD with Nesterov momentum 0.9, cosine schedule, no
//! weight decay, learning rates scaled by batch / 256; evaluation on the centre crop (resize 256,
//! crop 224 at ImageNet's size). One head per learning rate trains on the same batches, so a
//! sweep costs one pass over the images; the run checkpoints every epoch and resumes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use shared::dataset::Dataset;
use shared::pipeline::{Output, Pipeline, PipelineConfig, ViewData};
use shared::resize::Filter;
use shared::views::ViewSpec;

use super::features::{embed_centre_crops, labelled_classes, labels_of, same_classes, Origin};
use super::knn::Accuracy;
use super::linear::{Heads, Probe, Tally};
use crate::error::{Error, IoContext, Result};
use crate::nn::resnet::ResNet;
use crate::train::data::imagenet_normalised;
use crate::train::optim::Rule;

/// The protocol's settings. Learning rates are per 256 images: a head's peak rate is
/// `lr * batch / 256`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProtocolSpec {
    /// Passes over the training images (90-100 in the papers).
    pub epochs: usize,
    /// Images per step.
    pub batch: usize,
    /// Base learning rates, one head each.
    pub lrs: Vec<f64>,
    /// Seed of the heads' initialisation, the epoch orders and the augmentations.
    pub seed: u64,
    /// Side of the views and of the evaluation crop (the backbone's training size).
    pub image_size: u32,
}

/// Sizes from which the evaluation crop is ImageNet's 224 of 256; smaller data (32-96 px, where
/// the papers use the whole image) is evaluated on its whole centre square.
pub const CENTRE_CROP_FROM: u32 = 128;

impl ProtocolSpec {
    /// The training view: RandomResizedCrop to `image_size` (area 8-100%, aspect 3/4-4/3,
    /// bilinear) and a horizontal flip with probability 1/2; nothing else.
    pub fn train_view(&self) -> ViewSpec {
        let mut v = ViewSpec::byol(self.image_size, 0.0, 0.0);
        v.filter = Filter::Bilinear;
        v.jitter_p = 0.0;
        v.gray_p = 0.0;
        v
    }

    /// The share of the shorter side that the evaluation's centre crop keeps: 224/256 from
    /// [`CENTRE_CROP_FROM`] px, 1 below.
    pub fn eval_crop(&self) -> f32 {
        if self.image_size >= CENTRE_CROP_FROM {
            224.0 / 256.0
        } else {
            1.0
        }
    }

    /// The peak learning rate of each head.
    pub fn peak_rates(&self) -> Vec<f64> {
        self.lrs
            .iter()
            .map(|lr| lr * self.batch as f64 / 256.0)
            .collect()
    }
}

/// What a protocol run's checkpoint records besides the heads: where it stands and what it is a
/// run of (a resume must be the same run).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct ProbeState {
    /// Steps done.
    step: u64,
    /// Steps of the whole run.
    total: u64,
    spec: ProtocolSpec,
    origin: Origin,
    /// The training set's folder and image count.
    train: (PathBuf, usize),
    /// The tensors file (in the output folder) that holds the heads at `step`.
    heads_file: String,
    /// Its CRC-32.
    heads_crc: u32,
}

/// The name of a protocol run's state file in its output folder.
pub const STATE_FILE: &str = "probe-state.json";
/// The name of a finished protocol run's results in its output folder.
pub const RESULTS_FILE: &str = "results.json";

/// One protocol run.
pub struct ProtocolJob<'a> {
    /// The frozen backbone and what made it.
    pub backbone: &'a ResNet,
    pub origin: &'a Origin,
    pub spec: ProtocolSpec,
    /// Labelled training images (augmented), val images (each head is reported on them), and
    /// optionally test images (the head chosen on val is reported on them).
    pub train: Arc<Dataset>,
    pub val: &'a Dataset,
    pub test: Option<&'a Dataset>,
    /// Folder of the checkpoints and the results.
    pub out: &'a Path,
    /// Continue from the checkpoint in `out`.
    pub resume: bool,
    /// Threads decoding and augmenting.
    pub threads: usize,
    pub device: &'a Device,
}

/// A finished protocol run: each head on val, and the one chosen on val on test.
#[derive(Serialize)]
pub struct ProtocolReport {
    pub spec: ProtocolSpec,
    /// (base rate, peak rate, val accuracy) per head.
    pub val: Vec<(f64, f64, Accuracy)>,
    /// The base rate chosen on val.
    pub best_lr: f64,
    pub best_val: Accuracy,
    pub test: Option<Accuracy>,
}

/// Callbacks of a running protocol job.
pub struct Hooks<'a> {
    /// (steps done, steps) after each step.
    pub steps: &'a mut dyn FnMut(usize, usize),
    /// (set name, images done, images) while scoring.
    pub scoring: &'a mut dyn FnMut(&str, usize, usize),
    /// Asked after each step: stop now (with a checkpoint)?
    pub stop: &'a dyn Fn(u64) -> bool,
}

impl ProtocolJob<'_> {
    /// Trains the heads (from the checkpoint when resuming) and scores them. A stop asked by
    /// `hooks.stop` writes a checkpoint and returns [`Error::Interrupted`].
    pub fn run(&self, hooks: Hooks) -> Result<ProtocolReport> {
        let spec = &self.spec;
        if spec.epochs == 0 || spec.batch == 0 {
            return Err(Error::config(
                "epochs",
                "the linear protocol needs at least one epoch and one image per batch",
            ));
        }
        let classes = labelled_classes(&self.train)?;
        let train_name = self.train.dir().display().to_string();
        for set in std::iter::once(self.val).chain(self.test) {
            let here = labelled_classes(set)?;
            same_classes(
                &classes,
                &here,
                &train_name,
                &set.dir().display().to_string(),
            )?;
        }
        let dim = self.backbone.config().channels()[2];
        let steps_per_epoch = (self.train.len() / spec.batch) as u64;
        if steps_per_epoch == 0 {
            return Err(Error::Data(format!(
                "{} holds {} images, fewer than one batch of {}: lower --batch",
                self.train.dir().display(),
                self.train.len(),
                spec.batch
            )));
        }
        let total = steps_per_epoch * spec.epochs as u64;
        let mut heads = Heads::new(
            dim,
            classes.len(),
            &spec.peak_rates(),
            Rule::Nesterov,
            spec.seed,
            self.device,
        )?;
        let mut state = ProbeState {
            step: 0,
            total,
            spec: spec.clone(),
            origin: self.origin.clone(),
            train: (self.train.dir().to_path_buf(), self.train.len()),
            heads_file: String::new(),
            heads_crc: 0,
        };
        std::fs::create_dir_all(self.out).io("create", self.out)?;
        let state_path = self.out.join(STATE_FILE);
        if self.resume {
            state = self.restore(&state, &mut heads)?;
        } else if state_path.exists() {
            return Err(Error::Run(format!(
                "{} already holds a linear-probe run: add --resume to continue it, or give \
                 another --out",
                self.out.display()
            )));
        }
        self.train_heads(&mut heads, &mut state, hooks.steps, hooks.stop)?;
        let probes = heads.into_probes();
        let mut val = self.score(&probes, self.val, "val", hooks.scoring)?;
        let results: Vec<(Probe, Accuracy)> = probes.into_iter().zip(val.drain(..)).collect();
        let (chosen, best_val) = super::linear::best(&results).expect("at least one head");
        let test = match self.test {
            Some(set) => {
                Some(self.score(std::slice::from_ref(chosen), set, "test", hooks.scoring)?[0])
            }
            None => None,
        };
        let report = ProtocolReport {
            spec: spec.clone(),
            val: results
                .iter()
                .zip(&spec.lrs)
                .map(|((p, a), &base)| (base, p.lr, *a))
                .collect(),
            best_lr: spec.lrs[results
                .iter()
                .position(|(p, _)| std::ptr::eq(p, chosen))
                .expect("the chosen head is one of them")],
            best_val: *best_val,
            test,
        };
        shared::fsutil::write_json_atomic(&self.out.join(RESULTS_FILE), &report)?;
        Ok(report)
    }

    /// Reads the checkpoint of `out` into `heads` after checking that it belongs to the run
    /// described by `fresh`; returns its state.
    fn restore(&self, fresh: &ProbeState, heads: &mut Heads) -> Result<ProbeState> {
        let path = self.out.join(STATE_FILE);
        if !path.exists() {
            return Err(Error::Run(format!(
                "--resume: {} holds no linear-probe checkpoint ({STATE_FILE}); run without \
                 --resume to start",
                self.out.display()
            )));
        }
        let saved: ProbeState = shared::fsutil::read_json(&path)?;
        let differs = if saved.spec != fresh.spec {
            Some(format!(
                "settings {:?} against {:?}",
                saved.spec, fresh.spec
            ))
        } else if saved.origin != fresh.origin {
            Some(format!(
                "backbone {} against {}",
                saved.origin.backbone, fresh.origin.backbone
            ))
        } else if saved.train != fresh.train {
            Some(format!(
                "training set {} ({} images) against {} ({} images)",
                saved.train.0.display(),
                saved.train.1,
                fresh.train.0.display(),
                fresh.train.1
            ))
        } else {
            None
        };
        if let Some(what) = differs {
            return Err(Error::Run(format!(
                "--resume: the checkpoint in {} is of another linear-probe run ({what}); give \
                 another --out or the same options",
                self.out.display()
            )));
        }
        let file = self.out.join(&saved.heads_file);
        let bytes = std::fs::read(&file).io("read", &file)?;
        if crc32fast::hash(&bytes) != saved.heads_crc {
            return Err(Error::BadFile {
                path: file,
                message: "damaged (checksum differs from the state file's): rerun without \
                          --resume into an empty --out"
                    .into(),
            });
        }
        heads.load_state(&candle_core::safetensors::load_buffer(&bytes, self.device)?)?;
        Ok(saved)
    }

    /// Writes the heads at `state.step` and then the state naming them, and removes the heads
    /// file of the previous checkpoint: a crash at any point leaves one complete checkpoint.
    fn save(&self, heads: &Heads, state: &mut ProbeState) -> Result<()> {
        let previous = std::mem::take(&mut state.heads_file);
        state.heads_file = format!("probe-step-{:08}.safetensors", state.step);
        let bytes = safetensors::tensor::serialize(heads.state()?, None)
            .map_err(|e| Error::Data(format!("cannot serialise the probe's heads: {e}")))?;
        state.heads_crc = crc32fast::hash(&bytes);
        shared::fsutil::write_atomic(&self.out.join(&state.heads_file), &bytes)?;
        shared::fsutil::write_json_atomic(&self.out.join(STATE_FILE), &*state)?;
        if !previous.is_empty() && previous != state.heads_file {
            let old = self.out.join(previous);
            std::fs::remove_file(&old).io("remove", &old)?;
        }
        Ok(())
    }

    /// Trains every head from `state.step` to the end, checkpointing at each epoch's end and
    /// when `stop` asks.
    fn train_heads(
        &self,
        heads: &mut Heads,
        state: &mut ProbeState,
        progress: &mut dyn FnMut(usize, usize),
        stop: &dyn Fn(u64) -> bool,
    ) -> Result<()> {
        if state.step >= state.total {
            return Ok(());
        }
        let spec = &self.spec;
        let size = spec.image_size as usize;
        let steps_per_epoch = state.total / spec.epochs as u64;
        let pipeline = Pipeline::start(
            Arc::clone(&self.train),
            PipelineConfig {
                views: vec![spec.train_view()],
                batch_size: spec.batch,
                seed: spec.seed,
                threads: self.threads.max(1),
                prefetch: 2,
                rank: 0,
                world_size: 1,
                start_step: state.step as usize,
                end_step: state.total as usize,
                output: Output::U8,
            },
        )?;
        for batch in pipeline {
            let batch = batch?;
            let ViewData::U8(bytes) = &batch.views[0] else {
                return Err(Error::Data("the pipeline made f32 views".into()));
            };
            let n = batch.labels.len();
            let x = imagenet_normalised(bytes, n, size, self.device)?;
            let features = self
                .backbone
                .embed(&x, false)?
                .to_dtype(candle_core::DType::F32)?;
            let y = Tensor::new(batch.labels.as_slice(), self.device)?;
            heads.step(&features, &y, state.step, state.total)?;
            state.step += 1;
            progress(state.step as usize, state.total as usize);
            let stopping = stop(state.step) && state.step < state.total;
            if state.step.is_multiple_of(steps_per_epoch) || state.step == state.total || stopping {
                self.save(heads, state)?;
            }
            if stopping {
                return Err(Error::Interrupted {
                    step: state.step,
                    checkpoint: self.out.join(STATE_FILE),
                });
            }
        }
        Ok(())
    }

    /// Each probe's accuracy on the centre crops of `set`.
    fn score(
        &self,
        probes: &[Probe],
        set: &Dataset,
        name: &str,
        progress: &mut dyn FnMut(&str, usize, usize),
    ) -> Result<Vec<Accuracy>> {
        let indices: Vec<usize> = (0..set.len()).collect();
        let labels = labels_of(set, &indices)?;
        let mut tallies: Vec<Tally> = probes.iter().map(|_| Tally::default()).collect();
        embed_centre_crops(
            self.backbone,
            set,
            &indices,
            (self.spec.image_size, self.spec.eval_crop()),
            self.spec.batch,
            self.device,
            &mut |rows, f| {
                for (probe, tally) in probes.iter().zip(&mut tallies) {
                    tally.add(&probe.top5(&f)?, &labels[rows.clone()]);
                }
                Ok(())
            },
            &mut |done, all| progress(name, done, all),
        )?;
        Ok(tallies.iter().map(Tally::accuracy).collect())
    }
}
