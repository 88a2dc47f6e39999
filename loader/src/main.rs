//! `loader`: decode image datasets once into verified memory-mapped shards, and look inside them.
//!
//! The binary only parses arguments, shows progress and wires the `shared` crate's pieces.

mod bench;
mod import;
mod inspect;
mod progress;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use shared::manifest::{PackOptions, Part};
use shared::pack::{PackJob, PackProgress};
use shared::resize::Filter;
use shared::shard::Encoding;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "loader",
    version,
    about = "Decode, pack, verify and inspect image datasets as memory-mapped shards"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Draw the embedded labelled dataset (ImageNet layout: OUT/train/<class>/*.png, OUT/val/...).
    Synth(SynthArgs),
    /// Decode every image of SRC once, resize it and write shards plus a manifest to --out.
    Pack(PackArgs),
    /// Combine the finished parts of a multi-machine pack (--part I/N) in DIR into one manifest.
    Merge {
        /// The folder holding every part's shards and part manifests.
        dir: PathBuf,
    },
    /// Check every checksum and the index of every shard; exit non-zero naming any damage.
    Verify {
        /// A packed dataset folder.
        dir: PathBuf,
    },
    /// Print counts, classes, sizes and encodings of a packed dataset, or dump one record as PNG.
    Inspect(inspect::InspectArgs),
    /// Materialise E epochs of augmented multi-view batches from a packed dataset into view shards.
    /// A killed run, started again with the same arguments, resumes after its last finished shard.
    Views(ViewsArgs),
    /// Profile the multi-view input pipeline: samples/s, views/s, time per stage, thread scaling.
    Bench(bench::BenchArgs),
    /// Convert a dataset in another layout (IDX files, class folders of cut-outs) into class
    /// folders split into OUT/train, OUT/val and OUT/test, ready for `loader pack`.
    #[command(subcommand)]
    Import(import::ImportCommand),
}

#[derive(Args)]
struct SynthArgs {
    /// Output folder (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Seed of every random choice: the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Number of classes (object kinds), at most 12.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Training images per class.
    #[arg(long, default_value_t = 100)]
    train_per_class: usize,
    /// Validation images per class (at 50 per class and 10 classes, a top-1 figure near 40% has
    /// a standard error of about 2 points).
    #[arg(long, default_value_t = 50)]
    val_per_class: usize,
    /// Test images per class: a third split for reporting figures whose settings were chosen on
    /// val (0: no test/ folder).
    #[arg(long, default_value_t = 50)]
    test_per_class: usize,
    /// Side of the square images in pixels.
    #[arg(long, default_value_t = 64)]
    size: u32,
}

#[derive(Args)]
struct ViewsArgs {
    /// A packed dataset folder (from `loader pack`).
    dir: PathBuf,
    /// View preset: byol, multicrop, byol-small, multicrop-small.
    #[arg(long, default_value = "byol")]
    preset: String,
    /// Largest random rotation of every view, in degrees (0-180; the trainer's `rotation`).
    #[arg(long, default_value_t = 0.0)]
    rotation: f32,
    /// Epochs to materialise.
    #[arg(long, default_value_t = 1)]
    epochs: u64,
    /// Seed of the epoch orders and augmentations (the same seed gives the same bytes).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Samples per step: record k is sample k % B of step k / B.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Worker threads (default: all cores). The output does not depend on it.
    #[arg(long)]
    threads: Option<usize>,
    /// Target shard size in bytes; suffixes K, M, G accepted.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    shard_size: u64,
    /// Output folder for the view shards and views.json.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum EncodingArg {
    /// Raw RGB8 pixels: fastest to read, about 3 bytes a pixel.
    Raw,
    /// JPEG at --quality: about 8x smaller, decoded at read time.
    Jpeg,
}

#[derive(Clone, Copy, ValueEnum)]
enum FilterArg {
    /// Antialiased bilinear (torchvision's default).
    Bilinear,
    /// Antialiased Catmull-Rom bicubic (Pillow's BICUBIC).
    Bicubic,
    /// Lanczos3 (Pillow's LANCZOS).
    Lanczos,
}

#[derive(Args)]
struct PackArgs {
    /// Dataset root: SRC/<class>/<image> (ImageNet train layout), or a flat folder with --labels or --unlabelled.
    src: PathBuf,
    /// Output folder for shards, manifest.json and sources.txt (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Label file for a flat folder: ImageNet's LOC_val_solution.csv or `relative/path,class` lines.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Pack every image under SRC without labels (unlabelled pretraining data).
    #[arg(long, conflicts_with = "labels")]
    unlabelled: bool,
    /// With --labels: take the class list from this packed dataset (e.g. the train set), so indices agree.
    #[arg(long, requires = "labels")]
    classes_from: Option<PathBuf>,
    /// Resize so the shorter side is this many pixels.
    #[arg(long, default_value_t = 256, conflicts_with = "keep_size")]
    short_side: u32,
    /// Also shrink so the longer side is at most this many pixels.
    #[arg(long)]
    max_side: Option<u32>,
    /// Keep the decoded size (no short-side resize; --max-side still applies).
    #[arg(long)]
    keep_size: bool,
    /// Enlarge images smaller than --short-side (by default they keep their size).
    #[arg(long)]
    upscale: bool,
    /// Resize filter.
    #[arg(long, value_enum, default_value = "bilinear")]
    filter: FilterArg,
    /// How pixels are stored in the shards.
    #[arg(long, value_enum, default_value = "raw")]
    encoding: EncodingArg,
    /// JPEG quality (1-100) for --encoding jpeg.
    #[arg(long, default_value_t = 90)]
    quality: u8,
    /// Refuse images with more pixels than this (decompression-bomb guard).
    #[arg(long, default_value_t = shared::decode::DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
    /// Target shard size in bytes; suffixes K, M, G (powers of 1024) accepted.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    shard_size: u64,
    /// Decode threads (default: all cores). The output does not depend on it.
    #[arg(long)]
    threads: Option<usize>,
    /// Pack only part I of N (0-based) of the sorted file list, for a cluster job array; then `loader merge`.
    #[arg(long, value_parser = parse_part)]
    part: Option<Part>,
    /// Exit non-zero if any file failed to decode.
    #[arg(long)]
    strict: bool,
    /// Print a final JSON summary on stdout instead of the text one.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 512M or 1G"))?;
    if n <= 0.0 {
        return Err(format!("`{s}`: size must be positive"));
    }
    Ok((n * mult as f64) as u64)
}

fn parse_part(s: &str) -> Result<Part, String> {
    let err = || format!("`{s}`: expected I/N with 0 <= I < N, e.g. 3/8");
    let (i, n) = s.split_once('/').ok_or_else(err)?;
    let (index, count): (u32, u32) = (i.parse().map_err(|_| err())?, n.parse().map_err(|_| err())?);
    if index >= count {
        return Err(err());
    }
    Ok(Part { index, count })
}

fn main() {
    shared::process::quiet_on_closed_pipe();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Synth(a) => synth(a),
        Command::Pack(a) => pack(a),
        Command::Merge { dir } => merge(&dir),
        Command::Verify { dir } => verify(&dir),
        Command::Inspect(a) => inspect::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Views(a) => views(a),
        Command::Import(c) => import::run(c),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn synth(a: SynthArgs) -> Result<()> {
    let spec = shared::synth::SynthSpec {
        seed: a.seed,
        classes: a.classes,
        train_per_class: a.train_per_class,
        val_per_class: a.val_per_class,
        test_per_class: a.test_per_class,
        size: a.size,
    };
    let total = a.classes * (a.train_per_class + a.val_per_class + a.test_per_class);
    let bar = progress::bar(total as u64, "synth");
    let n = shared::synth::write_dataset(&spec, &a.out, &|| bar.inc(1))?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {n} images of {} classes to {}",
        a.classes,
        a.out.display()
    );
    Ok(())
}

fn pack(a: PackArgs) -> Result<()> {
    let sources = match &a.labels {
        None if a.unlabelled => shared::source::list_unlabelled(&a.src)?,
        None => shared::source::list_class_folders(&a.src)?,
        Some(labels) => {
            let classes = match &a.classes_from {
                Some(dir) => Some(shared::manifest::Manifest::load(dir)?.classes),
                None => None,
            };
            shared::source::list_labelled_folder(&a.src, labels, classes)?
        }
    };
    if sources.not_images > 0 && !a.json {
        eprintln!(
            "left out {} files without an image extension ({})",
            sources.not_images,
            shared::source::IMAGE_EXTENSIONS.join(", ")
        );
    }
    let options = PackOptions {
        short_side: (!a.keep_size).then_some(a.short_side),
        max_side: a.max_side,
        upscale: a.upscale,
        filter: match a.filter {
            FilterArg::Bilinear => Filter::Bilinear,
            FilterArg::Bicubic => Filter::Bicubic,
            FilterArg::Lanczos => Filter::Lanczos,
        },
        encoding: match a.encoding {
            EncodingArg::Raw => Encoding::Raw,
            EncodingArg::Jpeg => Encoding::Jpeg,
        },
        quality: a.quality,
        max_pixels: a.max_pixels,
        shard_size: a.shard_size,
    };
    let threads = a.threads.unwrap_or_else(rayon::current_num_threads);
    let job = PackJob {
        sources: &sources,
        out: a.out.clone(),
        options,
        part: a.part,
        threads,
    };
    let started = Instant::now();
    let mut bar = None;
    let report = shared::pack::pack(&job, &mut |p| match p {
        PackProgress::Start { total, done } => {
            let b = progress::bar(total, "pack");
            b.set_position(done);
            b.reset_eta();
            bar = Some(b);
        }
        PackProgress::Advance(n) => {
            if let Some(b) = &bar {
                b.inc(n)
            }
        }
    })
    .with_context(|| format!("packing {} into {}", a.src.display(), a.out.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let seconds = started.elapsed().as_secs_f64();
    let m = &report.manifest;
    let processed = (m.records + m.failures.len() as u64).saturating_sub(report.resumed_files);
    let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
    if a.json {
        let failures: Vec<_> = m
            .failures
            .iter()
            .map(|f| serde_json::json!({"path": f.path, "reason": f.reason}))
            .collect();
        let summary = serde_json::json!({
            "images": m.records,
            "failed": m.failures.len(),
            "failures": failures,
            "shards": m.shards.len(),
            "bytes": bytes,
            "seconds": seconds,
            "images_per_second": processed as f64 / seconds.max(1e-9),
            "threads": threads,
            "resumed_files": report.resumed_files,
            "not_images": sources.not_images,
            "already_complete": report.already_complete,
        });
        println!("{summary}");
    } else {
        if report.already_complete {
            eprintln!(
                "{} already holds this finished pack of the same source and options ({} images \
                 in {} shards); nothing to do",
                a.out.display(),
                m.records,
                m.shards.len()
            );
            return Ok(());
        }
        if report.resumed_files > 0 {
            eprintln!(
                "resumed an interrupted pack after {} files",
                report.resumed_files
            );
        }
        eprintln!(
            "packed {} images into {} shards ({:.1} MiB) in {seconds:.1} s ({:.0} images/s on {threads} threads); {} failed",
            m.records,
            m.shards.len(),
            bytes as f64 / (1 << 20) as f64,
            processed as f64 / seconds.max(1e-9),
            m.failures.len()
        );
        for f in m.failures.iter().take(20) {
            eprintln!("  failed: {}: {}", f.path, f.reason);
        }
        if m.failures.len() > 20 {
            eprintln!(
                "  ... and {} more (all listed in the manifest)",
                m.failures.len() - 20
            );
        }
    }
    if a.strict && !m.failures.is_empty() {
        bail!("{} files failed and --strict is set", m.failures.len());
    }
    Ok(())
}

fn views(a: ViewsArgs) -> Result<()> {
    let mut views = shared::views::preset(&a.preset)?;
    for v in &mut views {
        v.rotation = a.rotation;
    }
    let job = shared::viewshards::ViewsJob {
        source: a.dir.clone(),
        views,
        seed: a.seed,
        epochs: a.epochs,
        batch_size: a.batch,
        threads: a.threads.unwrap_or_else(rayon::current_num_threads),
        shard_size: a.shard_size,
        out: a.out.clone(),
    };
    let started = Instant::now();
    let mut bar = None;
    // The first report says where an interrupted run resumes.
    let mut resumed_at = None;
    let m = shared::viewshards::write_views(&job, &mut |done, total| {
        resumed_at.get_or_insert(done);
        bar.get_or_insert_with(|| progress::bar(total, "views"))
            .set_position(done);
    })
    .with_context(|| {
        format!(
            "materialising views of {} into {}",
            a.dir.display(),
            a.out.display()
        )
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let secs = started.elapsed().as_secs_f64();
    // Progress counts steps of `batch_size` samples.
    let resumed_steps = resumed_at.unwrap_or(0);
    let resumed = resumed_steps * m.batch_size as u64;
    if resumed_steps > 0 {
        eprintln!("resumed an interrupted run after {resumed_steps} steps ({resumed} samples)");
    }
    eprintln!(
        "wrote {} samples x {} views ({} steps of {}) into {} shards in {secs:.1} s ({:.0} samples/s this run); {} unreadable records replaced",
        m.records,
        m.views.len(),
        m.records / m.batch_size as u64,
        m.batch_size,
        m.shards.len(),
        m.records.saturating_sub(resumed) as f64 / secs.max(1e-9),
        m.skipped.len()
    );
    Ok(())
}

fn merge(dir: &Path) -> Result<()> {
    let m = shared::pack::merge(dir)?;
    eprintln!(
        "merged {} shards ({} records, {} failures) into {}",
        m.shards.len(),
        m.records,
        m.failures.len(),
        dir.join(shared::manifest::MANIFEST_FILE).display()
    );
    Ok(())
}

fn verify(dir: &Path) -> Result<()> {
    let (shards, records) = shared::dataset::listed_shards(dir)?;
    let total: u64 = shards.iter().map(|s| s.bytes).sum();
    let bar = progress::bytes_bar(total, "verify");
    let damage = shared::dataset::verify(dir, &mut |n| bar.inc(n))?;
    bar.finish_and_clear();
    if damage.is_empty() {
        eprintln!(
            "ok: {} shards, {} records, {:.1} MiB: every checksum matches",
            shards.len(),
            records,
            total as f64 / (1 << 20) as f64
        );
        return Ok(());
    }
    for d in &damage {
        eprintln!("damaged: {d}");
    }
    let fix = if dir.join(shared::viewshards::VIEWS_MANIFEST).exists() {
        "make the view shards again (`loader views` with the same arguments, into a new folder)"
    } else {
        "repack the affected shards (`loader pack` into a new folder)"
    };
    bail!("{}: {} damaged places; {fix}", dir.display(), damage.len())
}
