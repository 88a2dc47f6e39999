//! Train-mode BatchNorm on the CPU as two fused kernels (forward: statistics + normalisation,
//! optionally followed by ReLU; backward: the three gradients, through the ReLU's mask), instead of
//! a dozen elementwise passes each way.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const EPS: f64 = 1e-5;

/// Contiguous f32 data of a CPU tensor argument.
fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: needs contiguous f32 input"),
    }
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

/// `(x [n,c,l], weight [c], bias [c])` -> `[n*c*l + 2c]`: the normalised output (through a ReLU
/// when `relu`), then the batch mean and biased variance of each channel (for the running
/// statistics).
struct Forward {
    relu: bool,
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
        let (n, c, l) = xl.shape().dims3()?;
        let x = slice(xs, xl, self.name())?;
        let w = slice(ws, wl, self.name())?;
        let b = slice(bs, bl, self.name())?;
        let stats: Vec<(f32, f32)> = channel_stats(x, n, c, l)
            .into_iter()
            .map(|(mean, var)| (mean as f32, var as f32))
            .collect();
        let mut out = vec![0f32; n * c * l + 2 * c];
        let (y, tail) = out.split_at_mut(n * c * l);
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
        for (ch, (mean, var)) in stats.into_iter().enumerate() {
            tail[ch] = mean;
            tail[c + ch] = var;
        }
        Ok((CpuStorage::F32(out), Shape::from(n * c * l + 2 * c)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, l) = x.dims3()?;
        let m = n * c * l;
        let stats = res.narrow(0, m, 2 * c)?.detach();
        let packed = Tensor::cat(&[&w.detach(), &b.detach(), &stats], 0)?;
        let g = grad.narrow(0, 0, m)?.contiguous()?;
        let out = x.apply_op3_no_bwd(&g, &packed, &Backward { relu: self.relu })?;
        Ok((
            Some(out.narrow(0, 0, m)?.reshape((n, c, l))?),
            Some(out.narrow(0, m, c)?),
            Some(out.narrow(0, m + c, c)?),
        ))
    }
}

/// `(x [n,c,l], dy [n*c*l], [weight, bias, mean, var] [4c])` -> `[dx (n*c*l), dweight (c),
/// dbias (c)]`; with `relu`, `dy` is first masked where the forward's output was clipped to zero.
struct Backward {
    relu: bool,
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
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, l) = xl.shape().dims3()?;
        let x = slice(xs, xl, self.name())?;
        let dy = slice(gs, gl, self.name())?;
        let p = slice(ps, pl, self.name())?;
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
        let mut out = vec![0f32; n * c * l + 2 * c];
        let (dx, tail) = out.split_at_mut(n * c * l);
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
        for (ch, (s, sx)) in sums.iter().enumerate() {
            tail[ch] = *sx as f32;
            tail[c + ch] = *s as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(n * c * l + 2 * c)))
    }
}

/// Train-mode BatchNorm of contiguous f32 `x [n, c, l]` on the CPU, followed by a ReLU when
/// `relu`: the output `[n, c, l]` and the batch mean and biased variance `[c]` each (detached).
pub fn forward_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, c, l) = x.dims3()?;
    let m = n * c * l;
    let out = x.contiguous()?.apply_op3(weight, bias, Forward { relu })?;
    let y = out.narrow(0, 0, m)?.reshape((n, c, l))?;
    let mean = out.narrow(0, m, c)?.detach();
    let var = out.narrow(0, m + c, c)?.detach();
    Ok((y, mean, var))
}
