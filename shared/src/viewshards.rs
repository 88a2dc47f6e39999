//! View shards: augmented multi-view batches materialised once (`loader views`), so that a
//! CPU-poor trainer, or an experiment that must see identical inputs, reads them at memory speed.
//!
//! The files are ordinary shards (see `docs/FORMAT.md`) whose records have the `views` encoding:
//! record `k` is sample `k % batch_size` of global step `k / batch_size`, its payload the u8 CHW
//! planes of each view in turn. `views.json` lists the view specs and the shards.

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::fsutil::{read_json, write_json_atomic};
use crate::pipeline::{Batch, Output, Pipeline, PipelineConfig, ViewData};
use crate::sampler::Sampler;
use crate::shard::{Encoding, Record, ShardRoller, ShardSet, ShardSummary};
use crate::views::ViewSpec;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The view manifest's file name.
pub const VIEWS_MANIFEST: &str = "views.json";
/// Value of its `format` field.
pub const VIEWS_FORMAT: &str = "maskdeep-views";

/// What a view-shard folder holds.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ViewsManifest {
    /// Always [`VIEWS_FORMAT`].
    pub format: String,
    /// Shard format version.
    pub format_version: u32,
    /// The program that wrote it.
    pub created_by: String,
    /// The packed dataset the views were made from.
    pub source: String,
    /// The view specs, in payload order.
    pub views: Vec<ViewSpec>,
    /// Seed of the epoch orders and augmentations.
    pub seed: u64,
    /// Epochs materialised.
    pub epochs: u64,
    /// Samples per step.
    pub batch_size: usize,
    /// Steps per epoch.
    pub steps_per_epoch: usize,
    /// Class names of the source dataset.
    pub classes: Vec<String>,
    /// Total records (`epochs * steps_per_epoch * batch_size`).
    pub records: u64,
    /// Shards in record order.
    pub shards: Vec<ShardSummary>,
    /// Source records that could not be read and were replaced, with the reason.
    pub skipped: Vec<(u32, String)>,
}

/// What `loader views` materialises.
pub struct ViewsJob {
    /// The packed source dataset folder.
    pub source: PathBuf,
    /// The views of every sample.
    pub views: Vec<ViewSpec>,
    pub seed: u64,
    pub epochs: u64,
    pub batch_size: usize,
    pub threads: usize,
    /// Target shard size in bytes.
    pub shard_size: u64,
    /// Output folder.
    pub out: PathBuf,
}

/// The progress file of an unfinished `loader views` job, rewritten after each finished shard.
pub const VIEWS_PROGRESS: &str = "views.progress.json";

/// What makes two `loader views` jobs the same: a killed job resumes only into the same one.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct JobKey {
    /// CRC-32 of the source manifest (it lists every source shard's checksum).
    source_manifest_crc: u32,
    views: Vec<ViewSpec>,
    seed: u64,
    epochs: u64,
    batch_size: usize,
    shard_size: u64,
}

/// How far an interrupted job got: the shards finished and the records they hold.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ViewsProgress {
    job: JobKey,
    shards: Vec<ShardSummary>,
    /// Replaced source records of the steps before the one the next record belongs to.
    skipped: Vec<(u32, String)>,
}

impl ViewsProgress {
    fn records(&self) -> u64 {
        self.shards.iter().map(|s| s.records).sum()
    }
}

/// Streams `job.epochs` epochs of batches through the pipeline into view shards; `progress` gets
/// (steps done, total steps), first with the steps an interrupted run had finished. A job killed midway and run again with the same arguments resumes
/// after its last finished shard and writes the same bytes as an uninterrupted one.
pub fn write_views(job: &ViewsJob, progress: &mut dyn FnMut(u64, u64)) -> Result<ViewsManifest> {
    let dataset = Arc::new(Dataset::open(&job.source)?);
    let classes = dataset.manifest().classes.clone();
    let sampler = Sampler::new(dataset.len(), job.seed, 0, 1, job.batch_size)?;
    let steps = sampler.steps_per_epoch() as u64 * job.epochs;
    std::fs::create_dir_all(&job.out).map_err(|e| Error::io(&job.out, e))?;
    let key = JobKey {
        source_manifest_crc: crc32fast::hash(
            &serde_json::to_vec(dataset.manifest()).expect("serialising plain data cannot fail"),
        ),
        views: job.views.clone(),
        seed: job.seed,
        epochs: job.epochs,
        batch_size: job.batch_size,
        shard_size: job.shard_size,
    };
    let progress_file = job.out.join(VIEWS_PROGRESS);
    let state = resume_state(&job.out, &key)?;
    let mut skipped = state.as_ref().map_or_else(Vec::new, |s| s.skipped.clone());
    let shards_done = state.as_ref().map_or_else(Vec::new, |s| s.shards.clone());
    let records_done = state.as_ref().map_or(0, |s| s.records());
    crate::shard::remove_unfinished(&job.out, shards_done.len(), view_shard_name)?;
    let b = job.batch_size as u64;
    // The first report is where this run starts: 0, or the steps an interrupted run finished.
    progress(records_done / b, steps);
    let config = PipelineConfig {
        views: job.views.clone(),
        batch_size: job.batch_size,
        seed: job.seed,
        threads: job.threads,
        prefetch: 2,
        rank: 0,
        world_size: 1,
        start_step: (records_done / b) as usize,
        end_step: steps as usize,
        output: Output::U8,
    };
    let mut roller = ShardRoller::new(&job.out, view_shard_name, job.shard_size, shards_done);
    let mut payload = Vec::new();
    // Samples of the first step that the finished shards already hold.
    let mut already = (records_done % b) as usize;
    let mut pipeline = Pipeline::start(dataset, config)?;
    while let Some(batch) = pipeline.next() {
        let batch = batch?;
        let skipped_before = skipped.len();
        skipped.extend(batch.skipped.iter().cloned());
        for j in std::mem::take(&mut already)..batch.sample_ids.len() {
            sample_payload(&batch, &job.views, j, &mut payload);
            let record = Record {
                height: job.views[0].size,
                width: job.views[0].size,
                label: batch.labels[j],
                encoding: Encoding::Views,
                source_id: batch.sample_ids[j] as u64,
                payload: std::mem::take(&mut payload),
            };
            if roller.push(&record)? {
                let state = ViewsProgress {
                    job: key.clone(),
                    shards: roller.finished().to_vec(),
                    skipped: skipped[..skipped_before].to_vec(),
                };
                write_json_atomic(&progress_file, &state)?;
            }
            payload = record.payload;
        }
        progress(batch.step as u64 + 1, steps);
        pipeline.recycle(batch.views);
    }
    let shards = roller.finish()?;
    let manifest = ViewsManifest {
        format: VIEWS_FORMAT.into(),
        format_version: crate::shard::FORMAT_VERSION,
        created_by: concat!("loader ", env!("CARGO_PKG_VERSION")).into(),
        source: job.source.display().to_string(),
        views: job.views.clone(),
        seed: job.seed,
        epochs: job.epochs,
        batch_size: job.batch_size,
        steps_per_epoch: sampler.steps_per_epoch(),
        classes,
        records: shards.iter().map(|s| s.records).sum(),
        shards,
        skipped,
    };
    write_json_atomic(&job.out.join(VIEWS_MANIFEST), &manifest)?;
    if progress_file.exists() {
        std::fs::remove_file(&progress_file).map_err(|e| Error::io(&progress_file, e))?;
    }
    Ok(manifest)
}

