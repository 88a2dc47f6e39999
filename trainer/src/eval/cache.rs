//! Feature files: a backbone's features of a whole dataset, extracted once (`trainer eval
//! features`) and memory-mapped by kNN and the linear probe, so that one extraction serves every
//! `k`, temperature and learning rate. The layout is in `docs/FORMAT.md` ("Feature files").
//!
//! Extraction writes `FILE.partial` and renames it to `FILE` only once every row and the checksum
//! are written; a killed extraction continues from the rows already in `FILE.partial`.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Serialize};

use super::features::{self, LabelledFeatures, Origin};
use crate::error::{Error, IoContext, Result};

/// The first bytes of a feature file.
const MAGIC: &[u8; 8] = b"MDFEAT01";
/// The last 16 bytes of a complete feature file: this tag, then the CRC-32 of the labels and
/// features (u32, little-endian) and four zero bytes.
const END_TAG: &[u8; 8] = b"MDFEATOK";
const TRAILER: usize = 16;
/// Sections start at multiples of this many bytes (so that mapped rows are aligned).
const ALIGN: usize = 64;
/// A header larger than this is not one of ours.
const MAX_HEADER: u64 = 64 << 20;

/// How feature values are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// IEEE half precision: half the size, but rounding (about 1e-3 relative) can reorder
    /// neighbours whose similarities are that close. It did on the demo's random backbone, whose
    /// features all point nearly the same way: kNN top-1 33.8% against 34.8% in f32.
    F16,
    /// Single precision: exactly the values the backbone computed (the default).
    F32,
}

impl Precision {
    fn bytes(self) -> usize {
        match self {
            Precision::F16 => 2,
            Precision::F32 => 4,
        }
    }
}

/// What a feature file says about itself (its JSON header).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Number of rows (images), in the dataset's order.
    pub rows: usize,
    /// Values per row.
    pub dim: usize,
    pub precision: Precision,
    /// Class names, in label order.
    pub classes: Vec<String>,
    /// The backbone and image size.
    pub origin: Origin,
    /// The checkpoint folder the backbone came from (none for a random backbone).
    pub checkpoint: Option<PathBuf>,
    /// Its training step.
    pub step: Option<u64>,
    /// How the images became features.
    pub preprocessing: String,
    /// The packed dataset the rows come from.
    pub dataset: PathBuf,
}

impl Header {
    fn encoded(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serialising plain data cannot fail")
    }

    /// Byte offsets of the labels and of the features, and the total length of a complete file.
    fn layout(&self) -> (usize, usize, usize) {
        let labels = align(16 + self.encoded().len());
        let features = align(labels + 4 * self.rows);
        let end = features + self.rows * self.row_bytes() + TRAILER;
        (labels, features, end)
    }

    fn row_bytes(&self) -> usize {
        self.dim * self.precision.bytes()
    }
}

fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// The name a feature file has while it is being written.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Rows of a mapped feature file.
pub(super) struct MappedRows {
    map: Arc<memmap2::Mmap>,
    offset: usize,
    dim: usize,
    precision: Precision,
}

impl MappedRows {
    pub(super) fn dim(&self) -> usize {
        self.dim
    }

    /// Appends rows `range`, as f32, to `out`.
    pub(super) fn append(&self, range: std::ops::Range<usize>, out: &mut Vec<f32>) {
        let row = self.dim * self.precision.bytes();
        let bytes = &self.map[self.offset + range.start * row..self.offset + range.end * row];
        match self.precision {
            Precision::F32 => out.extend_from_slice(bytemuck::cast_slice::<u8, f32>(bytes)),
            Precision::F16 => {
                let half: &[half::f16] = bytemuck::cast_slice(bytes);
                let start = out.len();
                out.resize(start + half.len(), 0.0);
                half.convert_to_f32_slice(&mut out[start..]);
            }
        }
    }
}

/// Receives rows of features (row-major f32), in order.
pub type RowSink<'a> = dyn FnMut(&[f32]) -> Result<()> + 'a;

