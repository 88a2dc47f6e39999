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

/// A borrowed RGB image: row-major, 3 bytes a pixel.
#[derive(Clone, Copy, Debug)]
pub struct RgbRef<'a> {
    pub width: u32,
    pub height: u32,
    pub pixels: &'a [u8],
}

impl RgbRef<'_> {
    /// Copies the pixels into an owned image.
    pub fn to_owned_image(&self) -> RgbImage {
        RgbImage {
            width: self.width,
            height: self.height,
            pixels: self.pixels.to_vec(),
        }
    }
}

impl RgbImage {
    /// Borrows the image.
    pub fn as_ref(&self) -> RgbRef<'_> {
        RgbRef {
            width: self.width,
            height: self.height,
            pixels: &self.pixels,
        }
    }
}

/// Decodes into a buffer it keeps, so that a worker decoding many images allocates once.
#[derive(Default)]
pub struct RgbDecoder {
    buf: Vec<u8>,
}

impl RgbDecoder {
    /// Decodes `bytes` (JPEG, PNG, WebP, BMP, GIF's first frame or TIFF) into 8-bit RGB.
    ///
    /// CMYK, grayscale, palette and 16-bit images are converted; alpha is dropped. An image over
    /// `max_pixels` is refused before its pixels are allocated.
    pub fn decode(&mut self, bytes: &[u8], max_pixels: u64) -> Result<RgbRef<'_>> {
        if bytes.is_empty() {
            return Err(Error::Decode("empty file (0 bytes)".into()));
        }
        let reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| Error::Decode(format!("cannot read: {e}")))?;
        let (width, height) = match reader.format() {
            None => {
                return Err(Error::Decode(
                    "unknown image format (not JPEG, PNG, WebP, BMP, GIF or TIFF)".into(),
                ))
            }
            Some(image::ImageFormat::Jpeg) => self.decode_jpeg(bytes, max_pixels)?,
            Some(_) => self.decode_other(reader, max_pixels)?,
        };
        Ok(RgbRef {
            width,
            height,
            pixels: &self.buf,
        })
    }

    /// JPEG straight through zune-jpeg into the kept buffer, always as RGB.
    fn decode_jpeg(&mut self, bytes: &[u8], max_pixels: u64) -> Result<(u32, u32)> {
        if !jpeg_is_complete(bytes) {
            // The decoder fills a cut-off scan with grey; Pillow refuses such files, and so do we.
            return Err(Error::Decode(
                "truncated JPEG: no end-of-image marker after the last scan".into(),
            ));
        }
        let options = zune_core::options::DecoderOptions::default()
            .jpeg_set_out_colorspace(zune_core::colorspace::ColorSpace::RGB)
            .set_strict_mode(false)
            .set_max_width(usize::MAX)
            .set_max_height(usize::MAX);
        let mut dec = zune_jpeg::JpegDecoder::new_with_options(
            zune_core::bytestream::ZCursor::new(bytes),
            options,
        );
        let jpeg_err = |e: zune_jpeg::errors::DecodeErrors| {
            Error::Decode(format!("cannot decode JPEG: {e:?}"))
        };
        dec.decode_headers().map_err(jpeg_err)?;
        let (w, h) = dec.dimensions().expect("headers decoded");
        check_size(w as u64, h as u64, max_pixels)?;
        let len = dec.output_buffer_size().expect("headers decoded");
        if len != w * h * 3 {
            return Err(Error::Decode(format!(
                "JPEG decoder would give {len} bytes for {w}x{h} RGB"
            )));
        }
        self.buf.resize(len, 0);
        dec.decode_into(&mut self.buf).map_err(jpeg_err)?;
        Ok((w as u32, h as u32))
    }

    /// Every other format through the `image` crate, converted to RGB8.
    fn decode_other(
        &mut self,
        mut reader: ImageReader<Cursor<&[u8]>>,
        max_pixels: u64,
    ) -> Result<(u32, u32)> {
        let mut limits = Limits::default();
        // Room for the largest allowed image at 16 bits x 4 channels plus the decoder's own buffers.
        limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
        reader.limits(limits);
        let decoder = reader.into_decoder().map_err(describe)?;
        let (w, h) = decoder.dimensions();
        check_size(w as u64, h as u64, max_pixels)?;
        let img = DynamicImage::from_decoder(decoder).map_err(describe)?;
        self.buf = match img {
            DynamicImage::ImageRgb8(rgb) => rgb.into_raw(),
            other => other.to_rgb8().into_raw(),
        };
        Ok((w, h))
    }
}

/// Decodes `bytes` into an owned RGB image; see [`RgbDecoder::decode`].
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage> {
    let mut decoder = RgbDecoder::default();
    let img = decoder.decode(bytes, max_pixels)?;
    Ok(RgbImage {
        width: img.width,
        height: img.height,
        pixels: decoder.buf,
    })
}

fn check_size(w: u64, h: u64, max_pixels: u64) -> Result<()> {
    if w == 0 || h == 0 {
        return Err(Error::Decode(format!("image has an empty size {w}x{h}")));
    }
    if w * h > max_pixels {
        return Err(Error::Decode(format!(
            "{w}x{h} = {} pixels exceeds the limit of {max_pixels} (raise --max-pixels if the file is trusted)",
            w * h
        )));
    }
    Ok(())
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
