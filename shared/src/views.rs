//! Multi-view specifications (BYOL, multi-crop and small-image presets) and the function that
//! turns one decoded image into one augmented view.

use crate::augment::{self, BlurScratch, Jitter};
use crate::cpu::Isa;
use crate::decode::RgbRef;
use crate::error::{Error, Result};
use crate::resize::Filter;
use fast_image_resize::Resizer;
use rand::Rng;
use std::time::{Duration, Instant};

/// How one view is made: crop, resize and the random augmentations with their probabilities.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ViewSpec {
    /// Output side in pixels (views are square).
    pub size: u32,
    /// RandomResizedCrop area fraction range.
    pub scale: (f32, f32),
    /// RandomResizedCrop aspect-ratio range.
    pub ratio: (f32, f32),
    /// Resize filter of the crop (torchvision BYOL recipes use bicubic).
    pub filter: Filter,
    /// Largest rotation in degrees: each view turns by an angle drawn uniformly from
    /// [-rotation, rotation] (0: none, BYOL's recipe). For data without an upright, such as
    /// aerial, microscopy or the embedded synthetic shapes, whose orientation both views would
    /// otherwise share.
    #[serde(default)]
    pub rotation: f32,
    /// Probability of a horizontal flip.
    pub flip_p: f32,
    /// ColorJitter strengths.
    pub jitter: Jitter,
    /// Probability of applying ColorJitter.
    pub jitter_p: f32,
    /// Probability of RandomGrayscale.
    pub gray_p: f32,
    /// Probability of GaussianBlur.
    pub blur_p: f32,
    /// GaussianBlur sigma range.
    pub blur_sigma: (f32, f32),
    /// GaussianBlur kernel size (odd); BYOL uses 23 at 224 px.
    pub blur_kernel: usize,
    /// Probability of Solarize (threshold 128).
    pub solarize_p: f32,
}

/// BYOL's colour jitter strengths.
pub const BYOL_JITTER: Jitter = Jitter {
    brightness: 0.4,
    contrast: 0.4,
    saturation: 0.2,
    hue: 0.1,
};

impl ViewSpec {
    /// A BYOL global view of `size` px with the given blur and solarize probabilities.
    pub fn byol(size: u32, blur_p: f32, solarize_p: f32) -> Self {
        ViewSpec {
            size,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            filter: Filter::Bicubic,
            rotation: 0.0,
            flip_p: 0.5,
            jitter: BYOL_JITTER,
            jitter_p: 0.8,
            gray_p: 0.2,
            blur_p,
            blur_sigma: (0.1, 2.0),
            // About a tenth of the view, odd: 23 at 224 px.
            blur_kernel: ((size as f32 * 0.1) as usize) | 1,
            solarize_p,
        }
    }

    /// Checks ranges and probabilities.
    pub fn validate(&self) -> Result<()> {
        let p_ok = |p: f32| (0.0..=1.0).contains(&p);
        let ok = self.size >= 8
            && 0.0 < self.scale.0
            && self.scale.0 <= self.scale.1
            && self.scale.1 <= 1.0
            && 0.0 < self.ratio.0
            && self.ratio.0 <= self.ratio.1
            && [
                self.flip_p,
                self.jitter_p,
                self.gray_p,
                self.blur_p,
                self.solarize_p,
            ]
            .into_iter()
            .all(p_ok)
            && self.blur_kernel % 2 == 1
            && 0.0 < self.blur_sigma.0
            && self.blur_sigma.0 <= self.blur_sigma.1
            && (0.0..=0.5).contains(&self.jitter.hue)
            && (0.0..=180.0).contains(&self.rotation);
        if ok {
            Ok(())
        } else {
            Err(Error::Invalid(format!("invalid view spec {self:?}: sizes >= 8, ranges lo <= hi, probabilities in [0, 1], odd blur kernel, hue <= 0.5, rotation in [0, 180]")))
        }
    }
}

/// The names [`preset`] knows, for `--help` texts.
pub const PRESETS: &[&str] = &["byol", "multicrop", "byol-small", "multicrop-small"];