/// Writes a feature file at `path` with `header`, `labels` and the rows that
/// `extract_rows(first, sink)` hands to `sink` from row `first` on, continuing a `path.partial`
/// left by an interrupted write of the same header (its complete rows are kept).
pub fn write(
    path: &Path,
    header: &Header,
    labels: &[u32],
    extract_rows: &mut dyn FnMut(usize, &mut RowSink) -> Result<()>,
) -> Result<()> {
    if labels.len() != header.rows {
        return Err(Error::Data(format!(
            "{} labels for {} rows",
            labels.len(),
            header.rows
        )));
    }
    let partial = partial_path(path);
    let (labels_at, features_at, end) = header.layout();
    let row_bytes = header.row_bytes();
    let done = resumable_rows(&partial, header)?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&partial)
        .io("create", &partial)?;
    match done {
        Some(rows) => {
            let keep = features_at + rows * row_bytes;
            file.set_len(keep as u64).io("truncate", &partial)?;
            file.seek(SeekFrom::Start(keep as u64))
                .io("seek in", &partial)?;
        }
        None => {
            file.set_len(0).io("truncate", &partial)?;
            let mut head = vec![0u8; features_at];
            let json = header.encoded();
            head[..8].copy_from_slice(MAGIC);
            head[8..16].copy_from_slice(&(json.len() as u64).to_le_bytes());
            head[16..16 + json.len()].copy_from_slice(&json);
            for (i, l) in labels.iter().enumerate() {
                head[labels_at + 4 * i..labels_at + 4 * i + 4].copy_from_slice(&l.to_le_bytes());
            }
            file.write_all(&head).io("write", &partial)?;
        }
    }
    let first = done.unwrap_or(0);
    let mut written = first;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, &file);
    let mut half_rows = Vec::new();
    extract_rows(first, &mut |rows: &[f32]| {
        let bytes: &[u8] = match header.precision {
            Precision::F32 => bytemuck::cast_slice(rows),
            Precision::F16 => {
                half_rows.resize(rows.len(), half::f16::ZERO);
                half_rows.convert_from_f32_slice(rows);
                bytemuck::cast_slice(&half_rows)
            }
        };
        written += rows.len() / header.dim.max(1);
        out.write_all(bytes).io("write", &partial)
    })?;
    out.flush().io("write", &partial)?;
    drop(out);
    if written != header.rows {
        return Err(Error::Data(format!(
            "the extraction produced {written} rows where {} were expected",
            header.rows
        )));
    }
    // The checksum covers the labels and the features, read back from the file.
    file.sync_all().io("sync", &partial)?;
    // SAFETY: the file is ours and nothing else writes it while it is mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }.io("map", &partial)?;
    let crc = crc32fast::hash(&map[labels_at..end - TRAILER]);
    drop(map);
    let mut trailer = [0u8; TRAILER];
    trailer[..8].copy_from_slice(END_TAG);
    trailer[8..12].copy_from_slice(&crc.to_le_bytes());
    (&file).write_all(&trailer).io("write", &partial)?;
    file.sync_all().io("sync", &partial)?;
    drop(file);
    std::fs::rename(&partial, path).io("rename into place", path)?;
    Ok(())
}

/// How many complete rows `partial` holds if it was started with this same header.
fn resumable_rows(partial: &Path, header: &Header) -> Result<Option<usize>> {
    let Ok(bytes) = std::fs::metadata(partial).map(|m| m.len() as usize) else {
        return Ok(None);
    };
    let (_, features_at, end) = header.layout();
    match read_header(partial) {
        Ok(h) if &h == header && bytes >= features_at && bytes < end => {
            Ok(Some((bytes - features_at) / header.row_bytes().max(1)))
        }
        _ => Ok(None),
    }
}

/// Reads and parses the header of the feature file at `path`.
fn read_header(path: &Path) -> Result<Header> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).io("open", path)?;
    let mut start = [0u8; 16];
    let bad = |message: String| Error::BadFile {
        path: path.to_path_buf(),
        message,
    };
    file.read_exact(&mut start)
        .map_err(|_| bad("too short to be a feature file".into()))?;
    if &start[..8] != MAGIC {
        return Err(bad(
            "not a feature file (made by `trainer eval features`)".into()
        ));
    }
    let len = u64::from_le_bytes(start[8..16].try_into().expect("8 bytes"));
    if len > MAX_HEADER {
        return Err(bad(format!("header of {len} bytes: the file is damaged")));
    }
    let mut json = vec![0u8; len as usize];
    file.read_exact(&mut json)
        .map_err(|_| bad("ends inside its header: the file is damaged".into()))?;
    serde_json::from_slice(&json).map_err(|e| bad(format!("unreadable header: {e}")))
}

