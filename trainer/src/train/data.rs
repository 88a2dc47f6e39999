//! Training batches from packed shards (augmented on the fly by `shared::pipeline`) or from view
//! shards (`loader views`, read at memory speed), turned into normalised tensors on the device.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::train::checkpoint::DataIdentity;
use candle_core::{DType, Device, Tensor};
use shared::dataset::Dataset;
use shared::pipeline::{Output, Pipeline, PipelineConfig, IMAGENET_MEAN, IMAGENET_STD};
use shared::sampler::Sampler;
use shared::viewshards::{ViewShards, VIEWS_MANIFEST};

use crate::config::TrainConfig;

/// How each step's global batch is cut: rank `rank` of `world` takes the samples at positions
/// `j * world + rank` of the step (as [`Sampler::batch`] deals them), and its micro-batch `k` of
/// `accumulate` takes every `accumulate`-th of those from the `k`-th. So micro-batch `k` of rank
/// `r` is what rank `k * world + r` of `world * accumulate` would get: the split changes where a
/// sample is computed, never which samples a step sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    pub rank: usize,
    pub world: usize,
    pub accumulate: usize,
    /// Ranks on this machine (their input pipelines share its cores).
    pub local_ranks: usize,
}

/// The samples of one micro-batch: rows of the rank's batch, and their positions in the step's
/// global batch (which key their masks).
pub struct Micro {
    pub rows: Vec<usize>,
    pub positions: Vec<u64>,
}

impl Split {
    /// Micro-batch `k` of `size` samples.
    pub fn micro(&self, k: usize, size: usize) -> Micro {
        let rows: Vec<usize> = (0..size).map(|i| i * self.accumulate + k).collect();
        let positions = rows
            .iter()
            .map(|&j| (j * self.world + self.rank) as u64)
            .collect();
        Micro { rows, positions }
    }
}

/// One step's views (this rank's part) as u8 CHW bytes, global views first, each
/// `[batch, 3, size, size]`.
pub struct HostBatch {
    pub step: usize,
    pub epoch: u64,
    pub views: Vec<Vec<u8>>,
    pub sizes: Vec<u32>,
    pub labels: Vec<u32>,
    /// Records skipped because they could not be read (index, reason).
    pub skipped: Vec<(u32, String)>,
}

/// Where batches come from.
enum Source {
    Stream(Pipeline),
    Views {
        shards: Arc<ViewShards>,
        next: usize,
        end: usize,
    },
}

/// A stream of training batches for steps `start..end`: this rank's part of each.
pub struct Batches {
    source: Source,
    split: Split,
    /// The global batch.
    batch_size: usize,
}

/// What a data folder offers a run.
#[derive(Clone, Debug)]
pub struct DataPlan {
    pub steps_per_epoch: usize,
    /// Steps available in total (view shards hold a fixed number of epochs).
    pub max_steps: Option<usize>,
    pub records: usize,
    /// What identifies this data, recorded in checkpoints so a resume sees the same.
    pub identity: DataIdentity,
}

/// The identity of the data in `dir`: the CRC-32 of its manifest file and its record count.
fn identity(manifest: &Path, records: usize) -> Result<DataIdentity> {
    let bytes = std::fs::read(manifest).io("read", manifest)?;
    Ok(DataIdentity {
        manifest_crc32: crc32fast::hash(&bytes),
        records: records as u64,
    })
}

/// Whether `dir` holds view shards (else packed shards).
pub fn is_view_folder(dir: &Path) -> bool {
    dir.join(VIEWS_MANIFEST).is_file()
}

