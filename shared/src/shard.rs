//! The shard file: a header, an aligned payload of records, and an index (see `docs/FORMAT.md`).
//!
//! All integers are little-endian. A shard is written to a temporary name and renamed when
//! complete, so a shard file that exists under its final name is whole.

use crate::error::{Error, IoContext, Result};
use crate::fsutil::temp_path;
use memmap2::Mmap;
use std::fs::{self, File};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The first eight bytes of every shard.
pub const MAGIC: [u8; 8] = *b"MDSHARD\0";
/// The shard format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the fixed header at the start of the file.
pub const HEADER_SIZE: usize = 64;
/// Size of one index entry.
pub const ENTRY_SIZE: usize = 48;
/// The payload starts at this alignment (a page), so raw records can be mapped directly.
pub const PAYLOAD_ALIGN: u64 = 4096;
/// Every record starts at a multiple of this many bytes.
pub const RECORD_ALIGN: u64 = 64;
/// Label value for records that have no class.
pub const NO_LABEL: u32 = u32::MAX;

/// How a record's payload is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Row-major 8-bit RGB pixels (height x width x 3), readable with zero copies.
    Raw,
    /// A baseline JPEG file.
    Jpeg,
    /// The augmented views of one sample (`loader views`): u8 CHW planes of each view, one after
    /// another, with the view sizes listed in the view manifest.
    Views,
}

impl Encoding {
    fn code(self) -> u8 {
        match self {
            Encoding::Raw => 0,
            Encoding::Jpeg => 1,
            Encoding::Views => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Encoding::Raw),
            1 => Some(Encoding::Jpeg),
            2 => Some(Encoding::Views),
            _ => None,
        }
    }
}

/// What the index says about one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordMeta {
    /// Absolute byte offset of the payload in the shard file.
    pub offset: u64,
    /// Payload length in bytes.
    pub length: u64,
    /// Image height in pixels.
    pub height: u32,
    /// Image width in pixels.
    pub width: u32,
    /// Class index, or [`NO_LABEL`].
    pub label: u32,
    /// How the payload is stored.
    pub encoding: Encoding,
    /// Position of the source file in the dataset's `sources.txt`.
    pub source_id: u64,
    /// CRC-32 (IEEE, as zlib's `crc32`) of the payload bytes.
    pub crc32: u32,
}

/// One image ready to be written: its pixels (or JPEG bytes) and what describes it.
#[derive(Clone, Debug)]
pub struct Record {
    pub height: u32,
    pub width: u32,
    pub label: u32,
    pub encoding: Encoding,
    pub source_id: u64,
    pub payload: Vec<u8>,
}

/// Summary of a finished shard, as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardSummary {
    /// File name relative to the dataset folder.
    pub file: String,
    /// Number of records.
    pub records: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// CRC-32 of the whole file.
    pub crc32: u32,
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// The size a shard holding records of these payload lengths would have.
pub fn shard_size_for(lengths: impl IntoIterator<Item = u64>) -> u64 {
    let mut end = PAYLOAD_ALIGN;
    let mut n = 0u64;
    for len in lengths {
        end = align_up(end, RECORD_ALIGN) + len;
        n += 1;
    }
    align_up(end, RECORD_ALIGN) + n * ENTRY_SIZE as u64
}

/// Streams records into a new shard file; [`ShardWriter::finish`] writes the index and header
/// and renames the temporary file to its final name.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    pos: u64,
    entries: Vec<RecordMeta>,
    body_crc: crc32fast::Hasher,
}