/// Opens a complete feature file: its header, its labels and its mapped rows. A file that is
/// shorter or longer than its header says, lacks its end tag or fails its checksum is refused.
pub fn open(path: &Path) -> Result<(Header, LabelledFeatures)> {
    let header = read_header(path)?;
    let bad = |message: String| Error::BadFile {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).io("open", path)?;
    // SAFETY: feature files are written once and renamed into place; nothing writes them after.
    let map = unsafe { memmap2::Mmap::map(&file) }.io("map", path)?;
    let (labels_at, features_at, end) = header.layout();
    if map.len() != end {
        return Err(bad(format!(
            "{} bytes where its header ({} rows of {} {:?} values) needs {end}: the file is \
             truncated or damaged; extract it again",
            map.len(),
            header.rows,
            header.dim,
            header.precision
        )));
    }
    let trailer = &map[end - TRAILER..];
    let crc = u32::from_le_bytes(trailer[8..12].try_into().expect("4 bytes"));
    if &trailer[..8] != END_TAG || crc32fast::hash(&map[labels_at..end - TRAILER]) != crc {
        return Err(bad(
            "checksum mismatch: the file is damaged; extract it again".into(),
        ));
    }
    let labels = map[labels_at..labels_at + 4 * header.rows]
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    let rows = MappedRows {
        map: Arc::new(map),
        offset: features_at,
        dim: header.dim,
        precision: header.precision,
    };
    let set = LabelledFeatures::mapped(rows, labels, header.classes.clone(), header.origin.clone())
        .map_err(|e| bad(e.to_string()))?;
    if header.preprocessing != features::PREPROCESSING {
        return Err(bad(format!(
            "made with other preprocessing (`{}`) than this trainer's (`{}`); extract it again",
            header.preprocessing,
            features::PREPROCESSING
        )));
    }
    Ok((header, set))
}

/// What `trainer eval features` extracts: a model's features of a whole dataset.
pub struct Extraction<'a> {
    pub model: &'a crate::method::maskdeep::MaskDeep,
    pub origin: &'a Origin,
    /// The checkpoint folder and step the model came from (none for a random backbone).
    pub checkpoint: Option<(PathBuf, u64)>,
    pub dataset: &'a shared::dataset::Dataset,
    pub precision: Precision,
    /// Images per forward pass.
    pub batch: usize,
    pub device: &'a candle_core::Device,
}

impl Extraction<'_> {
    /// The header of the feature file this extraction writes.
    pub fn header(&self) -> Result<Header> {
        Ok(Header {
            rows: self.dataset.len(),
            dim: self.model.online.backbone.config().channels()[2],
            precision: self.precision,
            classes: features::labelled_classes(self.dataset)?,
            origin: self.origin.clone(),
            checkpoint: self.checkpoint.as_ref().map(|c| c.0.clone()),
            step: self.checkpoint.as_ref().map(|c| c.1),
            preprocessing: features::PREPROCESSING.to_string(),
            dataset: self.dataset.dir().to_path_buf(),
        })
    }

    /// Writes the feature file `path` with `header` (from [`Self::header`]), continuing
    /// `path.partial` of the same extraction; `progress` gets (images done, images).
    pub fn write(
        &self,
        path: &Path,
        header: &Header,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<()> {
        let all: Vec<usize> = (0..self.dataset.len()).collect();
        let labels = features::labels_of(self.dataset, &all)?;
        write(path, header, &labels, &mut |first, sink| {
            let n = all.len();
            features::extract_into(
                &self.model.online.backbone,
                self.dataset,
                &all[first..],
                self.origin.image_size,
                self.batch,
                self.device,
                sink,
                &mut |done, _| progress(first + done, n),
            )
        })
    }
}

/// Whether `path` is a complete, intact feature file with exactly `header`.
pub fn holds(path: &Path, header: &Header) -> bool {
    path.is_file() && open(path).is_ok_and(|(h, _)| &h == header)
}
