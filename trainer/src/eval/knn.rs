//! Weighted kNN on frozen features (the protocol of DINO and solo-learn), streamed: the training
//! features pass in blocks and each val row keeps a running top-k, so memory is
//! O(block + k x val) whatever the number of training images, and one pass serves every `k`.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::Serialize;

use super::features::{check_comparable, LabelledFeatures};
use crate::error::{Error, Result};

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

/// How the similarity matrix is cut: `train_block` training rows are on the device at a time,
/// against `val_tile` val rows (the similarities of one tile are `val_tile x train_block` floats).
#[derive(Clone, Copy, Debug)]
pub struct Tiling {
    pub train_block: usize,
    pub val_tile: usize,
}

impl Default for Tiling {
    /// 16,384 x 1,024: 64 MB of similarities per tile.
    fn default() -> Self {
        Tiling {
            train_block: 16_384,
            val_tile: 1_024,
        }
    }
}

/// One candidate neighbour; the heap's greatest is the worst kept neighbour (lowest similarity,
/// then the highest index), so ties go to the earlier training row whatever the tiling.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Candidate {
    sim: f32,
    index: u32,
}

impl Eq for Candidate {}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .sim
            .total_cmp(&self.sim)
            .then(self.index.cmp(&other.index))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The `k` most similar training rows of every val row, most similar first.
pub struct Neighbours {
    k: usize,
    /// `val x k` cosine similarities.
    pub sims: Vec<f32>,
    /// `val x k` training row indices.
    pub indices: Vec<u32>,
}

impl Neighbours {
    /// The neighbours of val row `i`: (similarity, training row), most similar first.
    pub fn of(&self, i: usize) -> impl Iterator<Item = (f32, u32)> + '_ {
        let r = i * self.k..(i + 1) * self.k;
        self.sims[r.clone()]
            .iter()
            .copied()
            .zip(self.indices[r].iter().copied())
    }
}

/// The `k` nearest training rows (cosine similarity) of every val row, computed on `device`
/// block by block; `progress` gets (training rows done, training rows) after each block.
pub fn neighbours(
    train: &LabelledFeatures,
    val: &LabelledFeatures,
    k: usize,
    device: &Device,
    tiling: Tiling,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Neighbours> {
    check_comparable(train, val)?;
    let k = k.min(train.len());
    if k == 0 {
        return Err(Error::Data(
            "kNN needs at least one training feature".into(),
        ));
    }
    let (m, dim) = (val.len(), val.dim());
    let mut heaps: Vec<BinaryHeap<Candidate>> =
        (0..m).map(|_| BinaryHeap::with_capacity(k + 1)).collect();
    let val_tile = tiling.val_tile.max(1);
    let val_tiles = (0..m)
        .step_by(val_tile)
        .map(|s| {
            let e = (s + val_tile).min(m);
            Tensor::from_vec(val.block(s..e), (e - s, dim), device)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let block = tiling.train_block.max(1);
    for start in (0..train.len()).step_by(block) {
        let end = (start + block).min(train.len());
        let t = Tensor::from_vec(train.block(start..end), (end - start, dim), device)?.t()?;
        for (tile, v) in val_tiles.iter().enumerate() {
            let sims = v.matmul(&t)?.flatten_all()?.to_vec1::<f32>()?;
            let first = tile * val_tile;
            heaps[first..first + v.dim(0)?]
                .par_iter_mut()
                .zip(sims.par_chunks(end - start))
                .for_each(|(heap, row)| keep_best(heap, row, start as u32, k));
        }
        progress(end, train.len());
    }
    let mut sims = Vec::with_capacity(m * k);
    let mut indices = Vec::with_capacity(m * k);
    for heap in heaps {
        for c in heap.into_sorted_vec() {
            sims.push(c.sim);
            indices.push(c.index);
        }
    }
    Ok(Neighbours { k, sims, indices })
}

/// Offers the similarities `row` of training rows `first..` to `heap`, which keeps the best `k`.
fn keep_best(heap: &mut BinaryHeap<Candidate>, row: &[f32], first: u32, k: usize) {
    for (j, &sim) in row.iter().enumerate() {
        let c = Candidate {
            sim,
            index: first + j as u32,
        };
        if heap.len() < k {
            heap.push(c);
        } else if c < *heap.peek().expect("k > 0") {
            // Strictly better than the worst kept: a later row with an equal similarity never
            // displaces an earlier one.
            *heap.peek_mut().expect("k > 0") = c;
        }
    }
}

/// Weighted votes of the first `k` neighbours, each `exp(cos / temperature)`: top-1 and top-5
/// accuracy against `val`'s labels (class ties go to the lower class index).
pub fn vote(
    neighbours: &Neighbours,
    train: &LabelledFeatures,
    val: &LabelledFeatures,
    k: usize,
    temperature: f64,
) -> Accuracy {
    let classes = train.classes.len().max(1);
    let scored: Vec<(bool, bool)> = (0..val.len())
        .into_par_iter()
        .map(|i| {
            let mut votes = vec![0f64; classes];
            for (sim, j) in neighbours.of(i).take(k) {
                votes[train.labels[j as usize] as usize] += (sim as f64 / temperature).exp();
            }
            let mut order: Vec<usize> = (0..classes).collect();
            order.sort_by(|&a, &b| votes[b].total_cmp(&votes[a]).then(a.cmp(&b)));
            let l = val.labels[i] as usize;
            (order[0] == l, order[..5.min(classes)].contains(&l))
        })
        .collect();
    accuracy(&scored)
}

/// Weighted kNN for each of `ks` from one neighbour search: each val feature votes with its `k`
/// most similar training features, weighted `exp(cos / temperature)`; `progress` as in
/// [`neighbours`].
pub fn knn(
    train: &LabelledFeatures,
    val: &LabelledFeatures,
    ks: &[usize],
    temperature: f64,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Accuracy>> {
    let most = ks.iter().copied().max().unwrap_or(0);
    let found = neighbours(train, val, most, device, Tiling::default(), progress)?;
    Ok(ks
        .iter()
        .map(|&k| vote(&found, train, val, k, temperature))
        .collect())
}

pub(super) fn accuracy(scored: &[(bool, bool)]) -> Accuracy {
    let n = scored.len().max(1) as f64;
    Accuracy {
        top1: 100.0 * scored.iter().filter(|s| s.0).count() as f64 / n,
        top5: 100.0 * scored.iter().filter(|s| s.1).count() as f64 / n,
    }
}