impl ShardWriter {
    /// Starts writing the shard that will be called `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = temp_path(path);
        let file = File::create(&tmp).at(&tmp)?;
        let mut w = ShardWriter {
            path: path.to_path_buf(),
            tmp,
            // Small enough that image payloads bypass the buffer instead of being copied into it.
            out: BufWriter::with_capacity(64 << 10, file),
            pos: HEADER_SIZE as u64,
            entries: Vec::new(),
            body_crc: crc32fast::Hasher::new(),
        };
        // Placeholder header; the real one is written by `finish`.
        w.out.write_all(&[0u8; HEADER_SIZE]).at(&w.tmp)?;
        w.pad_to(PAYLOAD_ALIGN)?;
        Ok(w)
    }

    /// Number of records written so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no record has been written yet.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The file size the shard would have if `extra` more payload bytes were added now.
    pub fn size_with(&self, extra: u64) -> u64 {
        let end = align_up(self.pos, RECORD_ALIGN) + extra;
        align_up(end, RECORD_ALIGN) + (self.entries.len() as u64 + 1) * ENTRY_SIZE as u64
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).at(&self.tmp)?;
        self.body_crc.update(bytes);
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, align: u64) -> Result<()> {
        const ZEROS: [u8; PAYLOAD_ALIGN as usize] = [0; PAYLOAD_ALIGN as usize];
        let pad = (align_up(self.pos, align) - self.pos) as usize;
        self.put(&ZEROS[..pad])
    }

    /// Appends one record.
    pub fn push(&mut self, record: &Record) -> Result<()> {
        if record.encoding == Encoding::Raw {
            let expect = record.height as u64 * record.width as u64 * 3;
            if record.payload.len() as u64 != expect {
                return Err(Error::Invalid(format!(
                    "raw record of {}x{} must hold {expect} bytes, got {}",
                    record.width,
                    record.height,
                    record.payload.len()
                )));
            }
        }
        self.pad_to(RECORD_ALIGN)?;
        let meta = RecordMeta {
            offset: self.pos,
            length: record.payload.len() as u64,
            height: record.height,
            width: record.width,
            label: record.label,
            encoding: record.encoding,
            source_id: record.source_id,
            crc32: crc32fast::hash(&record.payload),
        };
        self.put(&record.payload)?;
        self.entries.push(meta);
        Ok(())
    }

    /// Writes the index and the header, syncs and renames the file to its final name.
    pub fn finish(mut self) -> Result<ShardSummary> {
        self.pad_to(RECORD_ALIGN)?;
        let index_offset = self.pos;
        let mut index = Vec::with_capacity(self.entries.len() * ENTRY_SIZE);
        for e in &self.entries {
            encode_entry(e, &mut index);
        }
        self.put(&index)?;
        let file_size = self.pos;
        let header = encode_header(
            self.entries.len() as u64,
            index_offset,
            file_size,
            crc32fast::hash(&index),
        );
        let mut file = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        file.seek(SeekFrom::Start(0)).at(&self.tmp)?;
        file.write_all(&header).at(&self.tmp)?;
        file.sync_all().at(&self.tmp)?;
        drop(file);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        crc.combine(&self.body_crc);
        fs::rename(&self.tmp, &self.path).at(&self.path)?;
        Ok(ShardSummary {
            file: self
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            records: self.entries.len() as u64,
            bytes: file_size,
            crc32: crc.finalize(),
        })
    }
}

/// Writes records into a sequence of shards in one folder, starting a new shard when the current
/// one would grow past the target size (a shard always takes at least one record).
pub struct ShardRoller {
    dir: PathBuf,
    name: Box<dyn Fn(usize) -> String + Send>,
    limit: u64,
    writer: Option<ShardWriter>,
    finished: Vec<ShardSummary>,
}

impl ShardRoller {
    /// Continues after the already `finished` shards; shard `n` is called `name(n)` in `dir`.
    pub fn new(
        dir: &Path,
        name: impl Fn(usize) -> String + Send + 'static,
        limit: u64,
        finished: Vec<ShardSummary>,
    ) -> Self {
        ShardRoller {
            dir: dir.to_path_buf(),
            name: Box::new(name),
            limit,
            writer: None,
            finished,
        }
    }

    /// The shards finished so far.
    pub fn finished(&self) -> &[ShardSummary] {
        &self.finished
    }

    /// Appends a record; returns `true` when a shard was finished to make room for it.
    pub fn push(&mut self, record: &Record) -> Result<bool> {
        let len = record.payload.len() as u64;
        let full = self
            .writer
            .take_if(|w| !w.is_empty() && w.size_with(len) > self.limit);
        let closed = match full {
            Some(w) => {
                self.finished.push(w.finish()?);
                true
            }
            None => false,
        };
        let writer = match &mut self.writer {
            Some(w) => w,
            None => {
                let path = self.dir.join((self.name)(self.finished.len()));
                self.writer.insert(ShardWriter::create(&path)?)
            }
        };
        writer.push(record)?;
        Ok(closed)
    }

