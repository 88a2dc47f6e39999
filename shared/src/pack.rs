//! The packer: decode every source image once, resize it, and write shards in a fixed order.
//!
//! Files are processed in chunks: a chunk is decoded in parallel, then written in source order, so
//! the output bytes do not depend on the thread count and memory stays bounded. After each shard is
//! renamed into place, a progress file records where the next shard starts; a killed pack that is
//! run again resumes there and ends with the same bytes as an uninterrupted one.

use crate::decode::{RgbDecoder, RgbImage};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{read_json, write_atomic, write_json_atomic};
use crate::manifest::{
    Failure, Manifest, PackOptions, Part, FORMAT_NAME, MANIFEST_FILE, SOURCES_FILE,
};
use crate::resize::{RgbResizer, SizePolicy};
use crate::shard::{Encoding, Record, Shard, ShardRoller, ShardSummary, NO_LABEL};
use crate::source::SourceList;
use rayon::prelude::*;
use std::fs;
use std::path::{Path, PathBuf};

/// What to pack, where and how.
pub struct PackJob<'a> {
    /// The listed input files.
    pub sources: &'a SourceList,
    /// The output folder.
    pub out: PathBuf,
    /// How images are resized and stored.
    pub options: PackOptions,
    /// `Some` to pack only one part of the files (multi-machine packing).
    pub part: Option<Part>,
    /// Worker threads for decoding.
    pub threads: usize,
}

/// Progress reported while packing.
#[derive(Clone, Copy, Debug)]
pub enum PackProgress {
    /// Packing starts: `total` files in this job, of which `done` were packed by an earlier run.
    Start { total: u64, done: u64 },
    /// `n` more files were processed.
    Advance(u64),
}

/// The result of a pack.
#[derive(Debug)]
pub struct PackReport {
    /// The manifest written (for a part: the part's manifest).
    pub manifest: Manifest,
    /// Files skipped because an earlier, interrupted run had packed them.
    pub resumed_files: u64,
    /// Whether the output was already complete and nothing was done.
    pub already_complete: bool,
}

/// State saved after each finished shard, so that a killed pack can resume.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Progress {
    options: PackOptions,
    part: Option<Part>,
    source_fingerprint: u32,
    shards: Vec<ShardSummary>,
    failures: Vec<Failure>,
    /// Source position where the next shard starts.
    next: usize,
}

/// File names of one job's outputs inside the output folder.
struct Names {
    prefix: String,
}

impl Names {
    fn shard(&self, n: usize) -> String {
        format!("{}shard-{n:05}.mds", self.prefix)
    }
    fn manifest(&self) -> String {
        format!("{}{MANIFEST_FILE}", self.prefix)
    }
    fn progress(&self) -> String {
        format!("{}progress.json", self.prefix)
    }
}

fn check_options(o: &PackOptions) -> Result<()> {
    if o.short_side == Some(0) || o.max_side == Some(0) {
        return Err(Error::Invalid(
            "--short-side and --max-side must be at least 1".into(),
        ));
    }
    if !(1..=100).contains(&o.quality) {
        return Err(Error::Invalid(format!(
            "--quality must be 1-100, got {}",
            o.quality
        )));
    }
    if o.shard_size < 1 << 16 {
        return Err(Error::Invalid(format!(
            "--shard-size must be at least 64 KiB, got {}",
            o.shard_size
        )));
    }
    Ok(())
}

