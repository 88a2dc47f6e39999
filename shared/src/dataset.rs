//! A packed dataset opened for reading: its manifest and memory-mapped shards.

use crate::decode::{decode_rgb, RgbImage, DEFAULT_MAX_PIXELS};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::read_json;
use crate::manifest::{Manifest, SOURCES_FILE};
use crate::shard::{Encoding, RecordMeta, Shard, ShardSet, ShardSummary};
use crate::viewshards::{ViewsManifest, VIEWS_MANIFEST};
use std::path::{Path, PathBuf};

/// A packed dataset. Record `i` of the dataset is found in O(1) through the shards' record
/// counts; raw payloads are read straight from the memory maps.
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    shards: ShardSet,
}

/// One damaged place found by [`Dataset::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The shard file.
    pub shard: String,
    /// The record, when the damage is in one record.
    pub record: Option<usize>,
    /// What is wrong.
    pub what: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.record {
            // The shard's own message may name the record already.
            Some(r) if !self.what.starts_with(&format!("record {r} ")) => {
                write!(f, "{}: record {r}: {}", self.shard, self.what)
            }
            _ => write!(f, "{}: {}", self.shard, self.what),
        }
    }
}

impl Dataset {
    /// Opens the dataset in `dir`, checking each shard's header and index against the manifest.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        let dir = if dir.is_dir() {
            dir.to_path_buf()
        } else {
            dir.parent().unwrap_or(Path::new(".")).to_path_buf()
        };
        let shards = ShardSet::open(&dir, &manifest.shards)?;
        Ok(Dataset {
            dir,
            manifest,
            shards,
        })
    }

    /// The dataset folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether the dataset has no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The opened shards, in record order.
    pub fn shards(&self) -> &[Shard] {
        self.shards.shards()
    }

    /// The index entry of record `i`.
    pub fn meta(&self, i: usize) -> Result<&RecordMeta> {
        let (shard, r) = self.shards.locate(i)?;
        Ok(shard.meta(r))
    }

    /// The payload bytes of record `i` (zero-copy).
    pub fn payload(&self, i: usize) -> Result<&[u8]> {
        let (shard, r) = self.shards.locate(i)?;
        Ok(shard.payload(r))
    }

    /// Record `i` as RGB pixels (a copy for raw records, a decode for JPEG ones).
    pub fn image(&self, i: usize) -> Result<RgbImage> {
        let meta = *self.meta(i)?;
        let bytes = self.payload(i)?;
        match meta.encoding {
            Encoding::Raw => RgbImage::new(meta.width, meta.height, bytes.to_vec()),
            Encoding::Jpeg => decode_rgb(bytes, DEFAULT_MAX_PIXELS),
            Encoding::Views => Err(Error::Invalid(format!(
                "record {i} holds augmented views, not an image; open the folder with ViewShards"
            ))),
        }
    }

    /// The source path of each record's `source_id`, read from `sources.txt`.
    pub fn source_paths(&self) -> Result<Vec<String>> {
        let path = self.dir.join(SOURCES_FILE);
        let text = std::fs::read_to_string(&path).at(&path)?;
        Ok(text.lines().map(str::to_string).collect())
    }
}

/// The shards a folder's manifest lists (`views.json` for view shards from `loader views`, else
/// the packed dataset's manifest) and the number of records they hold.
pub fn listed_shards(dir: &Path) -> Result<(Vec<ShardSummary>, u64)> {
    let views = dir.join(VIEWS_MANIFEST);
    if views.is_file() {
        let m: ViewsManifest = read_json(&views)?;
        return Ok((m.shards, m.records));
    }
    let m = Manifest::load(dir)?;
    Ok((m.shards, m.records))
}

/// Checks every byte of the packed dataset or view shards in `dir`: each shard's whole-file
/// checksum and size against the manifest, its header and index, and every record's checksum.
/// Returns the damage found (empty when intact); `on_shard` is called after each shard.
pub fn verify(dir: &Path, on_shard: &mut dyn FnMut(u64)) -> Result<Vec<Damage>> {
    let (shards, _) = listed_shards(dir)?;
    let mut damage = Vec::new();
    for s in &shards {
        let path = dir.join(&s.file);
        let mut found = |record, what: String| {
            damage.push(Damage {
                shard: s.file.clone(),
                record,
                what,
            })
        };
        match Shard::open(&path) {
            Err(e) => found(None, strip_path(&e, &path)),
            Ok(shard) => {
                let bytes = shard.bytes();
                if bytes.len() as u64 != s.bytes {
                    found(
                        None,
                        format!("{} bytes, manifest says {}", bytes.len(), s.bytes),
                    );
                }
                for i in 0..shard.len() {
                    if let Err(e) = shard.verify_record(i) {
                        found(Some(i), strip_path(&e, &path));
                    }
                }
                let crc = crc32fast::hash(bytes);
                if crc != s.crc32 {
                    found(
                        None,
                        format!("file checksum {crc:08x} != {:08x} in the manifest", s.crc32),
                    );
                }
                if shard.len() as u64 != s.records {
                    found(
                        None,
                        format!("{} records, manifest says {}", shard.len(), s.records),
                    );
                }
            }
        }
        on_shard(s.bytes);
    }
    Ok(damage)
}

fn strip_path(e: &Error, path: &Path) -> String {
    let text = e.to_string();
    let prefix = format!("{}: ", path.display());
    text.strip_prefix(&prefix)
        .map(str::to_string)
        .unwrap_or(text)
}
