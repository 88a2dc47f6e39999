//! Train-mode BatchNorm's CPU kernels (f32): the batch statistics in one pass per channel, the
//! normalisation fused with the residual add and the ReLU, and the whole backward (through the
//! ReLU's mask) in two passes, instead of a dozen elementwise passes each way. The loops are
//! compiled for every [`Isa`]; sums are f64 [`Lanes`].

use candle_core::{CpuStorage, Layout, Result, Shape};
use rayon::prelude::*;
use shared::cpu::Isa;

use super::{ncl, EPS};
use crate::dist::Collective;
use crate::ops::cpu_storage::{f32_slice, zeros};
use crate::ops::lanes::Lanes;

/// Per-channel mean then biased variance of `x [n, c, ...]`: `[2c]`, summed in f64. With `sync`,
/// the sums are those of every rank's batch (each rank holds `n` samples).
pub fn stats(
    isa: Isa,
    xs: &CpuStorage,
    xl: &Layout,
    sync: Option<&dyn Collective>,
) -> Result<(CpuStorage, Shape)> {
    let (n, c, l) = ncl(xl.shape())?;
    let x = f32_slice(xs, xl, "batch-norm-stats")?;
    let world = sync.map_or(1, |g| g.world_size());
    let count = (n * l * world) as f64;
    let mut sums: Vec<f64> = (0..c)
        .into_par_iter()
        .map(|ch| channel_sum(isa, x, n, c, l, ch))
        .collect();
    reduce(sync, &mut sums)?;
    let means: Vec<f64> = sums.iter().map(|s| s / count).collect();
    let mut squares: Vec<f64> = (0..c)
        .into_par_iter()
        .map(|ch| channel_squares(isa, x, n, c, l, ch, means[ch]))
        .collect();
    reduce(sync, &mut squares)?;
    let means = means.iter().map(|&m| m as f32);
    let vars = squares.iter().map(|&s| (s / count) as f32);
    Ok((
        CpuStorage::F32(means.chain(vars).collect()),
        Shape::from(2 * c),
    ))
}

/// Sums `values` over the ranks of `sync`, if any.
fn reduce(sync: Option<&dyn Collective>, values: &mut [f64]) -> Result<()> {
    match sync {
        Some(group) => group.all_reduce_host(values),
        None => Ok(()),
    }
}

/// The planes of channel `ch` of `x [n, c, l]`.
fn channel_planes(
    x: &[f32],
    (n, c, l): (usize, usize, usize),
    ch: usize,
) -> impl Iterator<Item = &[f32]> {
    (0..n).map(move |b| &x[(b * c + ch) * l..][..l])
}

shared::multiversion! {
    /// Sum of channel `ch` of `x [n, c, l]`.
    fn channel_sum(x: &[f32], n: usize, c: usize, l: usize, ch: usize) -> f64 {
        // A `for` loop, not `for_each`: the loop body must be compiled into this copy of the
        // function, for its instruction set, and `for_each`'s `fold` may stay a call outside it.
        let mut sum = Lanes::default();
        for plane in channel_planes(x, (n, c, l), ch) {
            sum.add(plane, |v| v as f64);
        }
        sum.total()
    }
}

shared::multiversion! {
    /// Sum of the squared deviations from `mean` of channel `ch` of `x [n, c, l]`.
    fn channel_squares(x: &[f32], n: usize, c: usize, l: usize, ch: usize, mean: f64) -> f64 {
        let mut squares = Lanes::default();
        for plane in channel_planes(x, (n, c, l), ch) {
            squares.add(plane, |v| (v as f64 - mean) * (v as f64 - mean));
        }
        squares.total()
    }
}

/// The per-channel affine map `x * scale + shift` that normalises with `mean` and `var`.
fn affine(weight: f32, bias: f32, mean: f32, var: f32) -> (f32, f32) {
    let scale = weight as f64 / (var as f64 + EPS).sqrt();
    let shift = bias as f64 - mean as f64 * scale;
    (scale as f32, shift as f32)
}

