//! `loader import`: other dataset layouts into class folders split into train/val/test, ready for
//! `loader pack`.

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use shared::import::{Division, FolderImport, ImportReport, Split};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ImportCommand {
    /// IDX files (MNIST, Fashion-MNIST, ...): grayscale images and their labels into
    /// OUT/<split>/<label>/<index>.png.
    Idx {
        /// The images file (`...-images-idx3-ubyte`, uncompressed).
        #[arg(long)]
        images: PathBuf,
        /// The labels file (`...-labels-idx1-ubyte`, uncompressed).
        #[arg(long)]
        labels: PathBuf,
        /// Only the first N items of the files.
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        split: SplitArgs,
    },
    /// Class folders of images (any depth below each class) into OUT/<split>/<class>/*.png, as
    /// opaque RGB: transparent pixels of cut-outs are composited onto --background.
    Folders {
        /// The folder whose subfolders are the classes.
        src: PathBuf,
        /// Colour behind transparent pixels, as R,G,B.
        #[arg(long, default_value = "255,255,255")]
        background: String,
        /// Leave out images under folders of this name (repeatable).
        #[arg(long)]
        exclude: Vec<String>,
        /// Leave out classes with fewer images than this (after --exclude).
        #[arg(long, default_value_t = 1)]
        min_per_class: usize,
        #[command(flatten)]
        split: SplitArgs,
    },
}

/// Where the images go and how each class is split.
#[derive(Args)]
pub struct SplitArgs {
    /// Output folder: train/, val/ and test/ class folders are written inside.
    #[arg(long)]
    out: PathBuf,
    /// Share of each class for val. Items are ordered by a hash of their name and --seed, so
    /// the split is the same on every machine and does not depend on the other classes.
    #[arg(long, default_value_t = 0.1)]
    val: f64,
    /// Share of each class for test.
    #[arg(long, default_value_t = 0.1)]
    test: f64,
    /// Seed of the split's hash.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Put everything into one split instead (e.g. a dataset's own test files).
    #[arg(long, value_enum)]
    all_to: Option<SplitName>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SplitName {
    Train,
    Val,
    Test,
}

impl SplitArgs {
    fn division(&self) -> Division {
        match self.all_to {
            Some(SplitName::Train) => Division::All(Split::Train),
            Some(SplitName::Val) => Division::All(Split::Val),
            Some(SplitName::Test) => Division::All(Split::Test),
            None => Division::Shares {
                val: self.val,
                test: self.test,
                seed: self.seed,
            },
        }
    }
}

/// Runs one import and prints what it wrote.
pub fn run(command: ImportCommand) -> Result<()> {
    let (report, out) = match command {
        ImportCommand::Idx {
            images,
            labels,
            limit,
            split,
        } => (
            shared::import::import_idx(&images, &labels, &split.out, split.division(), limit)?,
            split.out,
        ),
        ImportCommand::Folders {
            src,
            background,
            exclude,
            min_per_class,
            split,
        } => {
            let job = FolderImport {
                division: split.division(),
                background: parse_rgb(&background)?,
                exclude,
                min_per_class,
            };
            (
                shared::import::import_folders(&src, &split.out, &job)?,
                split.out,
            )
        }
    };
    print_report(&report, &out);
    Ok(())
}

fn parse_rgb(s: &str) -> Result<[u8; 3]> {
    let parts: Vec<u8> = s
        .split(',')
        .map(|p| p.trim().parse::<u8>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--background `{s}`: expected R,G,B with values 0-255"))?;
    parts
        .try_into()
        .map_err(|_| anyhow::anyhow!("--background `{s}`: expected three values R,G,B"))
}

fn print_report(r: &ImportReport, out: &std::path::Path) {
    for (class, n) in &r.skipped_classes {
        eprintln!("left out class {class}: {n} images");
    }
    println!(
        "wrote {} classes to {}: {} train, {} val, {} test images",
        r.classes,
        out.display(),
        r.train,
        r.val,
        r.test
    );
}
