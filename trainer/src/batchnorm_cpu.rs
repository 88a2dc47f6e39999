//! Train-mode BatchNorm on the CPU as two fused kernels (forward: statistics + normalisation,
//! optionally followed by ReLU; backward: the three gradients, through the ReLU's mask), instead of
//! a dozen elementwise passes each way. The kernels take and give tensors of the input's own shape
//! and hand their per-channel results (batch statistics, parameter gradients) over a side channel,
//! so that the autograd graph holds one node per BatchNorm: every extra view node (reshape,
//! narrow) would cost a zero-fill and an add over the whole activation in Candle's backward.

use crate::cpu_storage::f32_slice;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

const EPS: f64 = 1e-5;

/// Per-channel values a kernel computes besides its output.
type Side = Arc<Mutex<Vec<f32>>>;

/// `(n, c, l)` of a `[n, c, ...]` layout.
fn ncl(layout: &Layout) -> Result<(usize, usize, usize)> {
    let dims = layout.shape().dims();
    if dims.len() < 2 || dims[0] * dims[1] == 0 {
        candle_core::bail!("batch norm: needs a non-empty [n, c, ...] input, got {dims:?}");
    }
    Ok((
        dims[0],
        dims[1],
        layout.shape().elem_count() / (dims[0] * dims[1]),
    ))
}

/// Per-channel mean and biased variance of `x` laid out `[n, c, l]`.
fn channel_stats(x: &[f32], n: usize, c: usize, l: usize) -> Vec<(f64, f64)> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let blocks = (0..n).map(|b| &x[(b * c + ch) * l..][..l]);
            let count = (n * l) as f64;
            let mean = blocks.clone().flatten().map(|&v| v as f64).sum::<f64>() / count;
            let var = blocks
                .flatten()
                .map(|&v| (v as f64 - mean).powi(2))
                .sum::<f64>()
                / count;
            (mean, var)
        })
        .collect()
}

/// The per-channel affine map `x * scale + shift` that normalises with `mean` and `var`; forward and
/// backward both compute it here, so that the backward's ReLU mask is bit-identical to the forward's.
fn affine(weight: f32, bias: f32, mean: f32, var: f32) -> (f32, f32) {
    let scale = weight as f64 / (var as f64 + EPS).sqrt();
    let shift = bias as f64 - mean as f64 * scale;
    (scale as f32, shift as f32)
}

/// `(x [n, c, ...], weight [c], bias [c])` -> the normalised `x` (through a ReLU when `relu`); the
/// batch mean and biased variance of each channel go to `side` (mean then variance).
struct Forward {
    relu: bool,
    side: Side,
}

impl CustomOp3 for Forward {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, l) = ncl(xl)?;
        let x = f32_slice(xs, xl, self.name())?;
        let w = f32_slice(ws, wl, self.name())?;
        let b = f32_slice(bs, bl, self.name())?;
        let stats: Vec<(f32, f32)> = channel_stats(x, n, c, l)
            .into_iter()
            .map(|(mean, var)| (mean as f32, var as f32))
            .collect();
        let mut y = vec![0f32; n * c * l];
        y.par_chunks_mut(l).enumerate().for_each(|(i, dst)| {
            let ch = i % c;
            let (mean, var) = stats[ch];
            let (scale, shift) = affine(w[ch], b[ch], mean, var);
            let src = &x[i * l..(i + 1) * l];
            if self.relu {
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = (v * scale + shift).max(0.0);
                }
            } else {
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = v * scale + shift;
                }
            }
        });
        let (means, vars): (Vec<f32>, Vec<f32>) = stats.into_iter().unzip();
        *lock(&self.side) = [means, vars].concat();
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let params = [w.to_vec1::<f32>()?, b.to_vec1()?, lock(&self.side).clone()].concat();
        let side = Side::default();
        let back = Backward {
            relu: self.relu,
            params,
            side: side.clone(),
        };
        let dx = x.apply_op2_no_bwd(&grad.contiguous()?, &back)?;
        let sums = lock(&side).clone();
        let c = w.elem_count();
        let (dw, db) = sums.split_at(c);
        let dw = Tensor::from_slice(dw, c, w.device())?;
        let db = Tensor::from_slice(db, c, b.device())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The side channel's contents; a poisoned lock still holds plain numbers.
