//! Image augmentations with torchvision's semantics and parameter ranges, on 8-bit RGB.
//!
//! Each random transform is split in two: sampling its parameters from an RNG (exactly as
//! torchvision's `get_params` does), and applying fixed parameters (deterministic, tested against
//! reference outputs). Pixel arithmetic follows torchvision's PIL path (Pillow's blend with
//! truncation, ITU-R 601 luma in Pillow's fixed point); hue uses torchvision's float HSV.

use crate::cpu::Isa;
use crate::decode::RgbRef;
use crate::error::{Error, Result};
use crate::resize::Filter;
use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{PixelType, ResizeOptions, Resizer};
use rand::Rng;

/// A crop box in source pixels: top row, left column, height, width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries at a random area fraction in `scale`
/// and a log-uniform aspect ratio in `ratio`, then the centre-crop fallback.
pub fn random_resized_crop_box(
    rng: &mut impl Rng,
    height: u32,
    width: u32,
    scale: (f32, f32),
    ratio: (f32, f32),
) -> CropBox {
    let (h_img, w_img) = (height as f64, width as f64);
    let area = h_img * w_img;
    let (log_lo, log_hi) = ((ratio.0 as f64).ln(), (ratio.1 as f64).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0 as f64..=scale.1 as f64);
        let aspect = rng.random_range(log_lo..=log_hi).exp();
        let w = (target * aspect).sqrt().round() as i64;
        let h = (target / aspect).sqrt().round() as i64;
        if w > 0 && w <= width as i64 && h > 0 && h <= height as i64 {
            let top = rng.random_range(0..=height - h as u32);
            let left = rng.random_range(0..=width - w as u32);
            return CropBox {
                top,
                left,
                height: h as u32,
                width: w as u32,
            };
        }
    }
    let in_ratio = w_img / h_img;
    let (w, h) = if in_ratio < ratio.0 as f64 {
        (width, (w_img / ratio.0 as f64).round() as u32)
    } else if in_ratio > ratio.1 as f64 {
        ((h_img * ratio.1 as f64).round() as u32, height)
    } else {
        (width, height)
    };
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

/// Crops `src` to `crop` and resizes it to `size` x `size` in one pass (no intermediate crop
/// buffer), writing into `dst` (resized to fit).
pub fn crop_resize(
    resizer: &mut Resizer,
    src: RgbRef,
    crop: CropBox,
    size: u32,
    filter: Filter,
    dst: &mut Vec<u8>,
) -> Result<()> {
    let src_view = ImageRef::new(src.width, src.height, src.pixels, PixelType::U8x3)
        .map_err(|e| Error::Invalid(format!("crop source: {e}")))?;
    dst.resize((size * size * 3) as usize, 0);
    let mut out = Image::from_slice_u8(size, size, dst, PixelType::U8x3)
        .map_err(|e| Error::Invalid(format!("crop destination: {e}")))?;
    let options = ResizeOptions::new().resize_alg(filter.resize_alg()).crop(
        crop.left as f64,
        crop.top as f64,
        crop.width as f64,
        crop.height as f64,
    );
    resizer
        .resize(&src_view, &mut out, &options)
        .map_err(|e| Error::Invalid(format!("crop+resize: {e}")))
}

crate::multiversion! {
/// Rotates a `side` x `side` RGB image by `degrees` about its centre (clockwise as displayed,
/// rows running down), bilinear, into `dst` (resized to fit). Points that fall outside the image
/// take the nearest edge pixel, so the corners continue the background instead of turning black.
pub fn rotate(src: &[u8], side: u32, degrees: f32, dst: &mut Vec<u8>) {
    let n = side as usize;
    dst.resize(n * n * 3, 0);
    let (sin, cos) = degrees.to_radians().sin_cos();
    let mid = (side as f32 - 1.0) / 2.0;
    let last = side as f32 - 1.0;
    for (i, out) in dst.chunks_exact_mut(3).enumerate() {
        let (dx, dy) = ((i % n) as f32 - mid, (i / n) as f32 - mid);
        // The source point that lands here: the inverse rotation of the destination offset.
        let sx = (cos * dx + sin * dy + mid).clamp(0.0, last);
        let sy = (-sin * dx + cos * dy + mid).clamp(0.0, last);
        let (x0, y0) = (sx as usize, sy as usize);
        let (x1, y1) = ((x0 + 1).min(n - 1), (y0 + 1).min(n - 1));
        let (fx, fy) = (sx - x0 as f32, sy - y0 as f32);
        let at = |x: usize, y: usize, c: usize| src[(y * n + x) * 3 + c] as f32;
        for (c, o) in out.iter_mut().enumerate() {
            let top = at(x0, y0, c) * (1.0 - fx) + at(x1, y0, c) * fx;
            let bottom = at(x0, y1, c) * (1.0 - fx) + at(x1, y1, c) * fx;
            *o = (top * (1.0 - fy) + bottom * fy).round() as u8;
        }
    }
}
}

