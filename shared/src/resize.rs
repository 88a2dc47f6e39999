//! Resizing decoded images with `fast_image_resize` (SIMD, antialiased convolution).

use crate::decode::{RgbImage, RgbRef};
use crate::error::{Error, Result};
use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

/// The convolution filter used when resizing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filter {
    /// Triangle filter with antialiasing (torchvision's default for `Resize`).
    Bilinear,
    /// Catmull-Rom cubic (Pillow's `BICUBIC`).
    Bicubic,
    /// Lanczos3 (Pillow's `LANCZOS`).
    Lanczos,
}

impl Filter {
    /// The `fast_image_resize` algorithm of this filter.
    pub fn resize_alg(self) -> ResizeAlg {
        ResizeAlg::Convolution(match self {
            Filter::Bilinear => FilterType::Bilinear,
            Filter::Bicubic => FilterType::CatmullRom,
            Filter::Lanczos => FilterType::Lanczos3,
        })
    }
}

/// Which output size an image gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SizePolicy {
    /// Target length of the shorter side; `None` keeps the decoded size.
    pub short_side: Option<u32>,
    /// Upper bound on the longer side, applied after `short_side`.
    pub max_side: Option<u32>,
    /// Whether an image smaller than the target may be enlarged.
    pub upscale: bool,
}

impl SizePolicy {
    /// The output size for an input of `width` x `height`, with the aspect ratio kept and the
    /// long side truncated as torchvision's `Resize(size, max_size)` does.
    pub fn output_size(&self, width: u32, height: u32) -> (u32, u32) {
        let (short, long) = (width.min(height) as u64, width.max(height) as u64);
        let (mut new_short, mut new_long) = (short, long);
        // Without `upscale`, an image already no larger than the target keeps its size.
        let target = self.short_side.map(u64::from);
        if let Some(s) = target.filter(|&s| self.upscale || s <= short) {
            new_short = s;
            new_long = s * long / short;
        }
        if let Some(m) = self.max_side.map(u64::from) {
            if new_long > m {
                new_short = m * new_short / new_long;
                new_long = m;
            }
        }
        let (new_short, new_long) = (new_short.max(1) as u32, new_long.max(1) as u32);
        if width <= height {
            (new_short, new_long)
        } else {
            (new_long, new_short)
        }
    }
}

/// Resizes RGB images, keeping the resizer's scratch buffers between calls.
#[derive(Default)]
pub struct RgbResizer {
    resizer: Resizer,
}

impl RgbResizer {
    /// Resizes `img` to `width` x `height` with `filter` (a plain copy when the size already matches).
    pub fn resize(
        &mut self,
        img: RgbRef,
        width: u32,
        height: u32,
        filter: Filter,
    ) -> Result<RgbImage> {
        if (img.width, img.height) == (width, height) {
            return Ok(img.to_owned_image());
        }
        let src = ImageRef::new(img.width, img.height, img.pixels, PixelType::U8x3)
            .map_err(|e| Error::Invalid(format!("resize source: {e}")))?;
        let mut dst = Image::new(width, height, PixelType::U8x3);
        self.resizer
            .resize(
                &src,
                &mut dst,
                &ResizeOptions::new().resize_alg(filter.resize_alg()),
            )
            .map_err(|e| Error::Invalid(format!("resize: {e}")))?;
        RgbImage::new(width, height, dst.into_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_side_policy() {
        let p = SizePolicy {
            short_side: Some(256),
            max_side: None,
            upscale: false,
        };
        assert_eq!(p.output_size(500, 410), (312, 256));
        assert_eq!(p.output_size(410, 500), (256, 312));
        assert_eq!(
            p.output_size(200, 100),
            (200, 100),
            "never upscale unless asked"
        );
        let up = SizePolicy { upscale: true, ..p };
        assert_eq!(up.output_size(200, 100), (512, 256));
        let capped = SizePolicy {
            max_side: Some(300),
            ..p
        };
        assert_eq!(capped.output_size(1000, 500), (300, 150));
        assert_eq!(
            capped.output_size(100, 400),
            (75, 300),
            "max side applies to small images too"
        );
        let keep = SizePolicy {
            short_side: None,
            max_side: None,
            upscale: false,
        };
        assert_eq!(keep.output_size(123, 45), (123, 45));
    }

    #[test]
    fn resize_of_constant_image_stays_constant() {
        let img = RgbImage::new(40, 30, [7u8, 100, 250].repeat(40 * 30)).unwrap();
        let out = RgbResizer::default()
            .resize(img.as_ref(), 17, 11, Filter::Bilinear)
            .unwrap();
        assert_eq!((out.width, out.height), (17, 11));
        assert!(out.pixels.chunks(3).all(|p| p == [7, 100, 250]));
    }
}