/// Opens `dir` and checks that it suits `cfg`.
pub fn plan(dir: &Path, cfg: &TrainConfig) -> Result<DataPlan> {
    if is_view_folder(dir) {
        let shards = ViewShards::open(dir)?;
        check_view_shards(&shards, cfg, dir)?;
        let m = shards.manifest();
        return Ok(DataPlan {
            steps_per_epoch: m.steps_per_epoch,
            max_steps: Some(m.steps_per_epoch * m.epochs as usize),
            records: shards.len(),
            identity: identity(&dir.join(VIEWS_MANIFEST), shards.len())?,
        });
    }
    let dataset = Dataset::open(dir).map_err(|e| {
        Error::Data(format!(
            "{} is neither packed shards nor view shards: {e}",
            dir.display()
        ))
    })?;
    // Too few images for one batch (none, say) is said here, before the sampler would refuse.
    if dataset.len() < cfg.data.batch_size {
        return Err(Error::Data(format!(
            "{} holds {} images, fewer than one batch of {}: lower batch_size",
            dir.display(),
            dataset.len(),
            cfg.data.batch_size
        )));
    }
    let sampler = Sampler::new(dataset.len(), cfg.run.seed, 0, 1, cfg.data.batch_size)?;
    Ok(DataPlan {
        steps_per_epoch: sampler.steps_per_epoch(),
        max_steps: None,
        records: dataset.len(),
        identity: identity(&dir.join(shared::manifest::MANIFEST_FILE), dataset.len())?,
    })
}

fn check_view_shards(shards: &ViewShards, cfg: &TrainConfig, dir: &Path) -> Result<()> {
    let m = shards.manifest();
    let sizes: Vec<u32> = m.views.iter().map(|v| v.size).collect();
    let want: Vec<u32> = cfg.view_specs().iter().map(|v| v.size).collect();
    if sizes != want {
        return Err(Error::Data(format!(
            "view shards in {} have views of {:?} px but the config wants {:?} \
             (image_size, global_views, local_views, local_size)",
            dir.display(),
            sizes,
            want
        )));
    }
    if m.views
        .iter()
        .any(|v| v.rotation != cfg.data.rotation as f32)
    {
        return Err(Error::Data(format!(
            "view shards in {} were made with a rotation other than the config's {} degrees: \
             set rotation to the value given to `loader views --rotation`",
            dir.display(),
            cfg.data.rotation
        )));
    }
    if m.batch_size != cfg.data.batch_size {
        return Err(Error::Data(format!(
            "view shards in {} were made with batch size {}: set batch_size={}",
            dir.display(),
            m.batch_size,
            m.batch_size
        )));
    }
    Ok(())
}

impl Batches {
    /// Starts producing rank `split.rank`'s part of steps `start..end` from `dir`.
    pub fn open(
        dir: &Path,
        cfg: &TrainConfig,
        start: usize,
        end: usize,
        split: Split,
    ) -> Result<Self> {
        let source = if is_view_folder(dir) {
            let shards = ViewShards::open(dir)?;
            check_view_shards(&shards, cfg, dir)?;
            Source::Views {
                shards: Arc::new(shards),
                next: start,
                end,
            }
        } else {
            let dataset = Arc::new(Dataset::open(dir)?);
            let threads = if cfg.data.threads == 0 {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                (cores / split.local_ranks.max(1)).max(1)
            } else {
                cfg.data.threads
            };
            Source::Stream(Pipeline::start(
                dataset,
                PipelineConfig {
                    views: cfg.view_specs(),
                    batch_size: cfg.data.batch_size / split.world,
                    seed: cfg.run.seed,
                    threads,
                    prefetch: cfg.data.prefetch,
                    rank: split.rank,
                    world_size: split.world,
                    start_step: start,
                    end_step: end,
                    output: Output::U8,
                },
            )?)
        };
        Ok(Batches {
            source,
            split,
            batch_size: cfg.data.batch_size,
        })
    }

    /// Hands a consumed batch back so that a later one reuses its buffers.
    pub fn recycle(&self, batch: HostBatch) {
        if let Source::Stream(pipeline) = &self.source {
            pipeline.recycle(
                batch
                    .views
                    .into_iter()
                    .map(shared::pipeline::ViewData::U8)
                    .collect(),
            );
        }
    }

