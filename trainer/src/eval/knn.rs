//! Weighted kNN on frozen features (the protocol of DINO and solo-learn).

use crate::error::{Error, Result};
use rayon::prelude::*;
use serde::Serialize;

use super::features::LabelledFeatures;

/// The neighbour counts reported by default; the first is the one monitored during training
/// (DINO's and solo-learn's settings).
pub const DEFAULT_K: [usize; 2] = [20, 200];
/// The temperature of the neighbours' weights `exp(cos / T)`.
pub const TEMPERATURE: f64 = 0.07;

/// Top-1 and top-5 accuracy in percent.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Accuracy {
    pub top1: f64,
    pub top5: f64,
}

/// Weighted kNN: each validation feature votes with its `k` most similar training features,
/// weighted `exp(cos / temperature)`.
pub fn knn(
    train: &LabelledFeatures,
    val: &LabelledFeatures,
    k: usize,
    temperature: f64,
) -> Result<Accuracy> {
    let k = k.min(train.labels.len());
    if k == 0 {
        return Err(Error::Data(
            "kNN needs at least one training feature".into(),
        ));
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

pub(super) fn accuracy(scored: &[(bool, bool)]) -> Accuracy {
    let n = scored.len().max(1) as f64;
    Accuracy {
        top1: 100.0 * scored.iter().filter(|s| s.0).count() as f64 / n,
        top5: 100.0 * scored.iter().filter(|s| s.1).count() as f64 / n,
    }
}
