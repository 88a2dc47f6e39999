//! Train-mode BatchNorm on the CPU as two fused kernels (forward: statistics + normalisation,
//! optionally followed by a residual add and a ReLU; backward: all the gradients, through the
//! ReLU's mask), instead of a dozen elementwise passes each way. The kernels take and give tensors
//! of the input's own shape and hand their per-channel results (batch statistics, parameter
//! gradients) over a side channel, so that the autograd graph holds one node per BatchNorm: every
//! extra view node (reshape, narrow) would cost a zero-fill and an add over the whole activation
//! in Candle's backward.

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

/// The per-channel affine map `x * scale + shift` that normalises with `mean` and `var`.
fn affine(weight: f32, bias: f32, mean: f32, var: f32) -> (f32, f32) {
    let scale = weight as f64 / (var as f64 + EPS).sqrt();
    let shift = bias as f64 - mean as f64 * scale;
    (scale as f32, shift as f32)
}

/// `(x [n, c, ...], weight_bias [2c])` or `(x, weight_bias, residual)` -> the normalised `x`,
/// plus `residual`, through a ReLU when `relu`; the batch mean and biased variance of each channel
/// go to `side` (mean then variance).
struct Forward {
    relu: bool,
    side: Side,
}

impl Forward {
    fn run(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        (ps, pl): (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let name = "batch-norm-train";
        let (n, c, l) = ncl(xl)?;
        let x = f32_slice(xs, xl, name)?;
        let p = f32_slice(ps, pl, name)?;
        let residual = match residual {
            Some((rs, rl)) if rl.shape() == xl.shape() => Some(f32_slice(rs, rl, name)?),
            Some(_) => candle_core::bail!("{name}: the residual's shape differs from the input's"),
            None => None,
        };
        if p.len() != 2 * c {
            candle_core::bail!("{name}: {} parameters for {c} channels", p.len());
        }
        let (w, b) = p.split_at(c);
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
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = v * scale + shift;
            }
            if let Some(r) = residual {
                for (d, &r) in dst.iter_mut().zip(&r[i * l..(i + 1) * l]) {
                    *d += r;
                }
            }
            if self.relu {
                for d in dst.iter_mut() {
                    *d = d.max(0.0);
                }
            }
        });
        let (means, vars): (Vec<f32>, Vec<f32>) = stats.into_iter().unzip();
        *lock(&self.side) = [means, vars].concat();
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    /// The gradients of `x`, of `weight_bias` and (when `residual`) of the residual.
    fn grads(
        &self,
        x: &Tensor,
        params: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        residual: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let c = params.elem_count() / 2;
        let params = [params.to_vec1::<f32>()?, lock(&self.side).clone()].concat();
        let side = Side::default();
        let back = Backward {
            relu: self.relu,
            residual,
            params,
            side: side.clone(),
        };
        let out = x.apply_op3_no_bwd(&dy.contiguous()?, y, &back)?;
        let len = x.elem_count();
        let dx = out.narrow(0, 0, len)?.reshape(x.shape())?;
        let dres = if residual {
            Some(out.narrow(0, len, len)?.reshape(x.shape())?)
        } else {
            None
        };
        let sums = lock(&side).clone();
        Ok((dx, Tensor::from_slice(&sums, 2 * c, x.device())?, dres))
    }
}

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((xs, xl), (ps, pl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dp, _) = self.grads(x, params, res, grad, false)?;
        Ok((Some(dx), Some(dp)))
    }
}

impl CustomOp3 for Forward {
    fn name(&self) -> &'static str {
        "batch-norm-train-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((xs, xl), (ps, pl), Some((rs, rl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _residual: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dp, dres) = self.grads(x, params, res, grad, true)?;
        Ok((Some(dx), Some(dp), dres))
    }
}

/// The side channel's contents; a poisoned lock still holds plain numbers.
fn lock(side: &Side) -> std::sync::MutexGuard<'_, Vec<f32>> {
    side.lock().unwrap_or_else(|e| e.into_inner())
}

