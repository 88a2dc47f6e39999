//! The updates on contiguous f32 CPU buffers, in place: one pass over each parameter (two for
//! LARS, which needs norms first), no temporaries. Large tensors are split into fixed chunks on
//! the thread pool; norms are summed in f64 [`Lanes`] chunk by chunk in order, so results depend
//! neither on scheduling nor on the [`Isa`] the loops run with.

use rayon::prelude::*;
use shared::cpu::Isa;

use super::{AdamStep, Blend, Momentum};
use crate::ops::lanes::Lanes;

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 15;

/// [`Blend`]: `dst = keep * dst + take * src` (or `src²`).
pub fn blend(isa: Isa, op: &Blend, dst: &mut [f32], src: &[f32]) {
    let (keep, take) = (op.keep as f32, op.take as f32);
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| blend_chunk(isa, d, s, keep, take, op.square));
}

shared::multiversion! {
    /// `dst = keep * dst + take * src` (or `src²`) on one chunk.
    fn blend_chunk(dst: &mut [f32], src: &[f32], keep: f32, take: f32, square: bool) {
        for (d, &s) in dst.iter_mut().zip(src) {
            let s = if square { s * s } else { s };
            *d = keep * *d + take * s;
        }
    }
}

/// [`Momentum`]: `m = momentum * m + ratio * (g + decay * w)`.
pub fn momentum(isa: Isa, op: &Momentum, m: &mut [f32], w: &[f32], g: &[f32]) {
    let decay = op.decay as f32;
    let ratio = match op.trust {
        None => 1.0,
        Some(trust) => {
            let partials: Vec<(f64, f64)> = w
                .par_chunks(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .map(|(w, g)| squared_norms(isa, w, g, decay))
                .collect();
            let (ww, dd) = partials
                .iter()
                .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
            let (w_norm, d_norm) = (ww.sqrt(), dd.sqrt());
            if w_norm > 0.0 && d_norm > 0.0 {
                (trust * w_norm / d_norm) as f32
            } else {
                1.0
            }
        }
    };
    let momentum = op.momentum as f32;
    m.par_chunks_mut(CHUNK)
        .zip(w.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(m, (w, g))| momentum_chunk(isa, m, w, g, momentum, ratio, decay));
}

shared::multiversion! {
    /// `(|w|², |g + decay w|²)` of one chunk.
    fn squared_norms(w: &[f32], g: &[f32], decay: f32) -> (f64, f64) {
        let (mut ww, mut dd) = (Lanes::default(), Lanes::default());
        ww.add(w, |w| w as f64 * w as f64);
        dd.add2((w, g), |w, g| {
            let d = (g + decay * w) as f64;
            d * d
        });
        (ww.total(), dd.total())
    }
}

shared::multiversion! {
    /// `m = momentum * m + ratio * (g + decay * w)` on one chunk.
    fn momentum_chunk(m: &mut [f32], w: &[f32], g: &[f32], momentum: f32, ratio: f32, decay: f32) {
        for ((m, &w), &g) in m.iter_mut().zip(w).zip(g) {
            *m = momentum * *m + ratio * (g + decay * w);
        }
    }
}

/// [`AdamStep`]: `w -= lr * (m_hat / (sqrt(v_hat) + eps) + decay * w)`.
pub fn adam_step(isa: Isa, op: &AdamStep, w: &mut [f32], m: &[f32], v: &[f32]) {
    let (c1, c2) = op.corrections;
    let constants = [op.lr, op.decay, c1, c2, op.eps].map(|x| x as f32);
    w.par_chunks_mut(CHUNK)
        .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
        .for_each(|(w, (m, v))| adam_chunk(isa, w, m, v, constants));
}

shared::multiversion! {
    /// The AdamW step on one chunk, with `[lr, decay, c1, c2, eps]`.
    fn adam_chunk(w: &mut [f32], m: &[f32], v: &[f32], constants: [f32; 5]) {
        let [lr, decay, c1, c2, eps] = constants;
        for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
            *w -= lr * ((m / c1) / ((v / c2).sqrt() + eps) + decay * *w);
        }
    }
}