/// Mirrors each row of a `width`-wide RGB image.
pub fn hflip(pixels: &mut [u8], width: u32) {
    for row in pixels.chunks_exact_mut(width as usize * 3) {
        let n = width as usize;
        for x in 0..n / 2 {
            let (a, b) = (x * 3, (n - 1 - x) * 3);
            for c in 0..3 {
                row.swap(a + c, b + c);
            }
        }
    }
}

/// Pillow's ITU-R 601-2 luma in 16-bit fixed point: `L = R*299/1000 + G*587/1000 + B*114/1000`.
#[inline(always)]
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// Pillow's `Image.blend(a, b, alpha)` for one channel: `a + alpha * (b - a)`, clamped, truncated.
#[inline(always)]
fn blend(a: f32, b: f32, alpha: f32) -> u8 {
    (a + alpha * (b - a)).clamp(0.0, 255.0) as u8
}

crate::multiversion! {
/// torchvision `adjust_brightness`: blend with black.
pub fn adjust_brightness(pixels: &mut [u8], factor: f32) {
    let lut: [u8; 256] = std::array::from_fn(|v| blend(0.0, v as f32, factor));
    pixels.iter_mut().for_each(|p| *p = lut[*p as usize]);
}
}

crate::multiversion! {
/// torchvision `adjust_contrast`: blend with the image's mean luma (rounded, as Pillow does).
pub fn adjust_contrast(pixels: &mut [u8], factor: f32) {
    let n = (pixels.len() / 3).max(1) as u64;
    let sum: u64 = pixels
        .chunks_exact(3)
        .map(|p| luma(p[0], p[1], p[2]) as u64)
        .sum();
    let mean = ((sum as f64 / n as f64) + 0.5).floor() as f32;
    let lut: [u8; 256] = std::array::from_fn(|v| blend(mean, v as f32, factor));
    pixels.iter_mut().for_each(|p| *p = lut[*p as usize]);
}
}

/// Lanes of [`map_pixels8`]: eight pixels at a time, so the compiler vectorises the arithmetic.
type Lanes = [f32; 8];

/// Applies `f` to the pixels eight at a time as separate R, G, B lanes of floats; results are
/// clamped to [0, 255] and converted back adding `round` (0.5 rounds, 0.0 truncates).
#[inline(always)]
fn map_pixels8(pixels: &mut [u8], round: f32, f: impl Fn(&mut Lanes, &mut Lanes, &mut Lanes)) {
    #[inline(always)]
    fn lanes(
        chunk: &mut [u8],
        n: usize,
        round: f32,
        f: &impl Fn(&mut Lanes, &mut Lanes, &mut Lanes),
    ) {
        let (mut r, mut g, mut b) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        for i in 0..n {
            r[i] = chunk[3 * i] as f32;
            g[i] = chunk[3 * i + 1] as f32;
            b[i] = chunk[3 * i + 2] as f32;
        }
        f(&mut r, &mut g, &mut b);
        for i in 0..n {
            chunk[3 * i] = (r[i].clamp(0.0, 255.0) + round) as u8;
            chunk[3 * i + 1] = (g[i].clamp(0.0, 255.0) + round) as u8;
            chunk[3 * i + 2] = (b[i].clamp(0.0, 255.0) + round) as u8;
        }
    }
    let mut chunks = pixels.chunks_exact_mut(24);
    // Full chunks with a constant lane count, so the loads and stores unroll.
    for chunk in &mut chunks {
        lanes(chunk, 8, round, &f);
    }
    let rest = chunks.into_remainder();
    let n = rest.len() / 3;
    lanes(rest, n, round, &f);
}

/// [`luma`] on float lanes (exact: every intermediate is an integer below 2^24).
#[inline(always)]
fn luma_f32(r: f32, g: f32, b: f32) -> f32 {
    ((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) * (1.0 / 65536.0)).floor()
}