fn lock(side: &Side) -> std::sync::MutexGuard<'_, Vec<f32>> {
    side.lock().unwrap_or_else(|e| e.into_inner())
}

/// `(x [n, c, ...], dy [n, c, ...])` -> `dx`, with `params` = `[weight, bias, mean, var]` (4c);
/// the weight and bias gradients go to `side`. With `relu`, `dy` is first masked where the
/// forward's output was clipped to zero.
struct Backward {
    relu: bool,
    params: Vec<f32>,
    side: Side,
}

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "batch-norm-train-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, l) = ncl(xl)?;
        let x = f32_slice(xs, xl, self.name())?;
        let dy = f32_slice(gs, gl, self.name())?;
        let p = &self.params;
        if p.len() != 4 * c || dy.len() != x.len() {
            candle_core::bail!(
                "{}: parameters or gradient do not fit the input",
                self.name()
            );
        }
        let (w, bias) = (&p[..c], &p[c..2 * c]);
        let (mean, var) = (&p[2 * c..3 * c], &p[3 * c..]);
        // The gradient that reaches the normalisation: dy, or dy where the ReLU passed.
        let masked = |ch: usize| {
            let (scale, shift) = affine(w[ch], bias[ch], mean[ch], var[ch]);
            let relu = self.relu;
            move |g: f32, v: f32| {
                if relu && v * scale + shift <= 0.0 {
                    0.0
                } else {
                    g
                }
            }
        };
        // Per channel: sum(dy) and sum(dy * x_hat).
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let inv = 1.0 / (var[ch] as f64 + EPS).sqrt();
                let mask = masked(ch);
                let (mut s, mut sx) = (0f64, 0f64);
                for b in 0..n {
                    let at = (b * c + ch) * l;
                    for (&g, &v) in dy[at..at + l].iter().zip(&x[at..at + l]) {
                        let g = mask(g, v) as f64;
                        s += g;
                        sx += g * (v as f64 - mean[ch] as f64) * inv;
                    }
                }
                (s, sx)
            })
            .collect();
        let count = (n * l) as f64;
        let mut dx = vec![0f32; n * c * l];
        dx.par_chunks_mut(l).enumerate().for_each(|(i, dst)| {
            let ch = i % c;
            let inv = 1.0 / (var[ch] as f64 + EPS).sqrt();
            let (s, sx) = sums[ch];
            // dx = w * inv / M * (M * dy - sum(dy) - x_hat * sum(dy * x_hat))
            let k = (w[ch] as f64 * inv / count) as f32;
            let (mean_dy, mean_dyx) = ((s / count) as f32, (sx / count) as f32);
            let (m, inv) = (mean[ch], inv as f32);
            let mask = masked(ch);
            let at = i * l;
            for ((d, &g), &v) in dst.iter_mut().zip(&dy[at..at + l]).zip(&x[at..at + l]) {
                let g = mask(g, v);
                let xh = (v - m) * inv;
                *d = k * count as f32 * (g - mean_dy - xh * mean_dyx);
            }
        });
        let (dbias, dweight): (Vec<f32>, Vec<f32>) =
            sums.iter().map(|&(s, sx)| (s as f32, sx as f32)).unzip();
        *lock(&self.side) = [dweight, dbias].concat();
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// Train-mode BatchNorm of contiguous f32 `x [n, c, ...]` on the CPU, followed by a ReLU when
/// `relu`: the output (shaped like `x`) and the batch mean and biased variance `[c]` each
/// (detached).
pub fn forward_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let side = Side::default();
    let op = Forward {
        relu,
        side: side.clone(),
    };
    let y = x.contiguous()?.apply_op3(weight, bias, op)?;
    let stats = lock(&side).clone();
    let c = weight.elem_count();
    let mean = Tensor::from_slice(&stats[..c], c, x.device())?;
    let var = Tensor::from_slice(&stats[c..], c, x.device())?;
    Ok((y, mean, var))
}
