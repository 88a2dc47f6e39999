//! `trainer bench knn`: the streamed kNN timed on random features of a given size, with the
//! process's peak memory beside the size the dense similarity matrix would have.

use std::time::Instant;

use candle_core::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::Result;
use crate::eval::features::{LabelledFeatures, Origin};
use crate::eval::knn;

/// The sizes to time.
#[derive(Clone, Debug, Serialize)]
pub struct KnnBenchSpec {
    pub train: usize,
    pub val: usize,
    pub dim: usize,
    pub classes: usize,
    pub ks: Vec<usize>,
}

/// What one timing found.
#[derive(Debug, Serialize)]
pub struct KnnBenchReport {
    #[serde(flatten)]
    pub spec: KnnBenchSpec,
    /// Wall time of the neighbour search and the votes for every k.
    pub seconds: f64,
    /// Peak resident memory of the whole process (random features included).
    pub peak_memory_bytes: Option<u64>,
    /// Memory the train and val features themselves take (f32).
    pub features_bytes: u64,
    /// Memory the dense `val x train` f32 similarity matrix would take.
    pub dense_matrix_bytes: u64,
}

/// `n` random unit rows of `dim` with random labels in `classes`, from `seed`.
fn random_set(n: usize, dim: usize, classes: usize, seed: u64) -> Result<LabelledFeatures> {
    const CHUNK: usize = 4096;
    let mut x = vec![0f32; n * dim];
    x.par_chunks_mut(CHUNK * dim.max(1))
        .enumerate()
        .for_each(|(c, rows)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((c as u64) << 20));
            for row in rows.chunks_mut(dim.max(1)) {
                row.iter_mut()
                    .for_each(|v| *v = rng.random_range(-1.0..1.0));
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                row.iter_mut().for_each(|v| *v /= norm);
            }
        });
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(1));
    let labels = (0..n)
        .map(|_| rng.random_range(0..classes.max(1) as u32))
        .collect();
    let classes = (0..classes.max(1)).map(|c| format!("c{c}")).collect();
    let origin = Origin {
        backbone: "random features".into(),
        fingerprint: 0,
        image_size: 0,
    };
    LabelledFeatures::from_vec(x, dim, labels, classes, origin)
}

/// Times the streamed kNN of `spec` on `device`.
pub fn run(spec: &KnnBenchSpec, device: &Device) -> Result<KnnBenchReport> {
    let train = random_set(spec.train, spec.dim, spec.classes, 1)?;
    let val = random_set(spec.val, spec.dim, spec.classes, 2)?;
    let started = Instant::now();
    knn::knn(
        &train,
        &val,
        &spec.ks,
        knn::TEMPERATURE,
        device,
        &mut |_, _| {},
    )?;
    Ok(KnnBenchReport {
        spec: spec.clone(),
        seconds: started.elapsed().as_secs_f64(),
        peak_memory_bytes: shared::process::peak_memory(),
        features_bytes: ((spec.train + spec.val) * spec.dim * 4) as u64,
        dense_matrix_bytes: (spec.train * spec.val * 4) as u64,
    })
}