/// Packs `job.sources` into shards under `job.out`, resuming an interrupted run of the same job.
pub fn pack(job: &PackJob, progress: &mut dyn FnMut(PackProgress)) -> Result<PackReport> {
    check_options(&job.options)?;
    if let Some(p) = job.part {
        if p.count == 0 || p.index >= p.count {
            return Err(Error::Invalid(format!(
                "--part {}/{}: need 0 <= I < N",
                p.index, p.count
            )));
        }
    }
    let out = &job.out;
    fs::create_dir_all(out).at(out)?;
    let names = Names {
        prefix: job.part.map(|p| p.prefix()).unwrap_or_default(),
    };
    let fingerprint = job.sources.fingerprint();
    let range = job.part.map_or(0..job.sources.files.len(), |p| {
        p.range(job.sources.files.len())
    });

    let views = out.join(crate::viewshards::VIEWS_MANIFEST);
    if views.exists() {
        return Err(Error::Invalid(format!(
            "{} holds view shards ({}), not a pack: use a new --out folder",
            out.display(),
            views.display()
        )));
    }
    let manifest_file = out.join(names.manifest());
    if manifest_file.exists() {
        let m = Manifest::load(&manifest_file)?;
        if let Some(difference) = difference(&m, job, fingerprint, out)? {
            return Err(Error::Invalid(format!(
                "{} holds a finished pack of another job: {difference}. Pack into a new --out \
                 folder (or delete this one to repack it)",
                out.display()
            )));
        }
        return Ok(PackReport {
            manifest: m,
            resumed_files: range.len() as u64,
            already_complete: true,
        });
    }

    let state = resume_state(out, &names, job, fingerprint)?;
    let shards = state.as_ref().map_or_else(Vec::new, |s| s.shards.clone());
    let failures = state.as_ref().map_or_else(Vec::new, |s| s.failures.clone());
    let start = state.as_ref().map_or(range.start, |s| s.next);
    crate::shard::remove_unfinished(out, shards.len(), |n| names.shard(n))?;
    write_sources(out, job.sources, &names)?;

    progress(PackProgress::Start {
        total: range.len() as u64,
        done: (start - range.start) as u64,
    });
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(job.threads.max(1))
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start {} threads: {e}", job.threads)))?;
    let chunk = job.threads.max(1) * 16;
    let mut sink = ShardSink {
        out,
        names: &names,
        job,
        fingerprint,
        shards: ShardRoller::new(
            out,
            {
                let prefix = names.prefix.clone();
                move |n| {
                    Names {
                        prefix: prefix.clone(),
                    }
                    .shard(n)
                }
            },
            job.options.shard_size,
            shards,
        ),
        failures,
    };
    // Decoding runs on the pool while a writer thread appends the previous chunk to the shards.
    let (shards, failures) = std::thread::scope(|scope| -> Result<_> {
        let (tx, rx) = crossbeam_channel::bounded::<Chunk>(2);
        let writer = scope.spawn(move || -> Result<_> {
            for (first, results) in rx {
                for (i, result) in (first..).zip(results) {
                    sink.add(i, result)?;
                }
            }
            sink.finish()
        });
        let mut pos = start;
        while pos < range.end {
            let end = (pos + chunk).min(range.end);
            let results = pool.install(|| {
                (pos..end)
                    .into_par_iter()
                    .map_init(Worker::default, |w, i| prepare(job, i, w))
                    .collect()
            });
            if tx.send((pos, results)).is_err() {
                break; // The writer stopped on an error, returned below.
            }
            progress(PackProgress::Advance((end - pos) as u64));
            pos = end;
        }
        drop(tx);
        writer.join().expect("the shard writer thread panicked")
    })?;

    let manifest = build_manifest(job, out, shards, failures)?;
    write_json_atomic(&manifest_file, &manifest)?;
    let progress_file = out.join(names.progress());
    if progress_file.exists() {
        fs::remove_file(&progress_file).at(&progress_file)?;
    }
    Ok(PackReport {
        manifest,
        resumed_files: (start - range.start) as u64,
        already_complete: false,
    })
}

/// A chunk of prepared records: the source position of the first, and each file's result.
type Chunk = (usize, Vec<Result<Record, String>>);

/// Appends prepared records to shards in source order, starting a new shard when the current
/// one would grow past the target size, and saving progress after each finished shard.
struct ShardSink<'a> {
    out: &'a Path,
    names: &'a Names,
    job: &'a PackJob<'a>,
    fingerprint: u32,
    shards: ShardRoller,
    failures: Vec<Failure>,
}

impl ShardSink<'_> {
    fn add(&mut self, i: usize, result: Result<Record, String>) -> Result<()> {
        let record = match result {
            Ok(record) => record,
            Err(reason) => {
                self.failures.push(Failure {
                    path: self.job.sources.files[i].rel.clone(),
                    reason,
                });
                return Ok(());
            }
        };
        if self.shards.push(&record)? {
            // Every file before this one is now in a finished shard (or failed).
            self.save_progress(i)?;
        }
        Ok(())
    }

    fn finish(self) -> Result<(Vec<ShardSummary>, Vec<Failure>)> {
        Ok((self.shards.finish()?, self.failures))
    }

    /// Records that every file before `next` is in a finished shard or failed.
    fn save_progress(&self, next: usize) -> Result<()> {
        let state = Progress {
            options: self.job.options.clone(),
            part: self.job.part,
            source_fingerprint: self.fingerprint,
            shards: self.shards.finished().to_vec(),
            failures: self.failures.clone(),
            next,
        };
        write_json_atomic(&self.out.join(self.names.progress()), &state)
    }
}

