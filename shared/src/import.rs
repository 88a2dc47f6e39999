//! Converters of labelled datasets distributed in other layouts into class folders that
//! `loader pack` reads, split into `train/`, `val/` and `test/` the same way on every machine:
//! IDX files (MNIST and its kin) and trees of images in class folders (with transparent cut-outs
//! flattened onto a background).
//!
//! The split is stratified and fixed: within each class, items are ordered by a hash of their
//! name and the seed, and the first shares go to test and val. Adding or removing other classes
//! changes nothing in a class's split.

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::write_atomic;

/// One of the three splits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    /// The split's folder name.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

/// How the items of each class are divided between the splits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Division {
    /// Shares of each class for val and test (the rest is train), chosen by the hash of each
    /// item's name with `seed`.
    Shares { val: f64, test: f64, seed: u64 },
    /// Every item into one split (e.g. a dataset's own test file).
    All(Split),
}

impl Division {
    /// Checks that the shares are in [0, 1] and leave room for training.
    pub fn validate(&self) -> Result<()> {
        if let Division::Shares { val, test, .. } = *self {
            let ok = |s: f64| (0.0..=1.0).contains(&s);
            if !(ok(val) && ok(test) && val + test < 1.0) {
                return Err(Error::Invalid(format!(
                    "val and test shares must be in [0, 1] and leave some for train, got \
                     {val} and {test}"
                )));
            }
        }
        Ok(())
    }

    /// The split of each item of one class, given the items' names (in any order).
    pub fn assign(&self, names: &[String]) -> Vec<Split> {
        match *self {
            Division::All(split) => vec![split; names.len()],
            Division::Shares { val, test, seed } => {
                let mut order: Vec<(u32, usize)> = names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| {
                        let mut h = crc32fast::Hasher::new();
                        h.update(&seed.to_le_bytes());
                        h.update(name.as_bytes());
                        (h.finalize(), i)
                    })
                    .collect();
                order.sort_unstable();
                let n = names.len() as f64;
                let n_test = (n * test).round() as usize;
                let n_val = (n * val).round() as usize;
                let mut out = vec![Split::Train; names.len()];
                for (rank, &(_, i)) in order.iter().enumerate() {
                    if rank < n_test {
                        out[i] = Split::Test;
                    } else if rank < n_test + n_val {
                        out[i] = Split::Val;
                    }
                }
                out
            }
        }
    }
}

/// Images written per split.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImportReport {
    pub train: usize,
    pub val: usize,
    pub test: usize,
    /// Classes written.
    pub classes: usize,
    /// Classes left out for having too few images.
    pub skipped_classes: Vec<(String, usize)>,
}

impl ImportReport {
    fn count(&mut self, split: Split) {
        match split {
            Split::Train => self.train += 1,
            Split::Val => self.val += 1,
            Split::Test => self.test += 1,
        }
    }
}

/// Reads an IDX file's header and body: the dimensions and the unsigned-byte values.
fn read_idx(path: &Path, dims: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).at(path)?;
    let bad = |msg: String| Error::corrupt(path, msg);
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad(
            "not an IDX file (its first two bytes must be zero)".into()
        ));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!(
            "IDX values of type 0x{:02x}: only unsigned bytes (0x08) are read",
            bytes[2]
        )));
    }
    if bytes[3] as usize != dims {
        return Err(bad(format!(
            "{} dimensions where {dims} were expected ({})",
            bytes[3],
            if dims == 3 {
                "an images file: count, rows, columns"
            } else {
                "a labels file: count"
            }
        )));
    }
    let header = 4 + 4 * dims;
    if bytes.len() < header {
        return Err(bad("truncated header".into()));
    }
    let shape: Vec<usize> = bytes[4..header]
        .chunks(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let want = shape.iter().product::<usize>();
    if bytes.len() - header != want {
        return Err(bad(format!(
            "holds {} value bytes where its header {shape:?} says {want}",
            bytes.len() - header
        )));
    }
    Ok((shape, bytes[header..].to_vec()))
}

/// Where an imported image goes: `out/<split>/<class>/<name>.png`.
fn destination(out: &Path, split: Split, class: &str, name: &str) -> PathBuf {
    out.join(split.name())
        .join(class)
        .join(format!("{name}.png"))
}