    /// Finishes the last shard and returns them all.
    pub fn finish(mut self) -> Result<Vec<ShardSummary>> {
        if let Some(w) = self.writer.take().filter(|w| !w.is_empty()) {
            self.finished.push(w.finish()?);
        }
        Ok(self.finished)
    }
}

/// Checks that every shard an interrupted job recorded as finished is still in `dir` with the size
/// it was written with (before a resumed job appends to them).
pub fn check_finished(dir: &Path, shards: &[ShardSummary]) -> Result<()> {
    for s in shards {
        let path = dir.join(&s.file);
        let len = fs::metadata(&path).at(&path)?.len();
        if len != s.bytes {
            return Err(Error::corrupt(
                &path,
                format!(
                    "{len} bytes, but the interrupted job wrote {}; delete the folder and start again",
                    s.bytes
                ),
            ));
        }
    }
    Ok(())
}

/// Removes shards `name(first)`, `name(first + 1)`, ... and their temporary files from `dir`, up
/// to the first number with neither: what an interrupted job wrote after its last finished shard.
pub fn remove_unfinished(dir: &Path, first: usize, name: impl Fn(usize) -> String) -> Result<()> {
    for n in first.. {
        let shard = dir.join(name(n));
        let mut found = false;
        for p in [temp_path(&shard), shard] {
            if p.exists() {
                fs::remove_file(&p).at(&p)?;
                found = true;
            }
        }
        if !found {
            break;
        }
    }
    Ok(())
}

