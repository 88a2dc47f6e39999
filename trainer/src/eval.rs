//! Evaluation on frozen backbones: feature extraction from packed shards (centre crop, resized to
//! the training size), weighted kNN (the protocol of DINO and solo-learn) and a linear probe.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Linear, Module, VarBuilder, VarMap};
use rayon::prelude::*;
use serde::Serialize;
use shared::dataset::Dataset;
use shared::resize::Filter;

use crate::data::normalise;
use crate::maskdeep::normalize;
use crate::optim::{Optimizer, Rule};
use crate::resnet::ResNet;
use crate::{params, schedule};

/// Frozen features of a labelled dataset.
pub struct Features {
    /// `[n, c]`, L2-normalised rows, on the CPU.
    pub x: Tensor,
    pub labels: Vec<u32>,
    pub classes: usize,
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
    let plane = (size * size) as usize;
    for (p, px) in hwc.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + p] = px[c];
        }
    }
    Ok(())
}

/// Runs `backbone` (BatchNorm in eval mode) over every image of `dataset` in batches and returns
/// L2-normalised global-average-pooled C5 features.
pub fn extract(
    backbone: &ResNet,
    dataset: &Dataset,
    size: u32,
    batch: usize,
    device: &Device,
) -> Result<Features> {
    let n = dataset.len();
    let labels: Vec<u32> = (0..n)
        .map(|i| Ok(dataset.meta(i)?.label))
        .collect::<Result<_>>()?;
    if labels.contains(&u32::MAX) {
        bail!(
            "{} is unlabelled: evaluation needs class labels",
            dataset.dir().display()
        );
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
        let x = normalise(&bytes, end - start, size as usize, device)?;
        let f = backbone.embed(&x, false)?.to_dtype(DType::F32)?;
        chunks.push(normalize(&f)?.detach().to_device(&Device::Cpu)?);
    }
    Ok(Features {
        x: Tensor::cat(&chunks, 0)?,
        labels,
        classes,
    })
}

/// Top-1 and top-5 accuracy in percent.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Accuracy {
    pub top1: f64,
    pub top5: f64,
}

/// Weighted kNN: each validation feature votes with its `k` most similar training features,
/// weighted `exp(cos / temperature)`.
pub fn knn(train: &Features, val: &Features, k: usize, temperature: f64) -> Result<Accuracy> {
    let k = k.min(train.labels.len());
    if k == 0 {
        bail!("kNN needs at least one training feature");
    }
    let sims = val.x.matmul(&train.x.t()?)?.to_vec2::<f32>()?;
    let classes = train.classes.max(val.classes);
    let scored: Vec<(bool, bool)> = sims
        .par_iter()
        .zip(&val.labels)
        .map(|(row, &label)| {
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]));
            let mut votes = vec![0f64; classes];
            for &j in &idx[..k] {
                votes[train.labels[j] as usize] += ((row[j] as f64) / temperature).exp();
            }
            let mut order: Vec<usize> = (0..classes).collect();
            order.sort_by(|&a, &b| votes[b].total_cmp(&votes[a]).then(a.cmp(&b)));
            let l = label as usize;
            (order[0] == l, order[..5.min(classes)].contains(&l))
        })
        .collect();
    Ok(accuracy(&scored))
}

fn accuracy(scored: &[(bool, bool)]) -> Accuracy {
    let n = scored.len().max(1) as f64;
    Accuracy {
        top1: 100.0 * scored.iter().filter(|s| s.0).count() as f64 / n,
        top5: 100.0 * scored.iter().filter(|s| s.1).count() as f64 / n,
    }
}

/// A linear classifier (no BatchNorm) trained on frozen `train` features with SGD (momentum 0.9,
/// batches of 256, cosine learning rate from `lr`, no weight decay) for `epochs`, scored on `val`.
pub fn linear_probe(
    train: &Features,
    val: &Features,
    epochs: usize,
    lr: f64,
    seed: u64,
) -> Result<Accuracy> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let dev = Device::Cpu;
    let classes = train.classes.max(val.classes);
    let dim = train.x.dim(1)?;
    let vars = VarMap::new();
    let layer: Linear = candle_nn::linear(
        dim,
        classes,
        VarBuilder::from_varmap(&vars, DType::F32, &dev),
    )?;
    params::init(&vars, seed)?;
    let mut opt = Optimizer::new(Rule::Sgd, params::trainable(&vars), 0.9, 0.0)?;
    let n = train.labels.len();
    let batch = 256.min(n);
    let steps_per_epoch = n.div_ceil(batch);
    let total = (epochs * steps_per_epoch) as u64;
    let labels = Tensor::new(train.labels.as_slice(), &dev)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut step = 0u64;
    for _ in 0..epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(batch) {
            let idx = Tensor::new(chunk, &dev)?;
            let x = train.x.index_select(&idx, 0)?;
            let y = labels.index_select(&idx, 0)?;
            let loss = candle_nn::loss::cross_entropy(&layer.forward(&x)?, &y)?;
            let rate = schedule::learning_rate(lr, 0.0, step, 0, total);
            opt.step(&loss.backward()?, rate)?;
            step += 1;
        }
    }
    let logits = layer.forward(&val.x)?;
    let top = logits
        .arg_sort_last_dim(false)?
        .narrow(D::Minus1, 0, 5.min(classes))?
        .to_vec2::<u32>()
        .context("probe predictions")?;
    let scored: Vec<(bool, bool)> = top
        .iter()
        .zip(&val.labels)
        .map(|(t, &l)| (t[0] == l, t.contains(&l)))
        .collect();
    Ok(accuracy(&scored))
}
