//! Features of frozen backbones from packed shards: the centre square of each image, resized to
//! the training size, through the backbone in eval mode, globally pooled and L2-normalised.
//!
//! [`LabelledFeatures`] holds them in memory or maps them from a feature file ([`super::cache`]);
//! kNN and the linear probe read both the same way, a block of rows at a time.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use shared::dataset::Dataset;
use shared::resize::Filter;

use super::cache::MappedRows;
use crate::method::maskdeep::{l2_normalize_rows, MaskDeep};
use crate::nn::params;
use crate::nn::resnet::ResNet;
use crate::train::data::imagenet_normalised;

/// Which backbone made a set of features and how: features of different origins are never
/// compared with each other.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Origin {
    /// The backbone as reports name it, e.g. `maskdeep-r18-small step 240 (resnet18, ...)`.
    pub backbone: String,
    /// CRC-32 of the backbone's parameters and BatchNorm statistics, in name order.
    pub fingerprint: u32,
    /// Side of the square the images were resized to.
    pub image_size: u32,
}

impl Origin {
    /// The origin of features that `model`'s online backbone makes, described as `backbone`.
    pub fn of(model: &MaskDeep, backbone: String) -> Result<Self> {
        let mut hash = crc32fast::Hasher::new();
        for (name, var) in params::sorted(&model.online_vars) {
            if name.starts_with("backbone.") {
                hash.update(name.as_bytes());
                let values = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                for v in values {
                    hash.update(&v.to_le_bytes());
                }
            }
        }
        Ok(Origin {
            backbone,
            fingerprint: hash.finalize(),
            image_size: model.config().data.image_size,
        })
    }
}

/// The preprocessing every feature here went through, as feature files record it.
pub const PREPROCESSING: &str =
    "centre square of the stored image, bilinear resize to image_size, \
     ImageNet mean/std, backbone in eval mode, global average pool of C5, L2-normalised";

/// Where the rows of a [`LabelledFeatures`] live.
enum Rows {
    Memory(Vec<f32>),
    Mapped(MappedRows),
}

/// Frozen, L2-normalised features of a labelled dataset, with the class names and the origin.
pub struct LabelledFeatures {
    rows: Rows,
    dim: usize,
    /// One class index per row.
    pub labels: Vec<u32>,
    /// Class names, in index order.
    pub classes: Vec<String>,
    /// The backbone that made them.
    pub origin: Origin,
}

impl LabelledFeatures {
    /// Features held in memory: `x` is `labels.len() x dim`, row-major.
    pub fn from_vec(
        x: Vec<f32>,
        dim: usize,
        labels: Vec<u32>,
        classes: Vec<String>,
        origin: Origin,
    ) -> Result<Self> {
        if x.len() != labels.len() * dim {
            return Err(Error::Data(format!(
                "{} feature values are not {} rows of {dim}",
                x.len(),
                labels.len()
            )));
        }
        Self::checked(Rows::Memory(x), dim, labels, classes, origin)
    }

    /// Features mapped from a feature file.
    pub(super) fn mapped(
        rows: MappedRows,
        labels: Vec<u32>,
        classes: Vec<String>,
        origin: Origin,
    ) -> Result<Self> {
        let dim = rows.dim();
        Self::checked(Rows::Mapped(rows), dim, labels, classes, origin)
    }

