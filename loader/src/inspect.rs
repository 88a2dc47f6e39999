//! `loader inspect`: what a packed dataset holds, and one record as a PNG for a person to look at.

use anyhow::{Context, Result};
use clap::Args;
use shared::dataset::Dataset;
use std::path::PathBuf;

/// Arguments of `loader inspect`.
#[derive(Args)]
pub struct InspectArgs {
    /// A packed dataset folder.
    dir: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Write record I (0-based, in dataset order) as an image to --to.
    #[arg(long, requires = "to")]
    dump: Option<usize>,
    /// The image file --dump writes (PNG, or any format by extension).
    #[arg(long, requires = "dump")]
    to: Option<PathBuf>,
}

/// Runs `loader inspect`.
pub fn run(a: InspectArgs) -> Result<()> {
    if a.dir.join(shared::viewshards::VIEWS_MANIFEST).exists() {
        return view_shards(&a);
    }
    let ds = Dataset::open(&a.dir)?;
    if let (Some(i), Some(to)) = (a.dump, &a.to) {
        let img = ds.image(i)?;
        let buf =
            image::RgbImage::from_raw(img.width, img.height, img.pixels).context("record size")?;
        buf.save(to)
            .with_context(|| format!("writing {}", to.display()))?;
        let label = ds.meta(i)?.label;
        let class = ds
            .manifest()
            .classes
            .get(label as usize)
            .map_or("-", String::as_str);
        eprintln!(
            "wrote record {i} ({}x{}, class {class}) to {}",
            img.width,
            img.height,
            to.display()
        );
        return Ok(());
    }
    let m = ds.manifest();
    let mut widths = Vec::with_capacity(ds.len());
    let mut heights = Vec::with_capacity(ds.len());
    for shard in ds.shards() {
        for meta in shard.metas() {
            widths.push(meta.width);
            heights.push(meta.height);
        }
    }
    let stats = |v: &mut Vec<u32>| {
        v.sort_unstable();
        match v.len() {
            0 => serde_json::json!(null),
            n => serde_json::json!({"min": v[0], "median": v[n / 2], "max": v[n - 1]}),
        }
    };
    let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
    let classes: Vec<_> = m
        .classes
        .iter()
        .zip(&m.counts_per_class)
        .map(|(name, count)| serde_json::json!({"name": name, "records": count}))
        .collect();
    let summary = serde_json::json!({
        "records": m.records,
        "shards": m.shards.len(),
        "bytes": bytes,
        "encoding": m.options.encoding,
        "options": m.options,
        "classes": classes,
        "unlabelled": m.unlabelled,
        "failures": m.failures.len(),
        "width": stats(&mut widths),
        "height": stats(&mut heights),
    });
    if a.json {
        println!("{summary}");
        return Ok(());
    }
    println!("dataset   {}", a.dir.display());
    println!(
        "records   {} in {} shards, {:.1} MiB",
        m.records,
        m.shards.len(),
        bytes as f64 / (1 << 20) as f64
    );
    println!(
        "encoding  {}",
        serde_json::to_string(&m.options.encoding)?.trim_matches('"')
    );
    println!("width     {}", summary["width"]);
    println!("height    {}", summary["height"]);
    println!("failures  {}", m.failures.len());
    println!(
        "classes   {} (+{} unlabelled records)",
        m.classes.len(),
        m.unlabelled
    );
    for (name, count) in m.classes.iter().zip(&m.counts_per_class) {
        println!("  {count:>8}  {name}");
    }
    Ok(())
}

/// `loader inspect` of a folder of view shards (`loader views`): what they hold.
fn view_shards(a: &InspectArgs) -> Result<()> {
    if a.dump.is_some() {
        anyhow::bail!(
            "{} holds view shards: --dump shows records of packed datasets only",
            a.dir.display()
        );
    }
    let vs = shared::viewshards::ViewShards::open(&a.dir)?;
    let m = vs.manifest();
    let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
    let sizes: Vec<u32> = m.views.iter().map(|v| v.size).collect();
    let summary = serde_json::json!({
        "kind": "view shards",
        "records": m.records,
        "shards": m.shards.len(),
        "bytes": bytes,
        "source": m.source,
        "views": sizes,
        "seed": m.seed,
        "epochs": m.epochs,
        "batch_size": m.batch_size,
        "steps_per_epoch": m.steps_per_epoch,
        "classes": m.classes.len(),
        "skipped": m.skipped.len(),
    });
    if a.json {
        println!("{summary}");
        return Ok(());
    }
    println!("view shards {} (from {})", a.dir.display(), m.source);
    println!(
        "records     {} samples in {} shards, {:.1} MiB",
        m.records,
        m.shards.len(),
        bytes as f64 / (1 << 20) as f64
    );
    println!("views       {} per sample, sizes {sizes:?} px", sizes.len());
    println!(
        "epochs      {} of {} steps, batch {}, seed {}",
        m.epochs, m.steps_per_epoch, m.batch_size, m.seed
    );
    println!("classes     {}", m.classes.len());
    println!(
        "skipped     {} unreadable records replaced",
        m.skipped.len()
    );
    Ok(())
}