/// `(x, params [weight, bias, mean, var], residual)` -> `x` normalised, plus `residual`, through
/// a ReLU when `relu`.
pub fn forward(
    isa: Isa,
    (xs, xl): (&CpuStorage, &Layout),
    (ps, pl): (&CpuStorage, &Layout),
    residual: Option<(&CpuStorage, &Layout)>,
    relu: bool,
) -> Result<(CpuStorage, Shape)> {
    let name = "batch-norm-train";
    let (n, c, l) = ncl(xl.shape())?;
    let x = f32_slice(xs, xl, name)?;
    let p = f32_slice(ps, pl, name)?;
    let residual = residual
        .map(|(rs, rl)| f32_slice(rs, rl, name))
        .transpose()?;
    let (w, b, mean, var) = (&p[..c], &p[c..2 * c], &p[2 * c..3 * c], &p[3 * c..]);
    let maps: Vec<(f32, f32)> = (0..c)
        .map(|ch| affine(w[ch], b[ch], mean[ch], var[ch]))
        .collect();
    let mut y = zeros(n * c * l);
    y.par_chunks_mut(l).enumerate().for_each(|(i, dst)| {
        let (scale, shift) = maps[i % c];
        let src = &x[i * l..(i + 1) * l];
        let residual = residual.map(|r| &r[i * l..(i + 1) * l]);
        normalise_plane(isa, dst, src, scale, shift, residual, relu);
    });
    Ok((CpuStorage::F32(y), xl.shape().clone()))
}

shared::multiversion! {
    /// `dst = src * scale + shift`, plus `residual`, through a ReLU when `relu`.
    fn normalise_plane(
        dst: &mut [f32],
        src: &[f32],
        scale: f32,
        shift: f32,
        residual: Option<&[f32]>,
        relu: bool,
    ) {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = v * scale + shift;
        }
        if let Some(r) = residual {
            for (d, &r) in dst.iter_mut().zip(r) {
                *d += r;
            }
        }
        if relu {
            for d in dst.iter_mut() {
                *d = d.max(0.0);
            }
        }
    }
}