    fn checked(
        rows: Rows,
        dim: usize,
        labels: Vec<u32>,
        classes: Vec<String>,
        origin: Origin,
    ) -> Result<Self> {
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= classes.len()) {
            return Err(Error::Data(format!(
                "label {bad} is out of range for {} classes",
                classes.len()
            )));
        }
        Ok(LabelledFeatures {
            rows,
            dim,
            labels,
            classes,
            origin,
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Width of a row.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rows `range`, row-major, as f32.
    pub fn block(&self, range: std::ops::Range<usize>) -> Vec<f32> {
        match &self.rows {
            Rows::Memory(x) => x[range.start * self.dim..range.end * self.dim].to_vec(),
            Rows::Mapped(m) => {
                let mut out = Vec::with_capacity(range.len() * self.dim);
                m.append(range, &mut out);
                out
            }
        }
    }

    /// The rows at `indices`, row-major, as f32.
    pub fn gather(&self, indices: &[u32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(indices.len() * self.dim);
        for &i in indices {
            let i = i as usize;
            match &self.rows {
                Rows::Memory(x) => out.extend_from_slice(&x[i * self.dim..(i + 1) * self.dim]),
                Rows::Mapped(m) => m.append(i..i + 1, &mut out),
            }
        }
        out
    }
}

/// Checks, before any work, that `train` and `val` can be scored against each other: both fully
/// labelled and with the same class names in the same order (labels are matched by index).
pub fn check_eval_sets(train: &Dataset, val: &Dataset) -> Result<()> {
    for set in [train, val] {
        labelled_classes(set)?;
    }
    same_classes(
        &train.manifest().classes,
        &val.manifest().classes,
        &train.dir().display().to_string(),
        &val.dir().display().to_string(),
    )
}

/// The class names of a fully labelled dataset.
pub fn labelled_classes(set: &Dataset) -> Result<Vec<String>> {
    let m = set.manifest();
    if m.unlabelled > 0 || m.classes.is_empty() {
        return Err(Error::Data(format!(
            "{} has {} unlabelled images: evaluation needs class labels",
            set.dir().display(),
            m.unlabelled
        )));
    }
    Ok(m.classes.clone())
}

/// Checks that two class lists (of the sets named `a_name` and `b_name`) are the same.
pub fn same_classes(a: &[String], b: &[String], a_name: &str, b_name: &str) -> Result<()> {
    if a == b {
        return Ok(());
    }
    let at = a.iter().zip(b).position(|(x, y)| x != y);
    let what = match at {
        Some(i) => format!("class {i} is `{}` in one and `{}` in the other", a[i], b[i]),
        None => format!("{} classes against {}", a.len(), b.len()),
    };
    Err(Error::Data(format!(
        "{a_name} and {b_name} were packed with different class lists ({what}): pack the val \
         split with `--classes-from` the train split"
    )))
}

/// Checks that two sets of features can be scored against each other: same classes, same
/// backbone, same preprocessing.
pub fn check_comparable(train: &LabelledFeatures, val: &LabelledFeatures) -> Result<()> {
    same_classes(&train.classes, &val.classes, "the train set", "the val set")?;
    if train.origin != val.origin {
        return Err(Error::Data(format!(
            "the train and val features come from different backbones or image sizes: {} \
             (fingerprint {:08x}, {} px) against {} (fingerprint {:08x}, {} px); extract both \
             with the same checkpoint",
            train.origin.backbone,
            train.origin.fingerprint,
            train.origin.image_size,
            val.origin.backbone,
            val.origin.fingerprint,
            val.origin.image_size
        )));
    }
    if train.dim != val.dim {
        return Err(Error::Data(format!(
            "train features have {} dimensions and val features {}",
            train.dim, val.dim
        )));
    }
    Ok(())
}

/// Per-thread scratch of [`centre_view`]: the resizer and its HWC output.
type Scratch = (fast_image_resize::Resizer, Vec<u8>);

/// The centre square of image `i` whose side is `crop` of the image's shorter side, resized to
/// `size` x `size`, as u8 CHW.
fn centre_view(
    dataset: &Dataset,
    i: usize,
    (size, crop): (u32, f32),
    (resizer, hwc): &mut Scratch,
    out: &mut [u8],
) -> Result<()> {
    let img = dataset.image(i)?;
    let shorter = img.width.min(img.height);
    let side = ((shorter as f32 * crop).round() as u32).clamp(1, shorter);
    let crop = shared::augment::CropBox {
        top: (img.height - side) / 2,
        left: (img.width - side) / 2,
        height: side,
        width: side,
    };
    shared::augment::crop_resize(resizer, img.as_ref(), crop, size, Filter::Bilinear, hwc)?;
    shared::views::hwc_to_chw(shared::cpu::Isa::active(), hwc, out);
    Ok(())
}

/// The labels of images `indices` of `dataset` (an error if any is unlabelled).
pub fn labels_of(dataset: &Dataset, indices: &[usize]) -> Result<Vec<u32>> {
    let labels: Vec<u32> = indices
        .iter()
        .map(|&i| Ok(dataset.meta(i)?.label))
        .collect::<Result<_>>()?;
    if labels.contains(&u32::MAX) {
        return Err(Error::Data(format!(
            "{} is unlabelled: evaluation needs class labels",
            dataset.dir().display()
        )));
    }
    Ok(labels)
}

/// Runs `backbone` (BatchNorm in eval mode) over images `indices` of `dataset`, `batch` at a time:
/// each image's centre square of `crop` of its shorter side, resized to `size`. Hands each
/// batch's global-average-pooled C5 features (f32 `[n, dim]` on `device`, no gradient) and the
/// images' positions in `indices` to `sink`; `progress` gets (images done, images) after each
/// batch.
#[allow(clippy::too_many_arguments)]
pub fn embed_centre_crops(
    backbone: &ResNet,
    dataset: &Dataset,
    indices: &[usize],
    (size, crop): (u32, f32),
    batch: usize,
    device: &Device,
    sink: &mut dyn FnMut(std::ops::Range<usize>, Tensor) -> Result<()>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    let per = 3 * (size * size) as usize;
    let batch = batch.max(1);
    let mut done = 0;
    for chunk in indices.chunks(batch) {
        let mut bytes = vec![0u8; chunk.len() * per];
        bytes.par_chunks_mut(per).zip(chunk).try_for_each_init(
            || (fast_image_resize::Resizer::new(), Vec::new()),
            |scratch, (out, &i)| centre_view(dataset, i, (size, crop), scratch, out),
        )?;
        let x = imagenet_normalised(&bytes, chunk.len(), size as usize, device)?;
        let f = backbone.embed(&x, false)?.to_dtype(DType::F32)?.detach();
        sink(done..done + chunk.len(), f)?;
        done += chunk.len();
        progress(done, indices.len());
    }
    Ok(())
}

/// [`embed_centre_crops`] of the whole centre square, L2-normalised, as row-major f32 on the
/// host: the features of [`PREPROCESSING`].
#[allow(clippy::too_many_arguments)]
pub fn extract_into(
    backbone: &ResNet,
    dataset: &Dataset,
    indices: &[usize],
    size: u32,
    batch: usize,
    device: &Device,
    sink: &mut dyn FnMut(&[f32]) -> Result<()>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    embed_centre_crops(
        backbone,
        dataset,
        indices,
        (size, 1.0),
        batch,
        device,
        &mut |_, f| sink(&l2_normalize_rows(&f)?.flatten_all()?.to_vec1::<f32>()?),
        progress,
    )
}

/// The features of images `indices` of `dataset` (all of them when `None`) under `model`'s online
/// backbone, in memory.
pub fn extract(
    model: &MaskDeep,
    origin: &Origin,
    dataset: &Dataset,
    indices: Option<&[usize]>,
    batch: usize,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LabelledFeatures> {
    let all: Vec<usize>;
    let indices = match indices {
        Some(i) => i,
        None => {
            all = (0..dataset.len()).collect();
            &all
        }
    };
    let classes = labelled_classes(dataset)?;
    let labels = labels_of(dataset, indices)?;
    let backbone = &model.online.backbone;
    let mut x = Vec::new();
    extract_into(
        backbone,
        dataset,
        indices,
        origin.image_size,
        batch,
        device,
        &mut |rows| {
            x.extend_from_slice(rows);
            Ok(())
        },
        progress,
    )?;
    let dim = x.len() / labels.len().max(1);
    LabelledFeatures::from_vec(x, dim, labels, classes, origin.clone())
}

/// A fixed random choice of at most `per_class` images of each class of `dataset` (all images
/// when `per_class` is 0), drawn from `seed`, in dataset order.
pub fn per_class_subset(dataset: &Dataset, per_class: usize, seed: u64) -> Result<Vec<usize>> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let all: Vec<usize> = (0..dataset.len()).collect();
    if per_class == 0 {
        return Ok(all);
    }
    let labels = labels_of(dataset, &all)?;
    let mut order = all;
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let mut taken = vec![0usize; labels.iter().max().map_or(0, |&l| l as usize + 1)];
    let mut chosen: Vec<usize> = order
        .into_iter()
        .filter(|&i| {
            let t = &mut taken[labels[i] as usize];
            *t += 1;
            *t <= per_class
        })
        .collect();
    chosen.sort_unstable();
    Ok(chosen)
}