crate::multiversion! {
/// torchvision `adjust_saturation`: blend each pixel with its luma.
pub fn adjust_saturation(pixels: &mut [u8], factor: f32) {
    map_pixels8(pixels, 0.0, |r, g, b| {
        for i in 0..8 {
            let l = luma_f32(r[i], g[i], b[i]);
            r[i] = l + factor * (r[i] - l);
            g[i] = l + factor * (g[i] - l);
            b[i] = l + factor * (b[i] - l);
        }
    });
}
}

/// Rounds a value in `[0, 255]` to the nearest byte (a plain cast after adding 0.5: no libm call).
#[inline(always)]
fn to_u8(x: f32) -> u8 {
    (x.clamp(0.0, 255.0) + 0.5) as u8
}

crate::multiversion! {
/// torchvision `adjust_hue`: rotate the hue by `factor` turns (in [-0.5, 0.5]) in float HSV.
///
/// Saturation and value are kept, so each channel is `min + chroma * curve(h')` with the hexcone's
/// piecewise-linear curve of the shifted hue `h'` in [0, 6): branch-free and vectorisable.
pub fn adjust_hue(pixels: &mut [u8], factor: f32) {
    let shift = factor.rem_euclid(1.0) * 6.0;
    map_pixels8(pixels, 0.5, |r, g, b| {
        for i in 0..8 {
            let (rv, gv, bv) = (r[i], g[i], b[i]);
            let max = rv.max(gv).max(bv);
            let min = rv.min(gv).min(bv);
            let chroma = max - min;
            // Grey pixels (chroma 0) come out unchanged: every curve term is multiplied by 0.
            let inv = 1.0 / chroma.max(1e-6);
            let h_r = (gv - bv) * inv;
            let h_r = if h_r < 0.0 { h_r + 6.0 } else { h_r };
            let h_g = (bv - rv) * inv + 2.0;
            let h_b = (rv - gv) * inv + 4.0;
            let h = if max == rv {
                h_r
            } else if max == gv {
                h_g
            } else {
                h_b
            };
            let h = h + shift;
            let h = if h >= 6.0 { h - 6.0 } else { h };
            r[i] = min + chroma * ((h - 3.0).abs() - 1.0).clamp(0.0, 1.0);
            g[i] = min + chroma * (2.0 - (h - 2.0).abs()).clamp(0.0, 1.0);
            b[i] = min + chroma * (2.0 - (h - 4.0).abs()).clamp(0.0, 1.0);
        }
    });
}
}

crate::multiversion! {
/// Replaces every pixel by its luma on all three channels (`Grayscale(num_output_channels=3)`).
pub fn grayscale(pixels: &mut [u8]) {
    for p in pixels.chunks_exact_mut(3) {
        let l = luma(p[0], p[1], p[2]);
        p.fill(l);
    }
}
}

crate::multiversion! {
/// torchvision `solarize`: values at or above `threshold` become `255 - v`.
pub fn solarize(pixels: &mut [u8], threshold: u8) {
    pixels
        .iter_mut()
        .filter(|p| **p >= threshold)
        .for_each(|p| *p = 255 - *p);
}
}

/// torchvision's Gaussian kernel: `exp(-x^2 / (2 sigma^2))` at integer offsets, normalised.
pub fn gaussian_kernel(size: usize, sigma: f32) -> Vec<f32> {
    let half = (size as f32 - 1.0) / 2.0;
    let k: Vec<f32> = (0..size)
        .map(|i| {
            let x = i as f32 - half;
            (-0.5 * (x / sigma).powi(2)).exp()
        })
        .collect();
    let sum: f32 = k.iter().sum();
    k.into_iter().map(|v| v / sum).collect()
}

/// Reflect-101 index (`torch.nn.functional.pad(mode="reflect")`) for an offset outside `0..n`.
#[inline]
fn reflect(i: isize, n: isize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let m = i.rem_euclid(period);
    (if m < n { m } else { period - m }) as usize
}

/// Scratch buffers of [`gaussian_blur`], kept between calls.
#[derive(Default)]
pub struct BlurScratch {
    rows: Vec<f32>,
    line: Vec<f32>,
}