/// The views of a named preset. `byol`: two asymmetric 224 px global views (blur p 1.0 / 0.1,
/// solarize p 0.0 / 0.2); `multicrop`: `byol` plus six 96 px local views (scale 0.05-0.14);
/// `-small`: the same for 32-96 px data (64 px global, 32 px local views, no blur).
pub fn preset(name: &str) -> Result<Vec<ViewSpec>> {
    let local = |size: u32, blur_p: f32| ViewSpec {
        scale: (0.05, 0.14),
        ..ViewSpec::byol(size, blur_p, 0.0)
    };
    let views = match name {
        "byol" => vec![ViewSpec::byol(224, 1.0, 0.0), ViewSpec::byol(224, 0.1, 0.2)],
        "multicrop" => {
            let mut v = preset("byol")?;
            v.extend(std::iter::repeat_n(local(96, 0.5), 6));
            v
        }
        "byol-small" => vec![ViewSpec::byol(64, 0.0, 0.0), ViewSpec::byol(64, 0.0, 0.2)],
        "multicrop-small" => {
            let mut v = preset("byol-small")?;
            v.extend(std::iter::repeat_n(local(32, 0.0), 6));
            v
        }
        other => {
            return Err(Error::Invalid(format!(
                "unknown view preset `{other}`; known: {}",
                PRESETS.join(", ")
            )))
        }
    };
    Ok(views)
}

/// Time spent in each stage of making views, for `loader bench`.
#[derive(Clone, Copy, Debug, Default)]
pub struct StageTimes {
    pub read: Duration,
    pub decode: Duration,
    /// Crop, resize and (when the spec asks for it) rotation.
    pub crop_resize: Duration,
    pub colour: Duration,
    pub blur: Duration,
    pub collate: Duration,
}

impl StageTimes {
    /// Adds another set of times.
    pub fn add(&mut self, o: &StageTimes) {
        self.read += o.read;
        self.decode += o.decode;
        self.crop_resize += o.crop_resize;
        self.colour += o.colour;
        self.blur += o.blur;
        self.collate += o.collate;
    }

    /// (name, time) for each stage, in pipeline order.
    pub fn stages(&self) -> [(&'static str, Duration); 6] {
        [
            ("read", self.read),
            ("decode", self.decode),
            ("crop+resize", self.crop_resize),
            ("colour", self.colour),
            ("blur", self.blur),
            ("collate", self.collate),
        ]
    }
}

/// A worker's reusable buffers for making views.
#[derive(Default)]
pub struct ViewWorkspace {
    resizer: Resizer,
    view: Vec<u8>,
    rotated: Vec<u8>,
    blur: BlurScratch,
}

/// How a view lands in the batch.
pub enum ViewOut<'a> {
    /// 8-bit CHW (normalisation happens on the device).
    U8(&'a mut [u8]),
    /// Normalised f32 CHW: `(v / 255 - mean[c]) / std[c]`.
    F32(&'a mut [f32], [f32; 3], [f32; 3]),
}

impl ViewOut<'_> {
    /// The same destination, borrowed for one call.
    pub fn reborrow(&mut self) -> ViewOut<'_> {
        match self {
            ViewOut::U8(d) => ViewOut::U8(d),
            ViewOut::F32(d, mean, std) => ViewOut::F32(d, *mean, *std),
        }
    }
}

/// Makes one view of `src` with the parameters drawn from `rng`, writing it CHW into `out`.
pub fn make_view(
    src: RgbRef,
    spec: &ViewSpec,
    rng: &mut impl Rng,
    ws: &mut ViewWorkspace,
    out: ViewOut,
    times: &mut StageTimes,
) -> Result<()> {
    let isa = Isa::active();
    let mut t = Instant::now();
    let mut lap = |slot: &mut Duration| {
        let now = Instant::now();
        *slot += now - t;
        t = now;
    };
    // Parameters are drawn in torchvision's transform order, whether or not each op applies.
    let crop = augment::random_resized_crop_box(rng, src.height, src.width, spec.scale, spec.ratio);
    augment::crop_resize(
        &mut ws.resizer,
        src,
        crop,
        spec.size,
        spec.filter,
        &mut ws.view,
    )?;
    if spec.rotation > 0.0 {
        let degrees = rng.random_range(-spec.rotation..=spec.rotation);
        augment::rotate(isa, &ws.view, spec.size, degrees, &mut ws.rotated);
        std::mem::swap(&mut ws.view, &mut ws.rotated);
    }
    lap(&mut times.crop_resize);
    let px = &mut ws.view[..];
    if rng.random::<f32>() < spec.flip_p {
        augment::hflip(px, spec.size);
    }
    if rng.random::<f32>() < spec.jitter_p {
        for op in spec.jitter.sample(rng) {
            op.apply(isa, px);
        }
    }
    if rng.random::<f32>() < spec.gray_p {
        augment::grayscale(isa, px);
    }
    lap(&mut times.colour);
    if rng.random::<f32>() < spec.blur_p {
        let sigma = rng.random_range(spec.blur_sigma.0..=spec.blur_sigma.1);
        augment::gaussian_blur(
            isa,
            px,
            spec.size,
            spec.size,
            spec.blur_kernel,
            sigma,
            &mut ws.blur,
        );
    }
    lap(&mut times.blur);
    if rng.random::<f32>() < spec.solarize_p {
        augment::solarize(isa, px, 128);
    }
    lap(&mut times.colour);
    match out {
        ViewOut::U8(dst) => hwc_to_chw(isa, px, dst),
        ViewOut::F32(dst, mean, std) => {
            let (scale, shift) = normalising_affine(mean, std);
            normalise_to_chw(isa, px, dst, scale, shift);
        }
    }
    lap(&mut times.collate);
    Ok(())
}

