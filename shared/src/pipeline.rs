//! Streaming multi-view batches from a packed dataset.
//!
//! A producer thread walks the steps in order; each batch's samples are decoded and augmented in
//! parallel on a thread pool, and finished batches wait in a bounded queue (the prefetch depth), so
//! a slow consumer holds the producer back. Each pool thread keeps its decoder and view buffers, and
//! consumed batches can be handed back ([`Pipeline::recycle`]) so that their view tensors are
//! refilled instead of allocated: streaming allocates nothing per image. Every random choice comes from a stream keyed by
//! (seed, epoch, sample, view): batches are byte-identical whatever the thread count or prefetch.

use crate::dataset::Dataset;
use crate::decode::{RgbDecoder, RgbRef, DEFAULT_MAX_PIXELS};
use crate::error::{Error, Result};
use crate::sampler::{view_rng, Sampler};
use crate::shard::Encoding;
use crate::views::{make_view, StageTimes, ViewOut, ViewSpec, ViewWorkspace};
use crossbeam_channel::{bounded, Receiver, Sender};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// ImageNet's channel means, for normalised output.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet's channel standard deviations, for normalised output.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The element type of the view tensors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Output {
    /// 8-bit CHW, 4x fewer bytes; normalise on the device.
    U8,
    /// f32 CHW normalised with these channel means and standard deviations.
    F32 { mean: [f32; 3], std: [f32; 3] },
}

/// What the pipeline streams.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// The views made of every sample, in order.
    pub views: Vec<ViewSpec>,
    /// Samples per batch (per rank).
    pub batch_size: usize,
    /// Seed of the epoch orders and the augmentations.
    pub seed: u64,
    /// Worker threads.
    pub threads: usize,
    /// Finished batches that may wait for the consumer.
    pub prefetch: usize,
    /// This process's rank and the number of ranks.
    pub rank: usize,
    pub world_size: usize,
    /// The first global step to produce (to resume a run).
    pub start_step: usize,
    /// The step to stop before.
    pub end_step: usize,
    /// Element type of the views.
    pub output: Output,
}