fn encode_header(
    count: u64,
    index_offset: u64,
    file_size: u64,
    index_crc: u32,
) -> [u8; HEADER_SIZE] {
    let mut h = [0u8; HEADER_SIZE];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
    h[16..24].copy_from_slice(&count.to_le_bytes());
    h[24..32].copy_from_slice(&index_offset.to_le_bytes());
    h[32..40].copy_from_slice(&PAYLOAD_ALIGN.to_le_bytes());
    h[40..48].copy_from_slice(&file_size.to_le_bytes());
    h[48..52].copy_from_slice(&index_crc.to_le_bytes());
    let crc = crc32fast::hash(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

fn encode_entry(e: &RecordMeta, out: &mut Vec<u8>) {
    out.extend_from_slice(&e.offset.to_le_bytes());
    out.extend_from_slice(&e.length.to_le_bytes());
    out.extend_from_slice(&e.height.to_le_bytes());
    out.extend_from_slice(&e.width.to_le_bytes());
    out.extend_from_slice(&e.label.to_le_bytes());
    out.extend_from_slice(&[e.encoding.code(), 0, 0, 0]);
    out.extend_from_slice(&e.source_id.to_le_bytes());
    out.extend_from_slice(&e.crc32.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A shard opened for reading through a memory map. Opening checks the header, the index
/// checksum and that every record lies inside the payload, so no later read can go out of
/// bounds; [`Shard::verify_record`] checks a record's payload checksum.
pub struct Shard {
    path: PathBuf,
    map: Mmap,
    entries: Vec<RecordMeta>,
}

impl Shard {
    /// Maps and checks the shard at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).at(path)?;
        // SAFETY: shards are immutable once renamed into place; the map is read-only.
        let map = unsafe { Mmap::map(&file) }.at(path)?;
        let entries = parse(path, &map)?;
        Ok(Shard {
            path: path.to_path_buf(),
            map,
            entries,
        })
    }

    /// The file this shard was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the shard holds no record.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The index entry of record `i`.
    pub fn meta(&self, i: usize) -> &RecordMeta {
        &self.entries[i]
    }

    /// All index entries, in order.
    pub fn metas(&self) -> &[RecordMeta] {
        &self.entries
    }

    /// The payload bytes of record `i`, straight from the map (no copy).
    pub fn payload(&self, i: usize) -> &[u8] {
        let e = &self.entries[i];
        &self.map[e.offset as usize..(e.offset + e.length) as usize]
    }

    /// The whole file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Checks record `i`'s payload against its checksum.
    pub fn verify_record(&self, i: usize) -> Result<()> {
        let e = &self.entries[i];
        let got = crc32fast::hash(self.payload(i));
        if got != e.crc32 {
            return Err(Error::corrupt(
                &self.path,
                format!(
                    "record {i} (source {}): payload checksum {got:08x} != {:08x} in the index",
                    e.source_id, e.crc32
                ),
            ));
        }
        Ok(())
    }
}

fn parse(path: &Path, b: &[u8]) -> Result<Vec<RecordMeta>> {
    let bad = |msg: String| Error::corrupt(path, msg);
    if b.len() < HEADER_SIZE {
        return Err(bad(format!(
            "{} bytes is too short for a shard header; the file is truncated",
            b.len()
        )));
    }
    if b[0..8] != MAGIC {
        return Err(bad("not a shard file (bad magic bytes)".into()));
    }
    let header_crc = crc32fast::hash(&b[..60]);
    if header_crc != u32_at(b, 60) {
        return Err(bad("header checksum mismatch; the header is damaged".into()));
    }
    let version = u32_at(b, 8);
    if version != FORMAT_VERSION {
        return Err(bad(format!(
            "shard format version {version}; this build reads version {FORMAT_VERSION}"
        )));
    }
    let count = u64_at(b, 16);
    let index_offset = u64_at(b, 24);
    let payload_offset = u64_at(b, 32);
    let file_size = u64_at(b, 40);
    if file_size != b.len() as u64 {
        return Err(bad(format!(
            "file is {} bytes but its header says {file_size}; the file is truncated or extended",
            b.len()
        )));
    }
    let index_len = count
        .checked_mul(ENTRY_SIZE as u64)
        .filter(|&n| index_offset.checked_add(n) == Some(file_size))
        .ok_or_else(|| bad("index does not end at the end of the file".into()))?;
    if payload_offset < HEADER_SIZE as u64 || payload_offset > index_offset {
        return Err(bad("payload offset out of range".into()));
    }
    let index = &b[index_offset as usize..(index_offset + index_len) as usize];
    if crc32fast::hash(index) != u32_at(b, 48) {
        return Err(bad("index checksum mismatch; the index is damaged".into()));
    }
    let mut entries = Vec::with_capacity(count as usize);
    for (i, e) in index.chunks_exact(ENTRY_SIZE).enumerate() {
        let encoding = Encoding::from_code(e[28])
            .ok_or_else(|| bad(format!("record {i}: unknown encoding code {}", e[28])))?;
        let meta = RecordMeta {
            offset: u64_at(e, 0),
            length: u64_at(e, 8),
            height: u32_at(e, 16),
            width: u32_at(e, 20),
            label: u32_at(e, 24),
            encoding,
            source_id: u64_at(e, 32),
            crc32: u32_at(e, 40),
        };
        let end = meta.offset.checked_add(meta.length);
        if meta.offset < payload_offset || end.is_none_or(|end| end > index_offset) {
            return Err(bad(format!(
                "record {i}: payload lies outside the payload area"
            )));
        }
        if encoding == Encoding::Raw && meta.length != meta.height as u64 * meta.width as u64 * 3 {
            return Err(bad(format!(
                "record {i}: raw payload of {} bytes does not match {}x{} RGB",
                meta.length, meta.width, meta.height
            )));
        }
        entries.push(meta);
    }
    Ok(entries)
}

/// The shards of one folder opened together, with record `i` of the whole set found in O(1)
/// through the shards' record counts.
pub struct ShardSet {
    shards: Vec<Shard>,
    /// `starts[s]` is the index of shard `s`'s first record; the last entry is the total.
    starts: Vec<usize>,
}

impl ShardSet {
    /// Opens every listed shard of `dir`, checking each against its summary (records and size).
    pub fn open(dir: &Path, summaries: &[ShardSummary]) -> Result<Self> {
        let mut shards = Vec::with_capacity(summaries.len());
        let mut starts = vec![0];
        for s in summaries {
            let shard = Shard::open(&dir.join(&s.file))?;
            if shard.len() as u64 != s.records || shard.bytes().len() as u64 != s.bytes {
                return Err(Error::corrupt(
                    shard.path(),
                    format!(
                        "{} records / {} bytes but the manifest lists {} / {}",
                        shard.len(),
                        shard.bytes().len(),
                        s.records,
                        s.bytes
                    ),
                ));
            }
            starts.push(starts.last().expect("non-empty") + shard.len());
            shards.push(shard);
        }
        Ok(ShardSet { shards, starts })
    }

    /// Total records.
    pub fn len(&self) -> usize {
        *self.starts.last().expect("non-empty")
    }

    /// Whether there is no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shards, in record order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The shard holding record `i` and the record's index inside it.
    pub fn locate(&self, i: usize) -> Result<(&Shard, usize)> {
        if i >= self.len() {
            return Err(Error::Invalid(format!(
                "record {i} is out of range: there are {} records",
                self.len()
            )));
        }
        let s = self.starts.partition_point(|&start| start <= i) - 1;
        Ok((&self.shards[s], i - self.starts[s]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(h: u32, w: u32, seed: u8) -> Record {
        Record {
            height: h,
            width: w,
            label: seed as u32,
            encoding: Encoding::Raw,
            source_id: seed as u64 * 10,
            payload: (0..h * w * 3)
                .map(|i| (i as u8).wrapping_mul(seed))
                .collect(),
        }
    }

    fn write(dir: &Path, records: &[Record]) -> (PathBuf, ShardSummary) {
        let path = dir.join("s.mds");
        let mut w = ShardWriter::create(&path).unwrap();
        for r in records {
            w.push(r).unwrap();
        }
        let summary = w.finish().unwrap();
        (path, summary)
    }

    #[test]
    fn round_trip_and_size_prediction() {
        let dir = tempfile::tempdir().unwrap();
        let recs = vec![record(5, 7, 1), record(3, 2, 2), record(9, 1, 3)];
        let (path, summary) = write(dir.path(), &recs);
        let bytes = fs::read(&path).unwrap();
        assert_eq!(summary.bytes, bytes.len() as u64);
        assert_eq!(summary.crc32, crc32fast::hash(&bytes));
        assert_eq!(
            summary.bytes,
            shard_size_for(recs.iter().map(|r| r.payload.len() as u64))
        );
        let shard = Shard::open(&path).unwrap();
        assert_eq!(shard.len(), 3);
        for (i, r) in recs.iter().enumerate() {
            let m = shard.meta(i);
            assert_eq!(
                (m.height, m.width, m.label, m.source_id),
                (r.height, r.width, r.label, r.source_id)
            );
            assert_eq!(m.offset % RECORD_ALIGN, 0);
            assert_eq!(shard.payload(i), &r.payload[..]);
            shard.verify_record(i).unwrap();
        }
        assert!(!temp_path(&path).exists());
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let (path, summary) = write(dir.path(), &[record(4, 4, 1), record(2, 3, 2)]);
        let clean = fs::read(&path).unwrap();
        for at in 0..clean.len() {
            let mut bytes = clean.clone();
            bytes[at] ^= 0x10;
            fs::write(&path, &bytes).unwrap();
            // Either opening fails, a record checksum fails, or the whole-file checksum does.
            let detected = match Shard::open(&path) {
                Err(_) => true,
                Ok(s) => {
                    (0..s.len()).any(|i| s.verify_record(i).is_err())
                        || crc32fast::hash(s.bytes()) != summary.crc32
                }
            };
            assert!(detected, "flip at byte {at} went unnoticed");
        }
    }

    #[test]
    fn truncation_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write(dir.path(), &[record(8, 8, 1), record(8, 8, 2)]);
        let clean = fs::read(&path).unwrap();
        for len in [0, 10, 63, 64, 100, 4096, clean.len() - 1] {
            fs::write(&path, &clean[..len]).unwrap();
            let err = Shard::open(&path)
                .err()
                .expect("truncated shard must not open");
            assert!(err.to_string().contains("s.mds"), "{err}");
        }
    }

    #[test]
    fn raw_record_of_wrong_length_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::create(&dir.path().join("x.mds")).unwrap();
        let mut r = record(2, 2, 1);
        r.payload.pop();
        assert!(w.push(&r).is_err());
    }
}