/// A decode thread's reusable buffers.
#[derive(Default)]
struct Worker {
    decoder: RgbDecoder,
    resizer: RgbResizer,
}

/// Reads, decodes, resizes and encodes source file `i`; the error is the reason to report.
fn prepare(job: &PackJob, i: usize, worker: &mut Worker) -> Result<Record, String> {
    let path = job.sources.path(i);
    let bytes = fs::read(&path).map_err(|e| format!("cannot read: {e}"))?;
    let img = worker
        .decoder
        .decode(&bytes, job.options.max_pixels)
        .map_err(|e| e.to_string())?;
    let o = &job.options;
    let policy = SizePolicy {
        short_side: o.short_side,
        max_side: o.max_side,
        upscale: o.upscale,
    };
    let (w, h) = policy.output_size(img.width, img.height);
    let img = worker
        .resizer
        .resize(img, w, h, o.filter)
        .map_err(|e| e.to_string())?;
    let payload = match o.encoding {
        Encoding::Raw => img.pixels,
        Encoding::Jpeg => encode_jpeg(&img, o.quality)?,
        Encoding::Views => return Err("packing stores images as raw or jpeg, not views".into()),
    };
    Ok(Record {
        height: h,
        width: w,
        label: job.sources.files[i].label.unwrap_or(NO_LABEL),
        encoding: o.encoding,
        source_id: i as u64,
        payload,
    })
}

/// What differs between the finished pack `m` in `out` and `job` (options, part, class list or
/// source listing), or `None` when `job` is the job that made it.
fn difference(m: &Manifest, job: &PackJob, fingerprint: u32, out: &Path) -> Result<Option<String>> {
    if m.options != job.options {
        return Ok(Some(format!(
            "it was made with other options ({:?}; now {:?})",
            m.options, job.options
        )));
    }
    if m.part != job.part {
        return Ok(Some(format!(
            "it is part {:?} (now {:?})",
            m.part, job.part
        )));
    }
    let classes = &job.sources.classes;
    if &m.classes != classes {
        let at = m.classes.iter().zip(classes).position(|(a, b)| a != b);
        return Ok(Some(match at {
            Some(i) => format!(
                "its class {i} is `{}` where the source's is `{}`",
                m.classes[i], classes[i]
            ),
            None => format!(
                "it has {} classes where the source has {}",
                m.classes.len(),
                classes.len()
            ),
        }));
    }
    if m.source_fingerprint == Some(fingerprint) {
        return Ok(None);
    }
    // Another listing, or a manifest from before fingerprints: compare the files themselves.
    let listed = fs::read_to_string(out.join(SOURCES_FILE)).at(out.join(SOURCES_FILE))?;
    let listed: Vec<&str> = listed.lines().collect();
    let files = &job.sources.files;
    if let Some(i) = listed.iter().zip(files).position(|(a, f)| *a != f.rel) {
        return Ok(Some(format!(
            "its file {i} is `{}` where the source's is `{}` (source {}, packed from {})",
            listed[i],
            files[i].rel,
            job.sources.root.display(),
            m.source
        )));
    }
    if listed.len() != files.len() {
        return Ok(Some(format!(
            "it was packed from {} files where the source lists {} (source {}, packed from {})",
            listed.len(),
            files.len(),
            job.sources.root.display(),
            m.source
        )));
    }
    // Same files: with a fingerprint that differs, their labels do (another --labels file).
    Ok(m.source_fingerprint
        .map(|_| "the same files carry other labels".to_string()))
}

/// Encodes RGB pixels as a baseline JPEG with 4:2:0 chroma at `quality`.
pub fn encode_jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>, String> {
    let (w, h) = (u16::try_from(img.width), u16::try_from(img.height));
    let (Ok(w), Ok(h)) = (w, h) else {
        return Err(format!(
            "{}x{} is too large for JPEG (65535 max)",
            img.width, img.height
        ));
    };
    let mut out = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut out, quality);
    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
    enc.encode(&img.pixels, w, h, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| format!("cannot encode JPEG: {e}"))?;
    Ok(out)
}