/// `(x [n, c, ...], dy, y)` -> `dx`, followed by the residual's gradient when `residual`, with
/// `params` = `[weight, bias, mean, var]` (4c); the weight and bias gradients go to `side`. With
/// `relu`, `dy` is first masked where the output `y` was clipped to zero.
struct Backward {
    relu: bool,
    residual: bool,
    params: Vec<f32>,
    side: Side,
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "batch-norm-train-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, l) = ncl(xl)?;
        let x = f32_slice(xs, xl, self.name())?;
        let dy = f32_slice(gs, gl, self.name())?;
        let y = f32_slice(ys, yl, self.name())?;
        let p = &self.params;
        if p.len() != 4 * c || dy.len() != x.len() || y.len() != x.len() {
            candle_core::bail!(
                "{}: parameters or gradient do not fit the input",
                self.name()
            );
        }
        let (w, mean, var) = (&p[..c], &p[2 * c..3 * c], &p[3 * c..]);
        // The gradient that reaches the normalisation (and the residual): dy, or dy where the
        // ReLU passed.
        let relu = self.relu;
        let mask = move |g: f32, y: f32| if relu && y <= 0.0 { 0.0 } else { g };
        // Per channel: sum(dy) and sum(dy * x_hat).
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let inv = 1.0 / (var[ch] as f64 + EPS).sqrt();
                let (mut s, mut sx) = (0f64, 0f64);
                for b in 0..n {
                    let at = (b * c + ch) * l;
                    let planes = dy[at..at + l].iter().zip(&y[at..at + l]);
                    for ((&g, &out), &v) in planes.zip(&x[at..at + l]) {
                        let g = mask(g, out) as f64;
                        s += g;
                        sx += g * (v as f64 - mean[ch] as f64) * inv;
                    }
                }
                (s, sx)
            })
            .collect();
        let count = (n * l) as f64;
        let len = n * c * l;
        let mut out = vec![0f32; if self.residual { 2 * len } else { len }];
        let (dx, dres) = out.split_at_mut(len);
        let dres: Vec<Option<&mut [f32]>> = if self.residual {
            dres.chunks_mut(l).map(Some).collect()
        } else {
            (0..n * c).map(|_| None).collect()
        };
        dx.par_chunks_mut(l)
            .zip(dres)
            .enumerate()
            .for_each(|(i, (dst, dres))| {
                let ch = i % c;
                let inv = 1.0 / (var[ch] as f64 + EPS).sqrt();
                let (s, sx) = sums[ch];
                // dx = w * inv / M * (M * dy - sum(dy) - x_hat * sum(dy * x_hat))
                let k = (w[ch] as f64 * inv / count) as f32;
                let (mean_dy, mean_dyx) = ((s / count) as f32, (sx / count) as f32);
                let (m, inv) = (mean[ch], inv as f32);
                let at = i * l;
                let planes = dy[at..at + l].iter().zip(&y[at..at + l]);
                for ((d, (&g, &out)), &v) in dst.iter_mut().zip(planes).zip(&x[at..at + l]) {
                    let g = mask(g, out);
                    let xh = (v - m) * inv;
                    *d = k * count as f32 * (g - mean_dy - xh * mean_dyx);
                }
                if let Some(dres) = dres {
                    let planes = dy[at..at + l].iter().zip(&y[at..at + l]);
                    for (d, (&g, &out)) in dres.iter_mut().zip(planes) {
                        *d = mask(g, out);
                    }
                }
            });
        let (dbias, dweight): (Vec<f32>, Vec<f32>) =
            sums.iter().map(|&(s, sx)| (s as f32, sx as f32)).unzip();
        *lock(&self.side) = [dweight, dbias].concat();
        Ok((
            CpuStorage::F32(out),
            Shape::from(len * if self.residual { 2 } else { 1 }),
        ))
    }
}

/// Train-mode BatchNorm of contiguous f32 `x [n, c, ...]` on the CPU, plus `residual` (shaped
/// like `x`) when given, followed by a ReLU when `relu`: the output (shaped like `x`) and the batch
/// mean and biased variance `[c]` each (detached).
pub fn forward_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    relu: bool,
    residual: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let side = Side::default();
    let op = Forward {
        relu,
        side: side.clone(),
    };
    let params = Tensor::cat(&[weight, bias], 0)?;
    let x = x.contiguous()?;
    let y = match residual {
        Some(r) => x.apply_op3(&params, &r.contiguous()?, op)?,
        None => x.apply_op2(&params, op)?,
    };
    let stats = lock(&side).clone();
    let c = weight.elem_count();
    let mean = Tensor::from_slice(&stats[..c], c, x.device())?;
    let var = Tensor::from_slice(&stats[c..], c, x.device())?;
    Ok((y, mean, var))
}