    /// The next batch, or `None` after the last step.
    pub fn next_batch(&mut self) -> Result<Option<HostBatch>> {
        match &mut self.source {
            Source::Stream(pipeline) => {
                let Some(batch) = pipeline.next() else {
                    return Ok(None);
                };
                let batch = batch?;
                let views = batch
                    .views
                    .into_iter()
                    .map(|v| match v {
                        shared::pipeline::ViewData::U8(bytes) => Ok(bytes),
                        shared::pipeline::ViewData::F32(_) => {
                            Err(Error::Data("the pipeline gave f32 views".into()))
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Some(HostBatch {
                    step: batch.step,
                    epoch: batch.epoch,
                    views,
                    sizes: batch.sizes,
                    labels: batch.labels,
                    skipped: batch.skipped,
                }))
            }
            Source::Views { shards, next, end } => {
                if *next >= *end {
                    return Ok(None);
                }
                let step = *next;
                *next += 1;
                let m = shards.manifest();
                let sizes: Vec<u32> = m.views.iter().map(|v| v.size).collect();
                let part = self.batch_size / self.split.world;
                let mut views: Vec<Vec<u8>> = sizes
                    .iter()
                    .map(|&s| Vec::with_capacity(part * 3 * (s * s) as usize))
                    .collect();
                let mut labels = Vec::with_capacity(part);
                let first = step * self.batch_size + self.split.rank;
                for k in (0..part).map(|j| first + j * self.split.world) {
                    let sample = shards.sample(k)?;
                    for (out, bytes) in views.iter_mut().zip(&sample.views) {
                        out.extend_from_slice(bytes);
                    }
                    labels.push(sample.label);
                }
                Ok(Some(HostBatch {
                    step,
                    epoch: (step / m.steps_per_epoch) as u64,
                    views,
                    sizes,
                    labels,
                    skipped: Vec::new(),
                }))
            }
        }
    }
}

/// u8 CHW images `[n, 3, s, s]` to ImageNet-normalised f32 on `device` (normalised there: 4x fewer
/// bytes cross to the device).
pub fn imagenet_normalised(bytes: &[u8], n: usize, size: usize, device: &Device) -> Result<Tensor> {
    let x = Tensor::from_slice(bytes, (n, 3, size, size), device)?.to_dtype(DType::F32)?;
    let (scale, shift) = shared::views::normalising_affine(IMAGENET_MEAN, IMAGENET_STD);
    let scale = Tensor::from_slice(&scale, (1, 3, 1, 1), device)?;
    let shift = Tensor::from_slice(&shift, (1, 3, 1, 1), device)?;
    Ok(x.broadcast_mul(&scale)?.broadcast_sub(&shift)?)
}

/// The global views of micro-batch `micro` of `batch` stacked view-major
/// (`[global * n, 3, S, S]`), and the local views likewise when there are any.
pub fn to_device(
    batch: &HostBatch,
    micro: &Micro,
    global_views: usize,
    device: &Device,
) -> Result<(Tensor, Option<Tensor>)> {
    let n = micro.rows.len();
    let stack = |range: std::ops::Range<usize>| -> Result<Option<Tensor>> {
        if range.is_empty() {
            return Ok(None);
        }
        let size = batch.sizes[range.start] as usize;
        let image = 3 * size * size;
        let mut bytes: Vec<u8> = Vec::with_capacity(n * range.len() * image);
        for view in &batch.views[range.clone()] {
            for &row in &micro.rows {
                bytes.extend_from_slice(&view[row * image..(row + 1) * image]);
            }
        }
        Ok(Some(imagenet_normalised(
            &bytes,
            n * range.len(),
            size,
            device,
        )?))
    };
    let global = stack(0..global_views)?
        .ok_or_else(|| Error::Data("a batch without global views".into()))?;
    let local = stack(global_views..batch.views.len())?;
    Ok((global, local))
}
