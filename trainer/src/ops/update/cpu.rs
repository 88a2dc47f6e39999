//! The updates on contiguous f32 CPU buffers, in place: one pass over each parameter (two for
//! LARS, which needs norms first), no temporaries. Large tensors are split into fixed chunks on
//! the thread pool; norms are summed chunk by chunk in order, so results do not depend on
//! scheduling.

use rayon::prelude::*;

use super::{AdamStep, Blend, Momentum};

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 15;

/// [`Blend`]: `dst = keep * dst + take * src` (or `src²`).
pub fn blend(op: &Blend, dst: &mut [f32], src: &[f32]) {
    let (keep, take, square) = (op.keep as f32, op.take as f32, op.square);
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| {
            for (d, &s) in d.iter_mut().zip(s) {
                let s = if square { s * s } else { s };
                *d = keep * *d + take * s;
            }
        });
}

/// [`Momentum`]: `m = momentum * m + ratio * (g + decay * w)`.
pub fn momentum(op: &Momentum, m: &mut [f32], w: &[f32], g: &[f32]) {
    let decay = op.decay as f32;
    let ratio = match op.trust {
        None => 1.0,
        Some(trust) => {
            let partials: Vec<(f64, f64)> = w
                .par_chunks(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .map(|(w, g)| {
                    w.iter().zip(g).fold((0.0, 0.0), |(ww, dd), (&w, &g)| {
                        let d = (g + decay * w) as f64;
                        (ww + (w as f64) * (w as f64), dd + d * d)
                    })
                })
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
        .for_each(|(m, (w, g))| {
            for ((m, &w), &g) in m.iter_mut().zip(w).zip(g) {
                *m = momentum * *m + ratio * (g + decay * w);
            }
        });
}

/// [`AdamStep`]: `w -= lr * (m_hat / (sqrt(v_hat) + eps) + decay * w)`.
pub fn adam_step(op: &AdamStep, w: &mut [f32], m: &[f32], v: &[f32]) {
    let (c1, c2) = op.corrections;
    let [lr, decay, c1, c2, eps] = [op.lr, op.decay, c1, c2, op.eps].map(|x| x as f32);
    w.par_chunks_mut(CHUNK)
        .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
        .for_each(|(w, (m, v))| {
            for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
                *w -= lr * ((m / c1) / ((v / c2).sqrt() + eps) + decay * *w);
            }
        });
}
