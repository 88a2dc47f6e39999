//! 2-D convolution without bias, as ResNets use it.
//!
//! On CPU (f32) the convolution is written as im2col + one large matrix product, so that autograd
//! routes both gradients through large gemms too: the weight gradient is `patches^T @ dY`, the input
//! gradient `dY @ W` followed by col2im. Candle's own conv sends the input gradient through a plain
//! `conv_transpose2d` loop, the main cost of a ResNet step on CPU. The input image needs no gradient
//! and gets none (its patches are not tracked). On other devices and dtypes the built-in convolution
//! runs. The weight stays f32 (the master copy); under mixed precision it is cast to the input's
//! dtype.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

/// A bias-free convolution with square kernel, stride and padding.
pub struct Conv {
    weight: Tensor,
    geometry: Geometry,
}

/// Kernel size, stride and padding.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Geometry {
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Geometry {
    fn out(&self, n: usize) -> usize {
        (n + 2 * self.padding - self.k) / self.stride + 1
    }
}

impl Conv {
    /// Creates `weight` of shape `[c_out, c_in, k, k]` under `vb`.
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get_with_hints((c_out, c_in, k, k), "weight", Init::Const(0.0))?;
        Ok(Conv {
            weight,
            geometry: Geometry { k, stride, padding },
        })
    }

    /// Convolves `[batch, c_in, H, W]` input.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            conv2d_gemm(x, &self.weight, self.geometry)
        } else {
            let g = self.geometry;
            let w = self.weight.to_dtype(x.dtype())?;
            x.conv2d(&w, g.padding, g.stride, 1, 1)
        }
    }
}

/// Convolution as `patches [n*ho*wo, c_in*k*k] @ weight^T [c_in*k*k, c_out]`, then back to NCHW.
pub fn conv2d_gemm(x: &Tensor, weight: &Tensor, g: Geometry) -> Result<Tensor> {
    let (n, c_in, h, w) = x.dims4()?;
    let c_out = weight.dim(0)?;
    let (ho, wo) = (g.out(h), g.out(w));
    let kk = c_in * g.k * g.k;
    let patches = if g.k == 1 && g.padding == 0 {
        // A 1x1 kernel's patches are the pixels themselves (every stride-th one).
        let x = if g.stride == 1 {
            x.clone()
        } else {
            subsample(x, g.stride, ho, wo)?
        };
        x.permute((0, 2, 3, 1))?.reshape((n * ho * wo, c_in))?
    } else {
        x.contiguous()?
            .apply_op1(Im2Col { g, h, w })?
            .reshape((n * ho * wo, kk))?
    };
    let y = patches.matmul(&weight.reshape((c_out, kk))?.t()?)?;
    y.reshape((n, ho, wo, c_out))?.permute((0, 3, 1, 2))
}

/// Every `stride`-th row and column, starting at 0: `[n, c, ho, wo]`.
fn subsample(x: &Tensor, stride: usize, ho: usize, wo: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let x = x
        .pad_with_zeros(2, 0, ho * stride - h.min(ho * stride))?
        .pad_with_zeros(3, 0, wo * stride - w.min(wo * stride))?;
    x.narrow(2, 0, ho * stride)?
        .narrow(3, 0, wo * stride)?
        .reshape((n, c, ho, stride, wo, stride))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((n, c, ho, wo))
}

/// `[n, c, h, w]` -> `[n, ho, wo, c*k*k]` (entries ordered c, ki, kj, like the weight's rows).
struct Im2Col {
    g: Geometry,
    h: usize,
    w: usize,
}

/// The adjoint of [`Im2Col`]: sums patch gradients back onto `[n, c, h, w]`.
struct Col2Im {
    g: Geometry,
    c: usize,
    h: usize,
    w: usize,
}

fn f32_input<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous");
    };
    match storage {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => candle_core::bail!("{op}: only f32 is supported"),
    }
}

