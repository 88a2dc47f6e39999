//! The optimiser and EMA updates on CPU f32 tensors as in-place kernels: one pass over each
//! parameter (two for LARS, which needs norms first), no temporaries. As tensor ops, LARS costs
//! about ten passes and as many fresh buffers per parameter, 15% of a ResNet-18 step at 32 px.
//! Large tensors are split into fixed chunks on the thread pool; norms are summed chunk by chunk
//! in order, so results do not depend on scheduling.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

use crate::cpu_storage::{f32_slice, f32_slice_mut};

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 15;

/// `dst = keep * dst + take * src` (or `src²` when `square`): the EMA target update and Adam's
/// moments (`take = 1 - keep`), and momentum SGD's step `w -= lr * m` (`keep = 1, take = -lr`).
pub struct Blend {
    pub keep: f64,
    pub take: f64,
    pub square: bool,
}

impl InplaceOp2 for Blend {
    fn name(&self) -> &'static str {
        "blend"
    }

    fn cpu_fwd(
        &self,
        ds: &mut CpuStorage,
        dl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let dst = f32_slice_mut(ds, dl, self.name())?;
        let src = f32_slice(ss, sl, self.name())?;
        let (keep, take, square) = (self.keep as f32, self.take as f32, self.square);
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| {
                for (d, &s) in d.iter_mut().zip(s) {
                    let s = if square { s * s } else { s };
                    *d = keep * *d + take * s;
                }
            });
        Ok(())
    }
}

/// Momentum SGD's buffer update `m = momentum * m + ratio * (g + decay * w)`, on `m` with
/// `(w, g)`; `ratio` is LARS's `trust * |w| / |g + decay * w|` (1 where a norm is 0) when
/// `trust` is set, else 1.
pub struct Momentum {
    pub momentum: f64,
    pub decay: f64,
    pub trust: Option<f64>,
}

impl InplaceOp3 for Momentum {
    fn name(&self) -> &'static str {
        "momentum"
    }

    fn cpu_fwd(
        &self,
        ms: &mut CpuStorage,
        ml: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let m = f32_slice_mut(ms, ml, self.name())?;
        let w = f32_slice(ws, wl, self.name())?;
        let g = f32_slice(gs, gl, self.name())?;
        let decay = self.decay as f32;
        let ratio = match self.trust {
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
        let momentum = self.momentum as f32;
        m.par_chunks_mut(CHUNK)
            .zip(w.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(m, (w, g))| {
                for ((m, &w), &g) in m.iter_mut().zip(w).zip(g) {
                    *m = momentum * *m + ratio * (g + decay * w);
                }
            });
        Ok(())
    }
}

/// AdamW's parameter step `w -= lr * (m_hat / (sqrt(v_hat) + eps) + decay * w)`, on `w` with
/// the moments `(m, v)`; `corrections` are `1 - beta1^t` and `1 - beta2^t`.
pub struct AdamStep {
    pub lr: f64,
    pub decay: f64,
    pub corrections: (f64, f64),
    pub eps: f64,
}

impl InplaceOp3 for AdamStep {
    fn name(&self) -> &'static str {
        "adam-step"
    }

    fn cpu_fwd(
        &self,
        ws: &mut CpuStorage,
        wl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let w = f32_slice_mut(ws, wl, self.name())?;
        let m = f32_slice(ms, ml, self.name())?;
        let v = f32_slice(vs, vl, self.name())?;
        let (c1, c2) = self.corrections;
        let [lr, decay, c1, c2, eps] = [self.lr, self.decay, c1, c2, self.eps].map(|x| x as f32);
        w.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(w, (m, v))| {
                for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
                    *w -= lr * ((m / c1) / ((v / c2).sqrt() + eps) + decay * *w);
                }
            });
        Ok(())
    }
}

/// Whether `t` can take the in-place CPU kernels.
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous()
}
