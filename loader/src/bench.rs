//! `loader bench`: how fast the input pipeline makes views, where the time goes, and how it
//! scales with threads, without a trainer.

use anyhow::{bail, Result};
use clap::Args;
use rayon::prelude::*;
use shared::cpu::Isa;
use shared::dataset::Dataset;
use shared::decode::{RgbDecoder, RgbRef, DEFAULT_MAX_PIXELS};
use shared::pipeline::{Output, Pipeline, PipelineConfig};
use shared::sampler::view_rng;
use shared::source::SourceList;
use shared::views::{make_view, StageTimes, ViewOut, ViewSpec, ViewWorkspace};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Arguments of `loader bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// A packed dataset (shards) or a folder of image files (then every sample is read and decoded from its file).
    src: PathBuf,
    /// View preset: byol, multicrop, byol-small, multicrop-small.
    #[arg(long, default_value = "byol")]
    preset: String,
    /// Most threads to measure; scaling is shown for 1, 2, 4, ... up to this (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Samples processed per measurement (cycling over the data).
    #[arg(long, default_value_t = 512)]
    samples: usize,
    /// Measurements per thread count; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Seed of the augmentations.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Batch size of the streamed measurement (shards only): the trainer's pipeline, batches
    /// collated and queued, at the most threads.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Where samples come from.
enum Source {
    Shards(Arc<Dataset>),
    Files(SourceList),
}

impl Source {
    fn len(&self) -> usize {
        match self {
            Source::Shards(d) => d.len(),
            Source::Files(f) => f.files.len(),
        }
    }

    /// Reads and decodes sample `i`.
    fn load<'a>(
        &'a self,
        i: usize,
        decoder: &'a mut RgbDecoder,
        times: &mut StageTimes,
    ) -> Result<RgbRef<'a>> {
        match self {
            Source::Shards(d) => Ok(shared::pipeline::read_record(d, i, decoder, times)?),
            Source::Files(f) => {
                let t = Instant::now();
                let bytes = std::fs::read(f.path(i))?;
                let t2 = Instant::now();
                times.read += t2 - t;
                // The decoder's buffer outlives `bytes`; the decoded view borrows only the decoder.
                let img = decoder.decode(&bytes, DEFAULT_MAX_PIXELS)?;
                times.decode += t2.elapsed();
                Ok(img)
            }
        }
    }
}

#[derive(Default)]
struct Worker {
    decoder: RgbDecoder,
    views: ViewWorkspace,
    out: Vec<Vec<u8>>,
}

/// Makes every view of `samples` samples on `threads` threads; returns seconds and stage times.
fn run_once(
    src: &Source,
    views: &[ViewSpec],
    threads: usize,
    samples: usize,
    seed: u64,
) -> Result<(f64, StageTimes)> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let start = Instant::now();
    let times = pool.install(|| {
        (0..samples)
            .into_par_iter()
            .map_init(Worker::default, |w, k| -> Result<StageTimes> {
                let mut times = StageTimes::default();
                let i = k % src.len();
                w.out.resize_with(views.len(), Vec::new);
                let img = src.load(i, &mut w.decoder, &mut times)?;
                for (v, (spec, out)) in views.iter().zip(w.out.iter_mut()).enumerate() {
                    out.resize((3 * spec.size * spec.size) as usize, 0);
                    let mut rng = view_rng(seed, 0, k as u64, v as u64);
                    make_view(
                        img,
                        spec,
                        &mut rng,
                        &mut w.views,
                        ViewOut::U8(out),
                        &mut times,
                    )?;
                }
                Ok(times)
            })
            .try_reduce(StageTimes::default, |mut a, b| {
                a.add(&b);
                Ok(a)
            })
    })?;
    Ok((start.elapsed().as_secs_f64(), times))
}

/// Streams `samples` samples (rounded up to whole batches) through the trainer's pipeline on
/// `threads` threads, the consumer handing every batch back at once; returns samples/s.
fn run_streamed(
    ds: &Arc<Dataset>,
    views: &[ViewSpec],
    threads: usize,
    samples: usize,
    batch: usize,
    seed: u64,
) -> Result<f64> {
    let steps = samples.div_ceil(batch);
    let config = PipelineConfig {
        views: views.to_vec(),
        batch_size: batch,
        seed,
        threads,
        prefetch: 4,
        rank: 0,
        world_size: 1,
        start_step: 0,
        end_step: steps,
        output: Output::U8,
    };
    let start = Instant::now();
    let mut pipeline = Pipeline::start(ds.clone(), config)?;
    while let Some(b) = pipeline.next() {
        pipeline.recycle(b?.views);
    }
    Ok((steps * batch) as f64 / start.elapsed().as_secs_f64())
}

/// Runs `loader bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    let views = shared::views::preset(&a.preset)?;
    let src = if a.src.join(shared::manifest::MANIFEST_FILE).exists() {
        Source::Shards(Arc::new(Dataset::open(&a.src)?))
    } else {
        Source::Files(shared::source::list_unlabelled(&a.src)?)
    };
    if src.len() == 0 || a.samples == 0 || a.repeats == 0 {
        bail!("nothing to measure: need at least one sample, --samples >= 1 and --repeats >= 1");
    }
    let max_threads = a.threads.unwrap_or_else(rayon::current_num_threads).max(1);
    let mut counts: Vec<usize> = std::iter::successors(Some(1usize), |t| Some(t * 2))
        .take_while(|&t| t < max_threads)
        .collect();
    counts.push(max_threads);
    // Warm up (page cache, allocations).
    run_once(&src, &views, max_threads, a.samples.min(64), a.seed)?;
    let mut scaling = Vec::new();
    let mut one_thread_times = StageTimes::default();
    for &t in &counts {
        let mut rates = Vec::new();
        for _ in 0..a.repeats {
            let (secs, times) = run_once(&src, &views, t, a.samples, a.seed)?;
            rates.push(a.samples as f64 / secs);
            if t == 1 {
                one_thread_times.add(&times);
            }
        }
        scaling.push((t, shared::stats::median(rates)));
    }
    let (threads, sps) = *scaling.last().expect("at least one count");
    let streamed = match &src {
        Source::Shards(ds) if a.batch <= ds.len() => {
            run_streamed(ds, &views, threads, a.samples, a.batch, a.seed)?; // warm-up
            let rates = (0..a.repeats)
                .map(|_| run_streamed(ds, &views, threads, a.samples, a.batch, a.seed))
                .collect::<Result<Vec<_>>>()?;
            Some(shared::stats::median(rates))
        }
        _ => None,
    };
    let per_sample = (a.samples * a.repeats) as f64;
    let stages: Vec<(&str, f64)> = one_thread_times
        .stages()
        .iter()
        .map(|(name, d)| (*name, d.as_secs_f64() * 1e3 / per_sample))
        .collect();
    let kind = match src {
        Source::Shards(_) => "shards",
        Source::Files(_) => "files",
    };
    if a.json {
        let summary = serde_json::json!({
            "samples_per_second": sps,
            "views_per_second": sps * views.len() as f64,
            "threads": threads,
            "instruction_set": Isa::widest().name(),
            "kernels": Isa::active().name(),
            "preset": a.preset,
            "views_per_sample": views.len(),
            "source": kind,
            "streamed_samples_per_second": streamed,
            "batch": a.batch,
            "scaling": scaling.iter().map(|(t, s)| serde_json::json!({"threads": t, "samples_per_second": s})).collect::<Vec<_>>(),
            "stage_ms_per_sample_1_thread": stages.iter().map(|(n, ms)| (n.to_string(), serde_json::json!(ms))).collect::<serde_json::Map<_, _>>(),
        });
        println!("{summary}");
        return Ok(());
    }
    println!(
        "{} preset, {} views/sample, {} source ({} samples), {} samples per run, median of {}; \
         CPU: {} (decoding and resizing dispatch at run time), our augmentation kernels on {}",
        a.preset,
        views.len(),
        kind,
        src.len(),
        a.samples,
        a.repeats,
        Isa::widest(),
        Isa::active()
    );
    println!(
        "{:>8} {:>12} {:>12} {:>9}",
        "threads", "samples/s", "views/s", "scaling"
    );
    for (t, s) in &scaling {
        println!(
            "{t:>8} {s:>12.1} {:>12.1} {:>8.2}x",
            s * views.len() as f64,
            s / scaling[0].1
        );
    }
    if let Some(rate) = streamed {
        println!(
            "streamed through the trainer's pipeline (batches of {}, {threads} threads): \
             {rate:.1} samples/s, {:.0}% of the per-sample rate",
            a.batch,
            100.0 * rate / sps
        );
    }
    let total: f64 = stages.iter().map(|s| s.1).sum();
    println!("time per sample on 1 thread, by stage:");
    for (name, ms) in stages {
        println!(
            "  {name:<12} {ms:>8.3} ms  {:>5.1}%",
            100.0 * ms / total.max(1e-12)
        );
    }
    Ok(())
}