/// Copies one kernel row's taps; 3-tap rows (3x3 kernels) copy as a fixed-size array instead of
/// calling `memcpy` for 12 bytes.
#[inline(always)]
fn copy_taps(dst: &mut [f32], src: &[f32]) {
    match (
        <&mut [f32; 3]>::try_from(&mut *dst),
        <&[f32; 3]>::try_from(src),
    ) {
        (Ok(d), Ok(s)) => *d = *s,
        _ => dst.copy_from_slice(src),
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_input(storage, layout, "im2col")?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let Geometry { k, stride, padding } = self.g;
        let (ho, wo) = (self.g.out(h), self.g.out(w));
        let kk = c * k * k;
        let mut out = vec![0f32; n * ho * wo * kk];
        out.par_chunks_mut(wo * kk)
            .enumerate()
            .for_each(|(row, dst)| {
                let (b, oh) = (row / ho, row % ho);
                let img = &x[b * c * h * w..(b + 1) * c * h * w];
                for (ow, patch) in dst.chunks_exact_mut(kk).enumerate() {
                    // The k taps of a kernel row read k adjacent input pixels whatever the stride.
                    let iw0 = (ow * stride) as isize - padding as isize;
                    let inside = iw0 >= 0 && iw0 as usize + k <= w;
                    for ci in 0..c {
                        let plane = &img[ci * h * w..(ci + 1) * h * w];
                        for ki in 0..k {
                            let ih = (oh * stride + ki) as isize - padding as isize;
                            if ih < 0 || ih >= h as isize {
                                continue; // stays zero
                            }
                            let src = &plane[ih as usize * w..(ih as usize + 1) * w];
                            let taps = &mut patch[(ci * k + ki) * k..][..k];
                            if inside {
                                copy_taps(taps, &src[iw0 as usize..iw0 as usize + k]);
                            } else {
                                for (kj, t) in taps.iter_mut().enumerate() {
                                    let iw = iw0 + kj as isize;
                                    if iw >= 0 && iw < w as isize {
                                        *t = src[iw as usize];
                                    }
                                }
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, ho, wo, kk))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let c = arg.dim(1)?;
        let back = Col2Im {
            g: self.g,
            c,
            h: self.h,
            w: self.w,
        };
        Ok(Some(grad.contiguous()?.apply_op1(back)?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = f32_input(storage, layout, "col2im")?;
        let (n, ho, wo, kk) = layout.shape().dims4()?;
        let (c, h, w) = (self.c, self.h, self.w);
        let Geometry { k, stride, padding } = self.g;
        debug_assert_eq!(kk, c * k * k);
        let mut out = vec![0f32; n * c * h * w];
        // One image per task: its patches are read once, in order, and scattered onto its planes.
        out.par_chunks_mut(c * h * w)
            .zip(cols.par_chunks(ho * wo * kk))
            .for_each(|(image, patches)| {
                for (p, patch) in patches.chunks_exact(kk).enumerate() {
                    let (oh, ow) = (p / wo, p % wo);
                    let iw0 = (ow * stride) as isize - padding as isize;
                    let inside = iw0 >= 0 && iw0 as usize + k <= w;
                    for ci in 0..c {
                        for ki in 0..k {
                            let ih = (oh * stride + ki) as isize - padding as isize;
                            if ih < 0 || ih >= h as isize {
                                continue;
                            }
                            let row = &mut image[(ci * h + ih as usize) * w..][..w];
                            let taps = &patch[(ci * k + ki) * k..][..k];
                            if inside {
                                let dst = &mut row[iw0 as usize..iw0 as usize + k];
                                for (d, v) in dst.iter_mut().zip(taps) {
                                    *d += v;
                                }
                            } else {
                                for (kj, v) in taps.iter().enumerate() {
                                    let iw = iw0 + kj as isize;
                                    if iw >= 0 && iw < w as isize {
                                        row[iw as usize] += v;
                                    }
                                }
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, h, w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let im2col = Im2Col {
            g: self.g,
            h: self.h,
            w: self.w,
        };
        Ok(Some(grad.contiguous()?.apply_op1(im2col)?))
    }
}
