//! Features of frozen backbones from packed shards: the centre square of each image, resized to
//! the training size, through the backbone in eval mode, globally pooled and L2-normalised.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use shared::dataset::Dataset;
use shared::resize::Filter;

use crate::method::maskdeep::l2_normalize_rows;
use crate::nn::resnet::ResNet;
use crate::train::data::imagenet_normalised;

/// Frozen features of a labelled dataset.
pub struct LabelledFeatures {
    /// `[n, c]`, L2-normalised rows, on the CPU.
    pub x: Tensor,
    pub labels: Vec<u32>,
    pub classes: usize,
}

/// Checks, before any work, that `train` and `val` can be scored against each other: both fully
/// labelled and with the same class names in the same order (labels are matched by index).
pub fn check_eval_sets(train: &Dataset, val: &Dataset) -> Result<()> {
    for set in [train, val] {
        let m = set.manifest();
        if m.unlabelled > 0 || m.classes.is_empty() {
            return Err(Error::Data(format!(
                "{} has {} unlabelled images: evaluation needs class labels",
                set.dir().display(),
                m.unlabelled
            )));
        }
    }
    let (a, b) = (&train.manifest().classes, &val.manifest().classes);
    if a != b {
        let at = a.iter().zip(b).position(|(x, y)| x != y);
        let what = match at {
            Some(i) => format!("class {i} is `{}` in one and `{}` in the other", a[i], b[i]),
            None => format!("{} classes against {}", a.len(), b.len()),
        };
        return Err(Error::Data(format!(
            "{} and {} were packed with different class lists ({what}): pack the val split with \
             `--classes-from {}`",
            train.dir().display(),
            val.dir().display(),
            train.dir().display()
        )));
    }
    Ok(())
}

/// Per-thread scratch of [`centre_view`]: the resizer and its HWC output.
type Scratch = (fast_image_resize::Resizer, Vec<u8>);

/// The centre square of image `i`, resized to `size` x `size`, as u8 CHW.
fn centre_view(
    dataset: &Dataset,
    i: usize,
    size: u32,
    (resizer, hwc): &mut Scratch,
    out: &mut [u8],
) -> Result<()> {
    let img = dataset.image(i)?;
    let side = img.width.min(img.height);
    let crop = shared::augment::CropBox {
        top: (img.height - side) / 2,
        left: (img.width - side) / 2,
        height: side,
        width: side,
    };
    shared::augment::crop_resize(resizer, img.as_ref(), crop, size, Filter::Bilinear, hwc)?;
    shared::views::hwc_to_chw(hwc, out);
    Ok(())
}

/// Runs `backbone` (BatchNorm in eval mode) over every image of `dataset` in batches and returns
/// L2-normalised global-average-pooled C5 features; `progress` gets (images done, images) after
/// each batch.
pub fn extract(
    backbone: &ResNet,
    dataset: &Dataset,
    size: u32,
    batch: usize,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LabelledFeatures> {
    let n = dataset.len();
    let labels: Vec<u32> = (0..n)
        .map(|i| Ok(dataset.meta(i)?.label))
        .collect::<Result<_>>()?;
    if labels.contains(&u32::MAX) {
        return Err(Error::Data(format!(
            "{} is unlabelled: evaluation needs class labels",
            dataset.dir().display()
        )));
    }
    let classes = dataset.manifest().classes.len().max(1);
    let per = 3 * (size * size) as usize;
    let mut chunks = Vec::new();
    for start in (0..n).step_by(batch) {
        let end = (start + batch).min(n);
        let mut bytes = vec![0u8; (end - start) * per];
        bytes.par_chunks_mut(per).enumerate().try_for_each_init(
            || (fast_image_resize::Resizer::new(), Vec::new()),
            |scratch, (j, out)| centre_view(dataset, start + j, size, scratch, out),
        )?;
        let x = imagenet_normalised(&bytes, end - start, size as usize, device)?;
        let f = backbone.embed(&x, false)?.to_dtype(DType::F32)?;
        chunks.push(l2_normalize_rows(&f)?.detach().to_device(&Device::Cpu)?);
        progress(end, n);
    }
    Ok(LabelledFeatures {
        x: Tensor::cat(&chunks, 0)?,
        labels,
        classes,
    })
}