/// `(x, dy, y)` with `params` = `[weight, bias, mean, var]` -> `[dx | dresidual (when residual)
/// | dweight | dbias | 2c zeros]`, flat. With `relu`, `dy` is first masked where the output `y`
/// was clipped to zero. With `sync`, the input gradient uses the gradient sums of every rank's
/// batch; the parameters' gradients stay this rank's own (the gradient all-reduce sums them).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    isa: Isa,
    (xs, xl): (&CpuStorage, &Layout),
    (gs, gl): (&CpuStorage, &Layout),
    (ys, yl): (&CpuStorage, &Layout),
    (ps, pl): (&CpuStorage, &Layout),
    relu: bool,
    residual: bool,
    sync: Option<&dyn Collective>,
) -> Result<(CpuStorage, Shape)> {
    let name = "batch-norm-train-backward";
    let (n, c, l) = ncl(xl.shape())?;
    let x = f32_slice(xs, xl, name)?;
    let dy = f32_slice(gs, gl, name)?;
    let y = f32_slice(ys, yl, name)?;
    let p = f32_slice(ps, pl, name)?;
    let (w, mean, var) = (&p[..c], &p[2 * c..3 * c], &p[3 * c..]);
    // Per channel: sum(dy) and sum(dy * x_hat), dy masked by the ReLU.
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let inv = 1.0 / (var[ch] as f64 + EPS).sqrt();
            let planes = (0..n).map(|b| {
                let at = (b * c + ch) * l;
                (&dy[at..at + l], &y[at..at + l], &x[at..at + l])
            });
            let (mut s, mut sx) = (Lanes::default(), Lanes::default());
            for planes in planes {
                gradient_sums(isa, &mut s, &mut sx, planes, mean[ch] as f64, inv, relu);
            }
            (s.total(), sx.total())
        })
        .collect();
    let mut global: Vec<f64> = sums.iter().flat_map(|&(s, sx)| [s, sx]).collect();
    reduce(sync, &mut global)?;
    let world = sync.map_or(1, |g| g.world_size());
    let count = (n * l * world) as f64;
    let len = n * c * l;
    let planes_len = if residual { 2 * len } else { len };
    let mut out = zeros(planes_len + 4 * c);
    let (planes, params) = out.split_at_mut(planes_len);
    let (dx, dres) = planes.split_at_mut(len);
    let dres: Vec<Option<&mut [f32]>> = if residual {
        dres.chunks_mut(l).map(Some).collect()
    } else {
        (0..n * c).map(|_| None).collect()
    };
    // Per channel: dx = w * inv / M * (M * dy - sum(dy) - x_hat * sum(dy * x_hat)).
    let coefficients: Vec<[f32; 5]> = (0..c)
        .map(|ch| {
            let inv = 1.0 / (var[ch] as f64 + EPS).sqrt();
            let (s, sx) = (global[2 * ch], global[2 * ch + 1]);
            let k = (w[ch] as f64 * inv / count) as f32;
            let (mean_dy, mean_dyx) = ((s / count) as f32, (sx / count) as f32);
            [k * count as f32, mean_dy, mean_dyx, mean[ch], inv as f32]
        })
        .collect();
    dx.par_chunks_mut(l)
        .zip(dres)
        .enumerate()
        .for_each(|(i, (dst, dres))| {
            let at = i * l;
            let planes = (&dy[at..at + l], &y[at..at + l], &x[at..at + l]);
            input_gradient(isa, dst, dres, planes, coefficients[i % c], relu);
        });
    for (ch, &(s, sx)) in sums.iter().enumerate() {
        params[ch] = sx as f32;
        params[c + ch] = s as f32;
    }
    let len = out.len();
    Ok((CpuStorage::F32(out), Shape::from(len)))
}

/// The gradient that reaches the normalisation (and the residual): `g`, or zero where the
/// ReLU clipped the output `y`.
#[inline(always)]
fn masked(g: f32, y: f32, relu: bool) -> f32 {
    if relu && y <= 0.0 {
        0.0
    } else {
        g
    }
}

shared::multiversion! {
    /// Adds one plane's `dy` (masked by the ReLU) to `s` and `dy * x_hat` to `sx`.
    fn gradient_sums(
        s: &mut Lanes,
        sx: &mut Lanes,
        planes: (&[f32], &[f32], &[f32]),
        mean: f64,
        inv: f64,
        relu: bool,
    ) {
        let (dy, y, x) = planes;
        s.add3((dy, y, x), |g, out, _| masked(g, out, relu) as f64);
        sx.add3((dy, y, x), |g, out, v| {
            masked(g, out, relu) as f64 * (v as f64 - mean) * inv
        });
    }
}

shared::multiversion! {
    /// One plane's input gradient `k (g - mean_dy - x_hat mean_dyx)` with `[k, mean_dy,
    /// mean_dyx, mean, inv]`, and the residual's (the masked `dy`) when asked.
    fn input_gradient(
        dst: &mut [f32],
        dres: Option<&mut [f32]>,
        planes: (&[f32], &[f32], &[f32]),
        coefficients: [f32; 5],
        relu: bool,
    ) {
        let (dy, y, x) = planes;
        let [k, mean_dy, mean_dyx, m, inv] = coefficients;
        let planes = dy.iter().zip(y);
        for ((d, (&g, &out)), &v) in dst.iter_mut().zip(planes).zip(x) {
            let xh = (v - m) * inv;
            *d = k * (masked(g, out, relu) - mean_dy - xh * mean_dyx);
        }
        if let Some(dres) = dres {
            for (d, (&g, &out)) in dres.iter_mut().zip(dy.iter().zip(y)) {
                *d = masked(g, out, relu);
            }
        }
    }
}