/// One view of every sample in a batch: `[batch, 3, size, size]`, row-major.
#[derive(Debug)]
pub enum ViewData {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

/// A batch of multi-view samples.
#[derive(Debug)]
pub struct Batch {
    /// Global step.
    pub step: usize,
    /// Epoch of the step.
    pub epoch: u64,
    /// One tensor per view spec, each `[batch, 3, size, size]`.
    pub views: Vec<ViewData>,
    /// View sizes, matching `views`.
    pub sizes: Vec<u32>,
    /// Class label of each sample (`u32::MAX` when unlabelled).
    pub labels: Vec<u32>,
    /// Dataset index of each sample.
    pub sample_ids: Vec<u32>,
    /// Records that could not be read, with the reason; each was replaced by the next good one.
    pub skipped: Vec<(u32, String)>,
    /// Time the workers spent per stage on this batch (summed over threads).
    pub times: StageTimes,
}

/// An iterator over batches, produced ahead on background threads.
pub struct Pipeline {
    rx: Receiver<Result<Batch>>,
    spare: Sender<Vec<ViewData>>,
    handle: Option<JoinHandle<()>>,
}

impl Pipeline {
    /// Starts streaming `config.start_step..config.end_step` from `dataset`.
    pub fn start(dataset: Arc<Dataset>, config: PipelineConfig) -> Result<Self> {
        for v in &config.views {
            v.validate()?;
        }
        if config.views.is_empty() {
            return Err(Error::Invalid("a pipeline needs at least one view".into()));
        }
        let sampler = Sampler::new(
            dataset.len(),
            config.seed,
            config.rank,
            config.world_size,
            config.batch_size,
        )?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads.max(1))
            .build()
            .map_err(|e| Error::Invalid(format!("cannot start {} threads: {e}", config.threads)))?;
        let (tx, rx) = bounded(config.prefetch.max(1));
        let (spare, spare_rx) = bounded::<Vec<ViewData>>(config.prefetch.max(1) + 1);
        let workers: Vec<Mutex<Worker>> = (0..pool.current_num_threads())
            .map(|_| Mutex::default())
            .collect();
        let handle = std::thread::Builder::new()
            .name("pipeline".into())
            .spawn(move || {
                let mut order = (u64::MAX, Vec::new());
                for step in config.start_step..config.end_step {
                    let epoch = sampler.epoch_of(step);
                    if order.0 != epoch {
                        order = (epoch, sampler.epoch_order(epoch));
                    }
                    let ids = sampler.batch(&order.1, step);
                    let buffers = view_buffers(&config, ids.len(), spare_rx.try_recv().ok());
                    let batch = pool.install(|| {
                        make_batch(&dataset, &config, &workers, step, epoch, &ids, buffers)
                    });
                    let failed = batch.is_err();
                    // A closed channel means the consumer is gone: stop quietly.
                    if tx.send(batch).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| Error::Invalid(format!("cannot start the pipeline thread: {e}")))?;
        Ok(Pipeline {
            rx,
            spare,
            handle: Some(handle),
        })
    }
}

impl Pipeline {
    /// Hands a consumed batch's view tensors back: a later batch refills them instead of
    /// allocating its own. Optional; tensors that are not handed back are simply freed.
    pub fn recycle(&self, views: Vec<ViewData>) {
        let _ = self.spare.try_send(views);
    }
}

impl Iterator for Pipeline {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // Dropping the receiver makes the producer's next send fail, so it stops.
        self.rx = crossbeam_channel::never();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A worker's decoder and view buffers.
#[derive(Default)]
struct Worker {
    decoder: RgbDecoder,
    views: ViewWorkspace,
}

/// Reads record `id` as pixels after checking its checksum: straight from the map for raw
/// records, decoded for JPEG.
pub fn read_record<'a>(
    ds: &'a Dataset,
    id: usize,
    decoder: &'a mut RgbDecoder,
    times: &mut StageTimes,
) -> Result<RgbRef<'a>> {
    let t = Instant::now();
    let meta = *ds.meta(id)?;
    let bytes = ds.payload(id)?;
    if crc32fast::hash(bytes) != meta.crc32 {
        return Err(Error::Decode(format!(
            "record {id}: payload checksum mismatch (run `loader verify`)"
        )));
    }
    let t2 = Instant::now();
    times.read += t2 - t;
    let img = match meta.encoding {
        Encoding::Raw => RgbRef {
            width: meta.width,
            height: meta.height,
            pixels: bytes,
        },
        Encoding::Jpeg => decoder.decode(bytes, DEFAULT_MAX_PIXELS)?,
        Encoding::Views => {
            return Err(Error::Invalid(format!(
                "record {id} holds augmented views; stream from the packed images instead"
            )))
        }
    };
    times.decode += t2.elapsed();
    Ok(img)
}

/// A finished sample: the record used, its label, the bad records it replaced, stage times.
type SampleDone = (u32, u32, Vec<(u32, String)>, StageTimes);

/// How many following records are tried in place of a bad one.
const MAX_REPLACEMENTS: usize = 64;

/// The view tensors of a batch of `n`: `spare` ones when they have the right shapes (every byte is
/// overwritten), new ones otherwise.
fn view_buffers(config: &PipelineConfig, n: usize, spare: Option<Vec<ViewData>>) -> Vec<ViewData> {
    let lens: Vec<usize> = config
        .views
        .iter()
        .map(|v| n * 3 * (v.size * v.size) as usize)
        .collect();
    let fits = |views: &Vec<ViewData>| {
        views.len() == lens.len()
            && views
                .iter()
                .zip(&lens)
                .all(|(d, &len)| match (d, config.output) {
                    (ViewData::U8(d), Output::U8) => d.len() == len,
                    (ViewData::F32(d), Output::F32 { .. }) => d.len() == len,
                    _ => false,
                })
    };
    match spare.filter(fits) {
        Some(views) => views,
        None => lens
            .iter()
            .map(|&len| match config.output {
                Output::U8 => ViewData::U8(vec![0; len]),
                Output::F32 { .. } => ViewData::F32(vec![0.0; len]),
            })
            .collect(),
    }
}

fn make_batch(
    ds: &Dataset,
    config: &PipelineConfig,
    workers: &[Mutex<Worker>],
    step: usize,
    epoch: u64,
    ids: &[u32],
    mut views: Vec<ViewData>,
) -> Result<Batch> {
    let n = ids.len();
    let nv = views.len();
    // One slot per (sample, view), sample-major: each view tensor split into per-sample slices.
    let mut per_view: Vec<Box<dyn Iterator<Item = ViewOut> + '_>> = config
        .views
        .iter()
        .zip(views.iter_mut())
        .map(|(spec, data)| {
            let per = 3 * (spec.size * spec.size) as usize;
            let it: Box<dyn Iterator<Item = ViewOut>> = match (data, config.output) {
                (ViewData::U8(d), _) => Box::new(d.chunks_mut(per).map(ViewOut::U8)),
                (ViewData::F32(d), Output::F32 { mean, std }) => {
                    Box::new(d.chunks_mut(per).map(move |c| ViewOut::F32(c, mean, std)))
                }
                (ViewData::F32(_), Output::U8) => unreachable!("buffers match the output"),
            };
            it
        })
        .collect();
    let mut slots = Vec::with_capacity(n * nv);
    for _ in 0..n {
        for it in per_view.iter_mut() {
            slots.push(it.next().expect("a slice per sample"));
        }
    }
    drop(per_view);
    let results: Vec<Result<SampleDone>> = ids
        .par_iter()
        .zip(slots.par_chunks_mut(nv))
        .map(|(&id, outs)| {
            let thread = rayon::current_thread_index().unwrap_or(0) % workers.len();
            let mut w = workers[thread].lock().unwrap_or_else(|e| e.into_inner());
            let w = &mut *w;
            let mut times = StageTimes::default();
            let mut skipped = Vec::new();
            for k in 0..MAX_REPLACEMENTS {
                let candidate = ((id as usize + k) % ds.len()) as u32;
                match read_record(ds, candidate as usize, &mut w.decoder, &mut times) {
                    Ok(img) => {
                        for (v, (spec, out)) in config.views.iter().zip(outs.iter_mut()).enumerate() {
                            let mut rng = view_rng(config.seed, epoch, candidate as u64, v as u64);
                            make_view(img, spec, &mut rng, &mut w.views, out.reborrow(), &mut times)?;
                        }
                        let label = ds.meta(candidate as usize)?.label;
                        return Ok((candidate, label, skipped, times));
                    }
                    Err(e) => skipped.push((candidate, e.to_string())),
                }
            }
            Err(Error::Invalid(format!(
                "{MAX_REPLACEMENTS} records in a row from {id} cannot be read; the dataset is badly damaged (run `loader verify`)"
            )))
        })
        .collect();
    let mut batch = Batch {
        step,
        epoch,
        views,
        sizes: config.views.iter().map(|v| v.size).collect(),
        labels: Vec::with_capacity(n),
        sample_ids: Vec::with_capacity(n),
        skipped: Vec::new(),
        times: StageTimes::default(),
    };
    for r in results {
        let (id, label, skipped, times) = r?;
        batch.sample_ids.push(id);
        batch.labels.push(label);
        batch.skipped.extend(skipped);
        batch.times.add(&times);
    }
    Ok(batch)
}