/// Encodes `img` as PNG and writes it atomically to `path`, creating its folder.
fn write_png(path: &Path, img: &image::DynamicImage) -> Result<()> {
    let dir = path.parent().expect("a destination has a folder");
    std::fs::create_dir_all(dir).at(dir)?;
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Decode(format!("{}: cannot encode PNG: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Converts an IDX pair (grayscale images `count x rows x cols` and their labels, as MNIST ships
/// them) into `out/<split>/<label>/<index>.png`, the first `limit` items only when given.
pub fn import_idx(
    images: &Path,
    labels: &Path,
    out: &Path,
    division: Division,
    limit: Option<usize>,
) -> Result<ImportReport> {
    division.validate()?;
    let (shape, pixels) = read_idx(images, 3)?;
    let (label_shape, label_bytes) = read_idx(labels, 1)?;
    if shape[0] != label_shape[0] {
        return Err(Error::Invalid(format!(
            "{} holds {} images but {} holds {} labels",
            images.display(),
            shape[0],
            labels.display(),
            label_shape[0]
        )));
    }
    let (rows, cols) = (shape[1], shape[2]);
    let n = limit.map_or(shape[0], |l| l.min(shape[0]));
    let width = n.saturating_sub(1).to_string().len();
    let mut by_class: std::collections::BTreeMap<u8, Vec<usize>> = Default::default();
    for (i, &label) in label_bytes[..n].iter().enumerate() {
        by_class.entry(label).or_default().push(i);
    }
    let mut report = ImportReport {
        classes: by_class.len(),
        ..Default::default()
    };
    for (label, items) in &by_class {
        let names: Vec<String> = items.iter().map(|i| format!("{i:0width$}")).collect();
        for ((&i, name), split) in items.iter().zip(&names).zip(division.assign(&names)) {
            let body = pixels[i * rows * cols..(i + 1) * rows * cols].to_vec();
            let img = image::GrayImage::from_raw(cols as u32, rows as u32, body)
                .expect("the IDX body holds rows x cols bytes per image");
            let path = destination(out, split, &label.to_string(), name);
            write_png(&path, &image::DynamicImage::ImageLuma8(img))?;
            report.count(split);
        }
    }
    Ok(report)
}

/// What [`import_folders`] takes besides the folders.
#[derive(Clone, Debug)]
pub struct FolderImport {
    pub division: Division,
    /// Colour that transparent pixels are composited onto.
    pub background: [u8; 3],
    /// Images under a folder of one of these names (at any depth) are left out.
    pub exclude: Vec<String>,
    /// Classes with fewer images (after exclusions) are left out.
    pub min_per_class: usize,
}

/// Copies the images of the class folders of `src` (subfolders included) into
/// `out/<split>/<class>/<path with / as ->.png`, as opaque RGB: transparent pixels are
/// composited onto the background.
pub fn import_folders(src: &Path, out: &Path, job: &FolderImport) -> Result<ImportReport> {
    job.division.validate()?;
    let listing = crate::source::list_class_folders(src)?;
    let mut report = ImportReport::default();
    for (label, class) in listing.classes.iter().enumerate() {
        let rels: Vec<&String> = listing
            .files
            .iter()
            .filter(|f| f.label == Some(label as u32))
            .map(|f| &f.rel)
            .filter(|rel| {
                let folders = rel.split('/').collect::<Vec<_>>();
                !folders[..folders.len() - 1]
                    .iter()
                    .any(|d| job.exclude.iter().any(|x| x == d))
            })
            .collect();
        if rels.len() < job.min_per_class.max(1) {
            report.skipped_classes.push((class.clone(), rels.len()));
            continue;
        }
        report.classes += 1;
        let names: Vec<String> = rels
            .iter()
            .map(|rel| {
                let stem = rel.rsplit_once('.').map_or(rel.as_str(), |(s, _)| s);
                stem.split('/').skip(1).collect::<Vec<_>>().join("-")
            })
            .collect();
        for ((rel, name), split) in rels.iter().zip(&names).zip(job.division.assign(&names)) {
            let path = src.join(rel);
            let img = image::open(&path)
                .map_err(|e| Error::Decode(format!("{}: {e}", path.display())))?;
            let flat = flatten(&img.to_rgba8(), job.background);
            write_png(
                &destination(out, split, class, name),
                &image::DynamicImage::ImageRgb8(flat),
            )?;
            report.count(split);
        }
    }
    if report.classes == 0 {
        return Err(Error::Invalid(format!(
            "no class folder of {} has {} images or more",
            src.display(),
            job.min_per_class
        )));
    }
    Ok(report)
}

/// `img` composited onto an opaque `background`.
pub fn flatten(img: &image::RgbaImage, background: [u8; 3]) -> image::RgbImage {
    image::RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let [r, g, b, a] = img.get_pixel(x, y).0;
        let blend = |c: u8, bg: u8| {
            ((c as u32 * a as u32 + bg as u32 * (255 - a as u32) + 127) / 255) as u8
        };
        image::Rgb([
            blend(r, background[0]),
            blend(g, background[1]),
            blend(b, background[2]),
        ])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_stratified_fixed_and_independent_of_order() {
        let names: Vec<String> = (0..100).map(|i| format!("img{i}")).collect();
        let d = Division::Shares {
            val: 0.1,
            test: 0.2,
            seed: 3,
        };
        let a = d.assign(&names);
        let count = |s| a.iter().filter(|&&x| x == s).count();
        assert_eq!(
            (count(Split::Train), count(Split::Val), count(Split::Test)),
            (70, 10, 20)
        );
        let mut reversed = names.clone();
        reversed.reverse();
        let mut b = d.assign(&reversed);
        b.reverse();
        assert_eq!(a, b, "the split of a name does not depend on the order");
        let other_seed = Division::Shares {
            val: 0.1,
            test: 0.2,
            seed: 4,
        };
        assert_ne!(a, other_seed.assign(&names));
        assert!(Division::Shares {
            val: 0.5,
            test: 0.5,
            seed: 0
        }
        .validate()
        .is_err());
    }

    #[test]
    fn transparent_pixels_take_the_background() {
        let img = image::RgbaImage::from_fn(2, 1, |x, _| {
            image::Rgba(if x == 0 {
                [10, 20, 30, 255]
            } else {
                [10, 20, 30, 0]
            })
        });
        let flat = flatten(&img, [200, 100, 0]);
        assert_eq!(flat.get_pixel(0, 0).0, [10, 20, 30]);
        assert_eq!(flat.get_pixel(1, 0).0, [200, 100, 0]);
    }
}
