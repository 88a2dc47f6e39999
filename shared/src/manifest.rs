//! The dataset manifest (`manifest.json`): what was packed, how, and into which shards.

use crate::error::{Error, Result};
use crate::resize::Filter;
use crate::shard::{Encoding, ShardSummary};
use std::path::{Path, PathBuf};

/// The manifest's file name in a finished dataset folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The file listing every source path, one a line; a record's `source_id` is its line number (from 0).
pub const SOURCES_FILE: &str = "sources.txt";
/// Value of the `format` field.
pub const FORMAT_NAME: &str = "maskdeep-shards";

/// The options a dataset was packed with. A resumed or merged pack must use the same.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PackOptions {
    /// Target length of the shorter side, or `None` to keep the size.
    pub short_side: Option<u32>,
    /// Upper bound on the longer side.
    pub max_side: Option<u32>,
    /// Whether smaller images were enlarged.
    pub upscale: bool,
    /// Resize filter.
    pub filter: Filter,
    /// Payload encoding.
    pub encoding: Encoding,
    /// JPEG quality (1-100), used when `encoding` is `jpeg`.
    pub quality: u8,
    /// Images with more pixels than this were refused.
    pub max_pixels: u64,
    /// Target shard size in bytes.
    pub shard_size: u64,
}

/// Which part of a multi-machine pack this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Part {
    /// Zero-based part index.
    pub index: u32,
    /// Number of parts.
    pub count: u32,
}

impl Part {
    /// The file name prefix of this part's shards and manifest (`part-0003-of-0008-`).
    pub fn prefix(&self) -> String {
        format!("part-{:04}-of-{:04}-", self.index, self.count)
    }

    /// The range of source positions this part packs.
    pub fn range(&self, total: usize) -> std::ops::Range<usize> {
        let (i, n) = (self.index as usize, self.count as usize);
        i * total / n..(i + 1) * total / n
    }
}

/// A file that could not be packed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    /// Path relative to the source root.
    pub path: String,
    /// Why it failed.
    pub reason: String,
}

/// Everything a reader needs to know about a packed dataset.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// Shard format version ([`crate::shard::FORMAT_VERSION`]).
    pub format_version: u32,
    /// The program that wrote it.
    pub created_by: String,
    /// The source folder as given.
    pub source: String,
    /// Options used.
    pub options: PackOptions,
    /// `Some` for one part of a multi-machine pack; `None` for a whole dataset.
    pub part: Option<Part>,
    /// Class names; labels index this list.
    pub classes: Vec<String>,
    /// Records per class.
    pub counts_per_class: Vec<u64>,
    /// Records without a label.
    pub unlabelled: u64,
    /// Total records.
    pub records: u64,
    /// Source files considered (the lines of `sources.txt`).
    pub sources: u64,
    /// CRC-32 of the source listing: class names, then each file's path and label. A pack run
    /// again into this folder resumes only when it lists the same. Absent in manifests written
    /// before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_fingerprint: Option<u32>,
    /// Shards in record order.
    pub shards: Vec<ShardSummary>,
    /// Files that could not be packed, with reasons.
    pub failures: Vec<Failure>,
}

impl Manifest {
    /// Reads `DIR/manifest.json` (or a manifest file given directly) and checks its format fields.
    pub fn load(path: &Path) -> Result<Self> {
        let file = manifest_path(path);
        if !file.exists() && path.is_dir() {
            let parts = part_manifests(path)?;
            let hint = if parts.is_empty() {
                "no manifest.json: not a packed dataset (create one with `loader pack`)".to_string()
            } else {
                format!(
                    "no manifest.json but {} part manifests: combine them with `loader merge {}`",
                    parts.len(),
                    path.display()
                )
            };
            return Err(Error::Invalid(format!("{}: {hint}", path.display())));
        }
        let m: Manifest = crate::fsutil::read_json(&file)?;
        if m.format != FORMAT_NAME {
            return Err(Error::corrupt(
                &file,
                format!("format is `{}`, not `{FORMAT_NAME}`", m.format),
            ));
        }
        if m.format_version != crate::shard::FORMAT_VERSION {
            return Err(Error::corrupt(
                &file,
                format!(
                    "format version {} but this build reads {}",
                    m.format_version,
                    crate::shard::FORMAT_VERSION
                ),
            ));
        }
        let total: u64 = m.shards.iter().map(|s| s.records).sum();
        if total != m.records || m.counts_per_class.len() != m.classes.len() {
            return Err(Error::corrupt(
                &file,
                "record counts disagree with the shard list",
            ));
        }
        Ok(m)
    }
}

/// `DIR/manifest.json` for a folder, or the path itself for a file.
pub fn manifest_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(MANIFEST_FILE)
    } else {
        path.to_path_buf()
    }
}

/// The part manifests (`part-*-manifest.json`) in `dir`, sorted by name.
pub fn part_manifests(dir: &Path) -> Result<Vec<PathBuf>> {
    use crate::error::IoContext;
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).at(dir)? {
        let name = e.at(dir)?.file_name().to_string_lossy().into_owned();
        if name.starts_with("part-") && name.ends_with(&format!("-{MANIFEST_FILE}")) {
            out.push(dir.join(name));
        }
    }
    out.sort();
    Ok(out)
}