fn resume_state(
    out: &Path,
    names: &Names,
    job: &PackJob,
    fingerprint: u32,
) -> Result<Option<Progress>> {
    let file = out.join(names.progress());
    if !file.exists() {
        return Ok(None);
    }
    let state: Progress = read_json(&file)?;
    if state.options != job.options
        || state.part != job.part
        || state.source_fingerprint != fingerprint
    {
        return Err(Error::Invalid(format!(
            "{} belongs to an interrupted pack with other options or other input files; \
             rerun with the same ones, or use a new --out folder",
            file.display()
        )));
    }
    crate::shard::check_finished(out, &state.shards)?;
    Ok(Some(state))
}

fn write_sources(out: &Path, sources: &SourceList, names: &Names) -> Result<()> {
    let mut text = String::new();
    for f in &sources.files {
        text.push_str(&f.rel);
        text.push('\n');
    }
    // Parts of one dataset write the same list; each goes through its own temporary name.
    let tmp_name = format!("{}{SOURCES_FILE}", names.prefix);
    let tmp = out.join(&tmp_name);
    write_atomic(&tmp, text.as_bytes())?;
    if !names.prefix.is_empty() {
        let dst = out.join(SOURCES_FILE);
        fs::rename(&tmp, &dst).at(&dst)?;
    }
    Ok(())
}

fn build_manifest(
    job: &PackJob,
    out: &Path,
    shards: Vec<ShardSummary>,
    failures: Vec<Failure>,
) -> Result<Manifest> {
    let mut counts = vec![0u64; job.sources.classes.len()];
    let mut unlabelled = 0;
    for s in &shards {
        let shard = Shard::open(&out.join(&s.file))?;
        for m in shard.metas() {
            match counts.get_mut(m.label as usize) {
                Some(c) => *c += 1,
                None => unlabelled += 1,
            }
        }
    }
    Ok(Manifest {
        format: FORMAT_NAME.into(),
        format_version: crate::shard::FORMAT_VERSION,
        created_by: concat!("loader ", env!("CARGO_PKG_VERSION")).into(),
        source: job.sources.root.display().to_string(),
        options: job.options.clone(),
        part: job.part,
        classes: job.sources.classes.clone(),
        counts_per_class: counts,
        unlabelled,
        records: shards.iter().map(|s| s.records).sum(),
        sources: job.sources.files.len() as u64,
        source_fingerprint: Some(job.sources.fingerprint()),
        shards,
        failures,
    })
}

/// Combines the part manifests of a multi-machine pack in `dir` into one `manifest.json`.
///
/// Every part `0..N` must be present and finished, with the same options, classes and sources.
pub fn merge(dir: &Path) -> Result<Manifest> {
    let files = crate::manifest::part_manifests(dir)?;
    let parts: Vec<Manifest> = files
        .iter()
        .map(|f| Manifest::load(f))
        .collect::<Result<_>>()?;
    let first = parts.first().ok_or_else(|| {
        Error::Invalid(format!(
            "{}: no part manifests (part-*-manifest.json) to merge",
            dir.display()
        ))
    })?;
    let count = first.part.map_or(0, |p| p.count);
    if parts.len() != count as usize {
        return Err(Error::Invalid(format!(
            "{}: {} of {count} parts are finished; pack the missing ones first",
            dir.display(),
            parts.len()
        )));
    }
    for (i, (m, f)) in parts.iter().zip(&files).enumerate() {
        let same =
            m.options == first.options && m.classes == first.classes && m.sources == first.sources;
        if !same
            || m.part
                != Some(Part {
                    index: i as u32,
                    count,
                })
        {
            return Err(Error::Invalid(format!(
                "{}: not part {i} of {count} of the same pack (every part 0..{count} must be finished, \
                 with the same options and input)",
                f.display()
            )));
        }
    }
    let mut merged = first.clone();
    merged.part = None;
    merged.shards = parts.iter().flat_map(|m| m.shards.clone()).collect();
    merged.failures = parts.iter().flat_map(|m| m.failures.clone()).collect();
    merged.records = parts.iter().map(|m| m.records).sum();
    merged.unlabelled = parts.iter().map(|m| m.unlabelled).sum();
    merged.counts_per_class = (0..first.classes.len())
        .map(|c| parts.iter().map(|m| m.counts_per_class[c]).sum())
        .collect();
    write_json_atomic(&dir.join(MANIFEST_FILE), &merged)?;
    Ok(merged)
}
