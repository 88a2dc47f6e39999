//! Train-mode BatchNorm on the CPU as two fused kernels (forward: statistics + normalisation;
//! backward: the three gradients), instead of a dozen elementwise passes each way.

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

/// `(x [n,c,l], weight [c], bias [c])` -> `[n*c*l + 2c]`: the normalised output, then the batch
/// mean and biased variance of each channel (for the running statistics).
struct Forward;

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
        let stats = channel_stats(x, n, c, l);
        let mut out = vec![0f32; n * c * l + 2 * c];
        let (y, tail) = out.split_at_mut(n * c * l);
        y.par_chunks_mut(l).enumerate().for_each(|(i, dst)| {
            let ch = i % c;
            let (mean, var) = stats[ch];
            let scale = w[ch] as f64 / (var + EPS).sqrt();
            let shift = b[ch] as f64 - mean * scale;
            let (scale, shift) = (scale as f32, shift as f32);
            for (d, &v) in dst.iter_mut().zip(&x[i * l..(i + 1) * l]) {
                *d = v * scale + shift;
            }
        });
        for (ch, (mean, var)) in stats.iter().enumerate() {
            tail[ch] = *mean as f32;
            tail[c + ch] = *var as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(n * c * l + 2 * c)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, l) = x.dims3()?;
        let m = n * c * l;
        let stats = res.narrow(0, m, 2 * c)?.detach();
        let packed = Tensor::cat(&[&w.detach(), &stats], 0)?;
        let g = grad.narrow(0, 0, m)?.contiguous()?;
        let out = x.apply_op3_no_bwd(&g, &packed, &Backward)?;
        Ok((
            Some(out.narrow(0, 0, m)?.reshape((n, c, l))?),
            Some(out.narrow(0, m, c)?),
            Some(out.narrow(0, m + c, c)?),
        ))
    }
}

/// `(x [n,c,l], dy [n*c*l], [weight, mean, var] [3c])` -> `[dx (n*c*l), dweight (c), dbias (c)]`.
struct Backward;

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
        let (w, mean, var) = (&p[..c], &p[c..2 * c], &p[2 * c..]);
        // Per channel: sum(dy) and sum(dy * x_hat).
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let inv = 1.0 / (var[ch] as f64 + EPS).sqrt();
                let (mut s, mut sx) = (0f64, 0f64);
                for b in 0..n {
                    let at = (b * c + ch) * l;
                    for (&g, &v) in dy[at..at + l].iter().zip(&x[at..at + l]) {
                        s += g as f64;
                        sx += g as f64 * (v as f64 - mean[ch] as f64) * inv;
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
            let at = i * l;
            for ((d, &g), &v) in dst.iter_mut().zip(&dy[at..at + l]).zip(&x[at..at + l]) {
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

/// Train-mode BatchNorm of contiguous f32 `x [n, c, l]` on the CPU: the output `[n, c, l]` and the
/// batch mean and biased variance `[c]` each (detached).
pub fn forward_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, c, l) = x.dims3()?;
    let m = n * c * l;
    let out = x.contiguous()?.apply_op3(weight, bias, Forward)?;
    let y = out.narrow(0, 0, m)?.reshape((n, c, l))?;
    let mean = out.narrow(0, m, c)?.detach();
    let var = out.narrow(0, m + c, c)?.detach();
    Ok((y, mean, var))
}