crate::multiversion! {
    /// Interleaved RGB pixels (HWC) into three planes (CHW); `chw` holds as many bytes as `hwc`.
    pub fn hwc_to_chw(hwc: &[u8], chw: &mut [u8]) {
        let plane = hwc.len() / 3;
        let (r, gb) = chw.split_at_mut(plane);
        let (g, b) = gb.split_at_mut(plane);
        for (i, p) in hwc.chunks_exact(3).enumerate() {
            r[i] = p[0];
            g[i] = p[1];
            b[i] = p[2];
        }
    }
}

crate::multiversion! {
    /// Interleaved RGB pixels (HWC) into three f32 planes (CHW), channel `c` mapped by
    /// `v * scale[c] - shift[c]` ([`normalising_affine`]).
    fn normalise_to_chw(hwc: &[u8], chw: &mut [f32], scale: [f32; 3], shift: [f32; 3]) {
        let plane = hwc.len() / 3;
        for (i, p) in hwc.chunks_exact(3).enumerate() {
            for c in 0..3 {
                chw[c * plane + i] = p[c] as f32 * scale[c] - shift[c];
            }
        }
    }
}

/// The per-channel `(scale, shift)` with which `v * scale - shift` maps an 8-bit value `v` to
/// `(v / 255 - mean) / std`: the one definition of the input normalisation, on the host or the
/// device.
pub fn normalising_affine(mean: [f32; 3], std: [f32; 3]) -> ([f32; 3], [f32; 3]) {
    (
        std::array::from_fn(|c| 1.0 / (255.0 * std[c])),
        std::array::from_fn(|c| mean[c] / std[c]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_asymmetric() {
        for name in PRESETS {
            for v in preset(name).unwrap() {
                v.validate().unwrap();
            }
        }
        let byol = preset("byol").unwrap();
        assert_eq!(
            (
                byol[0].blur_p,
                byol[0].solarize_p,
                byol[1].blur_p,
                byol[1].solarize_p
            ),
            (1.0, 0.0, 0.1, 0.2)
        );
        assert_eq!(byol[0].blur_kernel, 23);
        let mc = preset("multicrop").unwrap();
        assert_eq!(mc.len(), 8);
        assert_eq!((mc[7].size, mc[7].scale), (96, (0.05, 0.14)));
        assert!(preset("nope").is_err());
    }

    #[test]
    fn same_rng_same_view() {
        use rand::SeedableRng;
        let pixels: Vec<u8> = (0..80 * 60 * 3).map(|i| (i * 7 % 251) as u8).collect();
        let src = RgbRef {
            width: 80,
            height: 60,
            pixels: &pixels,
        };
        let make = |spec: &ViewSpec, seed| {
            let mut out = vec![0u8; 3 * 32 * 32];
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut ws = ViewWorkspace::default();
            make_view(
                src,
                spec,
                &mut rng,
                &mut ws,
                ViewOut::U8(&mut out),
                &mut StageTimes::default(),
            )
            .unwrap();
            out
        };
        let spec = ViewSpec::byol(32, 0.5, 0.5);
        assert_eq!(make(&spec, 1), make(&spec, 1));
        assert_ne!(make(&spec, 1), make(&spec, 2));
        let turned = ViewSpec {
            rotation: 90.0,
            ..spec.clone()
        };
        turned.validate().unwrap();
        assert_eq!(make(&turned, 1), make(&turned, 1));
        assert_ne!(make(&turned, 1), make(&spec, 1));
        let too_far = ViewSpec {
            rotation: 270.0,
            ..spec
        };
        assert!(too_far.validate().is_err());
    }
}