crate::multiversion! {
/// torchvision `gaussian_blur` with an odd kernel `size` and `sigma`: separable, reflect padding,
/// float accumulation, rounded back to 8 bits.
pub fn gaussian_blur(
    pixels: &mut [u8],
    width: u32,
    height: u32,
    size: usize,
    sigma: f32,
    scratch: &mut BlurScratch,
) {
    let (w, h) = (width as usize, height as usize);
    // Taps that weigh under 1e-6 change no output byte (22 of them move a value by < 0.006):
    // drop them, so a small sigma costs a few taps instead of the whole kernel.
    let full = gaussian_kernel(size, sigma);
    let skip = full.iter().take_while(|&&v| v < 1e-6).count().min(size / 2);
    let k = &full[skip..size - skip];
    let r = (k.len() / 2) as isize;
    // Horizontal pass into f32 rows.
    scratch.rows.resize(w * h * 3, 0.0);
    scratch.line.resize((w + 2 * r as usize) * 3, 0.0);
    for y in 0..h {
        let src = &pixels[y * w * 3..(y + 1) * w * 3];
        let line = &mut scratch.line;
        let pad = r as usize * 3;
        for (l, s) in line[pad..pad + w * 3].iter_mut().zip(src) {
            *l = *s as f32;
        }
        for x in (-r..0).chain(w as isize..w as isize + r) {
            let s = reflect(x, w as isize) * 3;
            let at = (x + r) as usize * 3;
            line[at..at + 3].copy_from_slice(&[
                src[s] as f32,
                src[s + 1] as f32,
                src[s + 2] as f32,
            ]);
        }
        let out = &mut scratch.rows[y * w * 3..(y + 1) * w * 3];
        out.fill(0.0);
        for (t, &kv) in k.iter().enumerate() {
            let shifted = &line[t * 3..t * 3 + w * 3];
            for (o, s) in out.iter_mut().zip(shifted) {
                *o += kv * s;
            }
        }
    }
    // Vertical pass back into the pixels.
    let stride = w * 3;
    let mut acc = vec![0.0f32; stride];
    for y in 0..h {
        acc.fill(0.0);
        for (t, &kv) in k.iter().enumerate() {
            let sy = reflect(y as isize + t as isize - r, h as isize);
            let row = &scratch.rows[sy * stride..(sy + 1) * stride];
            for (a, s) in acc.iter_mut().zip(row) {
                *a += kv * s;
            }
        }
        for (p, a) in pixels[y * stride..(y + 1) * stride].iter_mut().zip(&acc) {
            *p = to_u8(*a);
        }
    }
}
}

/// ColorJitter strengths, as torchvision's `ColorJitter(brightness, contrast, saturation, hue)`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Jitter {
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
}

/// The four colour adjustments, in the order torchvision samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ColorOp {
    Brightness(f32),
    Contrast(f32),
    Saturation(f32),
    Hue(f32),
}

impl Jitter {
    /// torchvision's `ColorJitter.get_params`: a random order of the four adjustments and a factor
    /// for each (uniform in `[1 - s, 1 + s]`, hue in `[-h, h]`); zero strengths are left out.
    pub fn sample(&self, rng: &mut impl Rng) -> Vec<ColorOp> {
        let mut order = [0usize, 1, 2, 3];
        for i in (1..4).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut factor =
            |s: f32, lo: f32| (s > 0.0).then(|| rng.random_range((1.0 - s).max(lo)..=1.0 + s));
        let b = factor(self.brightness, 0.0);
        let c = factor(self.contrast, 0.0);
        let s = factor(self.saturation, 0.0);
        let h = (self.hue > 0.0).then(|| rng.random_range(-self.hue..=self.hue));
        order
            .iter()
            .filter_map(|&i| match i {
                0 => b.map(ColorOp::Brightness),
                1 => c.map(ColorOp::Contrast),
                2 => s.map(ColorOp::Saturation),
                _ => h.map(ColorOp::Hue),
            })
            .collect()
    }
}