fn view_shard_name(n: usize) -> String {
    format!("views-{n:05}.mds")
}

/// The state of an interrupted run of the same job in `out`, if any; an interrupted run of another
/// job is an error (its shards would be mixed with this one's).
fn resume_state(out: &Path, key: &JobKey) -> Result<Option<ViewsProgress>> {
    let file = out.join(VIEWS_PROGRESS);
    if !file.exists() {
        return Ok(None);
    }
    let state: ViewsProgress = read_json(&file)?;
    if state.job != *key {
        return Err(Error::Invalid(format!(
            "{} belongs to an interrupted `loader views` with another source, preset, seed, \
             epochs, batch or shard size; rerun with the same ones, or use a new --out folder",
            file.display()
        )));
    }
    crate::shard::check_finished(out, &state.shards)?;
    Ok(Some(state))
}

/// Concatenates sample `j`'s views (u8 CHW each) from a batch into `out`.
fn sample_payload(batch: &Batch, views: &[ViewSpec], j: usize, out: &mut Vec<u8>) {
    out.clear();
    for (spec, data) in views.iter().zip(&batch.views) {
        let per = 3 * (spec.size * spec.size) as usize;
        match data {
            ViewData::U8(d) => out.extend_from_slice(&d[j * per..(j + 1) * per]),
            ViewData::F32(_) => unreachable!("view shards are written from u8 batches"),
        }
    }
}

/// A view-shard folder opened for reading.
pub struct ViewShards {
    manifest: ViewsManifest,
    shards: ShardSet,
}

/// One sample read from view shards.
pub struct ViewSample<'a> {
    /// Each view's u8 CHW pixels, in manifest order.
    pub views: Vec<&'a [u8]>,
    /// Class label.
    pub label: u32,
    /// Index of the sample in the source dataset.
    pub sample_id: u64,
}

impl ViewShards {
    /// Opens `dir`, checking the manifest, every shard header and index, and record sizes.
    pub fn open(dir: &Path) -> Result<Self> {
        let file = dir.join(VIEWS_MANIFEST);
        let manifest: ViewsManifest = read_json(&file)?;
        if manifest.format != VIEWS_FORMAT
            || manifest.format_version != crate::shard::FORMAT_VERSION
        {
            return Err(Error::corrupt(
                &file,
                "not a view-shard manifest of this version (make it with `loader views`)",
            ));
        }
        let len: u64 = manifest
            .views
            .iter()
            .map(|v| 3 * (v.size as u64).pow(2))
            .sum();
        let shards = ShardSet::open(dir, &manifest.shards)?;
        for shard in shards.shards() {
            if shard
                .metas()
                .iter()
                .any(|m| m.encoding != Encoding::Views || m.length != len)
            {
                return Err(Error::corrupt(
                    shard.path(),
                    "records do not match the view specs of views.json",
                ));
            }
        }
        Ok(ViewShards { manifest, shards })
    }

    /// The manifest.
    pub fn manifest(&self) -> &ViewsManifest {
        &self.manifest
    }

    /// Number of records (samples over all steps).
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether there is no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Record `k` (sample `k % batch_size` of step `k / batch_size`), after checking its checksum.
    pub fn sample(&self, k: usize) -> Result<ViewSample<'_>> {
        let (shard, r) = self.shards.locate(k)?;
        shard.verify_record(r)?;
        let meta = shard.meta(r);
        let mut rest = shard.payload(r);
        let mut views = Vec::with_capacity(self.manifest.views.len());
        for v in &self.manifest.views {
            let (head, tail) = rest.split_at(3 * (v.size * v.size) as usize);
            views.push(head);
            rest = tail;
        }
        Ok(ViewSample {
            views,
            label: meta.label,
            sample_id: meta.source_id,
        })
    }
}
