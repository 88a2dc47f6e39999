//! Decoding image files of any common format into 8-bit RGB, as Pillow's `convert("RGB")` does.
//!
//! The format is detected from the bytes, not the file name. The image's size is read from its
//! header and checked against a pixel limit before any pixel buffer is allocated.

use crate::error::{Error, Result};
use image::{DynamicImage, ImageDecoder, ImageReader, Limits};
use std::io::Cursor;

/// Default limit on width x height, against decompression bombs (Pillow warns at 89 Mpx).
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;

/// A decoded image: row-major RGB, 3 bytes a pixel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// Wraps pixels, checking that their count matches the size.
    pub fn new(width: u32, height: u32, pixels: Vec<u8>) -> Result<Self> {
        if pixels.len() as u64 != width as u64 * height as u64 * 3 {
            return Err(Error::Invalid(format!(
                "{width}x{height} RGB needs {} bytes, got {}",
                width as u64 * height as u64 * 3,
                pixels.len()
            )));
        }
        Ok(RgbImage {
            width,
            height,
            pixels,
        })
    }
}

/// Decodes `bytes` (JPEG, PNG, WebP, BMP, GIF's first frame or TIFF) into 8-bit RGB.
///
/// CMYK, grayscale, palette and 16-bit images are converted; alpha is dropped. An image over
/// `max_pixels` is refused before its pixels are allocated.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Decode(format!("cannot read: {e}")))?;
    if reader.format().is_none() {
        return Err(Error::Decode(
            "unknown image format (not JPEG, PNG, WebP, BMP, GIF or TIFF)".into(),
        ));
    }
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_is_complete(bytes) {
        // The JPEG decoder fills a cut-off scan with grey; Pillow refuses such files, and so do we.
        return Err(Error::Decode(
            "truncated JPEG: no end-of-image marker after the last scan".into(),
        ));
    }
    let mut limits = Limits::default();
    // Room for the largest allowed image at 16 bits x 4 channels plus the decoder's own buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(describe)?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::Decode(format!("image has an empty size {w}x{h}")));
    }
    if w as u64 * h as u64 > max_pixels {
        return Err(Error::Decode(format!(
            "{w}x{h} = {} pixels exceeds the limit of {max_pixels} (raise --max-pixels if the file is trusted)",
            w as u64 * h as u64
        )));
    }
    let img = DynamicImage::from_decoder(decoder).map_err(describe)?;
    let rgb = match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    };
    RgbImage::new(w, h, rgb.into_raw())
}

/// Whether an end-of-image marker (`FF D9`) follows the last start-of-scan marker (`FF DA`).
/// Inside entropy-coded data every `FF` byte is followed by `00` or a restart marker, so neither
/// pattern can appear there by chance; scanning back from the end finds EOI first in a whole file.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    for w in bytes.windows(2).rev() {
        match w {
            [0xFF, 0xD9] => return true,
            [0xFF, 0xDA] => return false,
            _ => {}
        }
    }
    false
}

fn describe(e: image::ImageError) -> Error {
    Error::Decode(format!("cannot decode: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(img: DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn gray16_and_rgba_become_rgb8() {
        let g =
            image::ImageBuffer::from_fn(3, 2, |x, y| image::Luma([(x * 20000 + y * 1000) as u16]));
        let out = decode_rgb(&png(DynamicImage::ImageLuma16(g)), 1000).unwrap();
        assert_eq!((out.width, out.height), (3, 2));
        // 16-bit 20000 -> 8-bit round(20000 / 257) = 78, replicated over the three channels.
        assert_eq!(&out.pixels[3..6], &[78, 78, 78]);

        let rgba = image::RgbaImage::from_fn(2, 2, |x, _| image::Rgba([10 * x as u8, 20, 30, 0]));
        let out = decode_rgb(&png(DynamicImage::ImageRgba8(rgba)), 1000).unwrap();
        assert_eq!(
            out.pixels,
            vec![0, 20, 30, 10, 20, 30, 0, 20, 30, 10, 20, 30]
        );
    }

    #[test]
    fn pixel_limit_refuses_before_decoding() {
        let img = DynamicImage::new_rgb8(100, 100);
        let err = decode_rgb(&png(img), 9_999).unwrap_err().to_string();
        assert!(err.contains("exceeds the limit"), "{err}");
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        assert!(decode_rgb(b"hello world, not an image", DEFAULT_MAX_PIXELS).is_err());
        let bytes = png(DynamicImage::new_rgb8(64, 64));
        assert!(decode_rgb(&bytes[..bytes.len() / 2], DEFAULT_MAX_PIXELS).is_err());
        assert!(decode_rgb(&[], DEFAULT_MAX_PIXELS).is_err());
    }
}