impl ColorOp {
    /// Applies the adjustment in place.
    pub fn apply(&self, isa: Isa, pixels: &mut [u8]) {
        match *self {
            ColorOp::Brightness(f) => adjust_brightness(isa, pixels, f),
            ColorOp::Contrast(f) => adjust_contrast(isa, pixels, f),
            ColorOp::Saturation(f) => adjust_saturation(isa, pixels, f),
            ColorOp::Hue(f) => adjust_hue(isa, pixels, f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn crop_box_is_inside_and_follows_scale() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..2000 {
            let b = random_resized_crop_box(&mut rng, 256, 341, (0.08, 1.0), (0.75, 4.0 / 3.0));
            assert!(b.top + b.height <= 256 && b.left + b.width <= 341);
            let frac = (b.height * b.width) as f32 / (256.0 * 341.0);
            assert!(frac > 0.07 && frac <= 1.0, "{frac}");
        }
        // An impossible ratio falls back to torchvision's centre crop.
        let b = random_resized_crop_box(&mut rng, 100, 400, (0.9, 1.0), (0.5, 1.0));
        assert_eq!(
            b,
            CropBox {
                top: 0,
                left: 150,
                height: 100,
                width: 100
            }
        );
    }

    #[test]
    fn simple_ops_on_known_pixels() {
        let mut px = vec![10, 200, 255, 0, 128, 127];
        solarize(Isa::active(), &mut px, 128);
        assert_eq!(px, vec![10, 55, 0, 0, 127, 127]);
        let mut px = vec![255, 0, 0, 0, 0, 255];
        grayscale(Isa::active(), &mut px);
        assert_eq!(px, vec![76, 76, 76, 29, 29, 29]);
        let mut px = vec![100, 200, 50];
        adjust_brightness(Isa::active(), &mut px, 1.5);
        assert_eq!(px, vec![150, 255, 75]);
        let mut px = vec![1, 2, 3, 4, 5, 6, 7, 8, 9];
        hflip(&mut px, 3);
        assert_eq!(px, vec![7, 8, 9, 4, 5, 6, 1, 2, 3]);
    }

    #[test]
    fn rotation_turns_clockwise_and_fills_corners_from_the_edges() {
        // A 3x3 image whose pixels are numbered row by row (grey levels 10..90).
        let src: Vec<u8> = (1..=9u8).flat_map(|v| [v * 10; 3]).collect();
        let grey = |img: &[u8]| img.chunks_exact(3).map(|p| p[0]).collect::<Vec<_>>();
        let mut out = Vec::new();
        rotate(Isa::active(), &src, 3, 0.0, &mut out);
        assert_eq!(out, src);
        // A quarter turn clockwise: the left column becomes the top row, read bottom to top.
        rotate(Isa::active(), &src, 3, 90.0, &mut out);
        assert_eq!(grey(&out), [70, 40, 10, 80, 50, 20, 90, 60, 30]);
        rotate(Isa::active(), &src, 3, -90.0, &mut out);
        assert_eq!(grey(&out), [30, 60, 90, 20, 50, 80, 10, 40, 70]);
        // An eighth of a turn: the centre stays, and the corners, whose source lies outside the
        // image, repeat edge pixels instead of turning black.
        let flat = vec![77u8; 5 * 5 * 3];
        rotate(Isa::active(), &flat, 5, 45.0, &mut out);
        assert_eq!(out, flat);
        rotate(Isa::active(), &src, 3, 45.0, &mut out);
        assert_eq!(grey(&out)[4], 50);
        assert!(grey(&out).iter().all(|&v| (10..=90).contains(&v)));
    }

    #[test]
    fn hue_full_turn_is_identity_and_half_turn_swaps_complements() {
        let orig = vec![200, 40, 40, 30, 180, 90, 50, 50, 50];
        let mut px = orig.clone();
        adjust_hue(Isa::active(), &mut px, 0.0);
        assert_eq!(px, orig);
        let mut px = vec![255, 0, 0];
        adjust_hue(Isa::active(), &mut px, 0.5);
        assert_eq!(px, vec![0, 255, 255]);
        let mut px = vec![255, 0, 0];
        adjust_hue(Isa::active(), &mut px, 1.0 / 3.0);
        assert_eq!(px, vec![0, 255, 0]);
    }

    #[test]
    fn blur_keeps_constant_images_and_mass() {
        let mut px = vec![77u8; 20 * 10 * 3];
        gaussian_blur(
            Isa::active(),
            &mut px,
            20,
            10,
            9,
            1.5,
            &mut BlurScratch::default(),
        );
        assert!(px.iter().all(|&v| v == 77));
        let k = gaussian_kernel(23, 2.0);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(k[11] > k[10] && (k[10] - k[12]).abs() < 1e-7);
    }

    #[test]
    fn jitter_samples_every_op_once_in_some_order() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let j = Jitter {
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
        };
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..100 {
            let ops = j.sample(&mut rng);
            assert_eq!(ops.len(), 4);
            firsts.insert(std::mem::discriminant(&ops[0]));
            for op in ops {
                match op {
                    ColorOp::Brightness(f) | ColorOp::Contrast(f) => {
                        assert!((0.6..=1.4).contains(&f))
                    }
                    ColorOp::Saturation(f) => assert!((0.8..=1.2).contains(&f)),
                    ColorOp::Hue(f) => assert!((-0.1..=0.1).contains(&f)),
                }
            }
        }
        assert_eq!(firsts.len(), 4, "every op comes first sometimes");
    }
}
