//! The embedded dataset: labelled images of procedurally drawn objects, made without a download.
//!
//! Each class is a kind of shape, drawn in one colour on one background for every image; what
//! varies per image is the shape's rotation (any angle), its size and its position, plus pixel
//! noise. A backbone must learn shape to separate the classes. Nothing else varies per image on
//! purpose: a self-supervised run learns first whatever both views of an image share and the
//! augmentations do not change (per-image colours, lighting, a background ramp), and on data with
//! such nuisances a short run ends below a random backbone (BENCHMARKS.md, "Shortcuts"). The
//! same seed gives the same bytes.

use crate::error::{Error, IoContext, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::f32::consts::PI;
use std::fs;
use std::path::Path;

/// The object kinds, one per class, in class order.
pub const KINDS: &[&str] = &[
    "disk", "square", "triangle", "star", "ring", "cross", "hexagon", "crescent", "heart", "arrow",
    "ell", "bowtie",
];

/// What `loader synth` draws.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    /// Seed of every random choice.
    pub seed: u64,
    /// Number of classes (at most `KINDS.len()`).
    pub classes: usize,
    /// Images per class in `train/`.
    pub train_per_class: usize,
    /// Images per class in `val/`.
    pub val_per_class: usize,
    /// Images per class in `test/` (for reporting figures whose settings were chosen on `val/`).
    pub test_per_class: usize,
    /// Side of the square images, in pixels.
    pub size: u32,
}

/// Folder name of class `c`: its index first, so that sorted order is class order.
pub fn class_name(c: usize) -> String {
    format!("{c:02}-{}", KINDS[c])
}

/// Writes `out/<split>/<class>/<n>.png` for the splits `train`, `val` and `test` (each split's
/// images drawn from its own streams, so adding a split changes no other); returns the file count.
/// `on_image` is called once per image written.
pub fn write_dataset(spec: &SynthSpec, out: &Path, on_image: &(dyn Fn() + Sync)) -> Result<usize> {
    if spec.classes == 0 || spec.classes > KINDS.len() {
        return Err(Error::Invalid(format!(
            "--classes must be 1-{}, got {}",
            KINDS.len(),
            spec.classes
        )));
    }
    if !(16..=1024).contains(&spec.size) {
        return Err(Error::Invalid(format!(
            "--size must be 16-1024 pixels, got {}",
            spec.size
        )));
    }
    let mut jobs = Vec::new();
    for (split_id, (split, per_class)) in [
        ("train", spec.train_per_class),
        ("val", spec.val_per_class),
        ("test", spec.test_per_class),
    ]
    .into_iter()
    .enumerate()
    {
        if per_class == 0 {
            continue;
        }
        for c in 0..spec.classes {
            let dir = out.join(split).join(class_name(c));
            fs::create_dir_all(&dir).at(&dir)?;
            for i in 0..per_class {
                jobs.push((split_id as u64, c, i, dir.join(format!("{i:05}.png"))));
            }
        }
    }
    jobs.par_iter().try_for_each(|(split, c, i, path)| {
        let stream = (split << 56) | ((*c as u64) << 40) | *i as u64;
        let img = draw(spec.seed, stream, *c, spec.size);
        let tmp = crate::fsutil::temp_path(path);
        img.save_with_format(&tmp, image::ImageFormat::Png)
            .map_err(|e| Error::Invalid(format!("{}: cannot write PNG: {e}", tmp.display())))?;
        fs::rename(&tmp, path).at(path)?;
        on_image();
        Ok(())
    })?;
    Ok(jobs.len())
}

/// Colour of every object.
const OBJECT: Rgb = [0.9, 0.85, 0.3];
/// Colour of every background.
const BACKGROUND: Rgb = [0.15, 0.25, 0.45];
/// Amplitude of the uniform pixel noise, the same for every image.
const NOISE: f32 = 0.05;

/// Draws one image of class `class`; `stream` makes it differ from every other image of the seed.
pub fn draw(seed: u64, stream: u64, class: usize, size: u32) -> image::RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let s = size as f32;
    let radius = s * rng.random_range(0.25..0.4);
    let angle = rng.random_range(0.0..2.0 * PI);
    let object = Object {
        class,
        cx: rng.random_range(radius..s - radius),
        cy: rng.random_range(radius..s - radius),
        radius,
        cos: angle.cos(),
        sin: angle.sin(),
    };
    // Row by row, as the noise is drawn: the object's colour blended over the background by its
    // coverage, then noise.
    image::RgbImage::from_fn(size, size, |x, y| {
        let cover = object.coverage(x, y);
        image::Rgb(std::array::from_fn(|k| {
            let c = BACKGROUND[k] * (1.0 - cover) + OBJECT[k] * cover;
            let n = NOISE * (rng.random::<f32>() - 0.5) * 2.0;
            ((c + n).clamp(0.0, 1.0) * 255.0).round() as u8
        }))
    })
}

type Rgb = [f32; 3];

/// A class shape placed on the canvas: centre, radius and rotation.
struct Object {
    class: usize,
    cx: f32,
    cy: f32,
    radius: f32,
    cos: f32,
    sin: f32,
}

impl Object {
    /// Share of pixel (x, y) that the object covers, from 2x2 subsamples.
    fn coverage(&self, x: u32, y: u32) -> f32 {
        const OFFSETS: [(f32, f32); 4] = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)];
        let hits = OFFSETS
            .iter()
            .filter(|(ox, oy)| self.contains(x as f32 + ox, y as f32 + oy))
            .count();
        hits as f32 / 4.0
    }

    /// Whether canvas point (x, y) is inside the object.
    fn contains(&self, x: f32, y: f32) -> bool {
        let (dx, dy) = ((x - self.cx) / self.radius, (y - self.cy) / self.radius);
        let u = dx * self.cos + dy * self.sin;
        let v = -dx * self.sin + dy * self.cos;
        inside(self.class, u, v)
    }
}

fn polygon_radius(n: f32, theta: f32) -> f32 {
    // Distance to the edge of a regular n-gon of circumradius 1, in direction theta.
    let sector = 2.0 * PI / n;
    let t = theta.rem_euclid(sector) - sector / 2.0;
    (PI / n).cos() / t.cos()
}

/// The class shapes in local coordinates (within the unit disk, roughly).
fn inside(class: usize, u: f32, v: f32) -> bool {
    let r = (u * u + v * v).sqrt();
    let theta = v.atan2(u);
    match KINDS[class] {
        "disk" => r < 0.85,
        "square" => u.abs().max(v.abs()) < 0.67,
        "triangle" => r < 0.95 * polygon_radius(3.0, theta - PI / 2.0),
        "star" => {
            let inner = 0.425;
            let t = (theta * 5.0 / (2.0 * PI)).rem_euclid(1.0);
            let k = (2.0 * t - 1.0).abs();
            r < inner + (0.95 - inner) * k * k
        }
        "ring" => r < 0.85 && r > 0.525,
        "cross" => (u.abs() < 0.25 && v.abs() < 0.85) || (v.abs() < 0.25 && u.abs() < 0.85),
        "hexagon" => r < 0.85 * polygon_radius(6.0, theta),
        "crescent" => r < 0.85 && ((u - 0.4).powi(2) + v * v).sqrt() > 0.7,
        "heart" => {
            let (x, y) = (u * 1.1, -v * 1.1 + 0.25);
            let a = x * x + y * y - 0.6;
            a * a * a - x * x * y * y * y < 0.0
        }
        "arrow" => {
            let shaft = u > -0.85 && u < 0.1 && v.abs() < 0.2;
            let head = (0.1..0.85).contains(&u) && v.abs() < (0.85 - u) * 0.8;
            shaft || head
        }
        "ell" => {
            let vertical = u > -0.7 && u < -0.1 && v.abs() < 0.8;
            let foot = v > 0.2 && v < 0.8 && u > -0.7 && u < 0.7;
            vertical || foot
        }
        "bowtie" => u.abs() < 0.85 && v.abs() < u.abs() * 0.85 + 0.08,
        other => unreachable!("no shape for kind {other}"),
    }
}

/// Draws `spec` into `dir/syn` and packs its train split, at its drawn size, into `dir/shards`
/// (bilinear, 64 KiB shards, 2 threads): a small real dataset for tests and examples. Returns the
/// shard folder.
pub fn write_packed_train(
    spec: &SynthSpec,
    dir: &Path,
    encoding: crate::shard::Encoding,
) -> Result<std::path::PathBuf> {
    write_dataset(spec, &dir.join("syn"), &|| {})?;
    pack_class_folders(&dir.join("syn/train"), &dir.join("shards"), encoding)
}

/// Packs the class folders of `src` into `out` at their stored size (bilinear, 64 KiB shards, 2
/// threads), for tests and examples. Returns `out`.
pub fn pack_class_folders(
    src: &Path,
    out: &Path,
    encoding: crate::shard::Encoding,
) -> Result<std::path::PathBuf> {
    let sources = crate::source::list_class_folders(src)?;
    let options = crate::manifest::PackOptions {
        short_side: None,
        max_side: None,
        upscale: false,
        filter: crate::resize::Filter::Bilinear,
        encoding,
        quality: 90,
        max_pixels: 1 << 20,
        shard_size: 1 << 16,
    };
    let job = crate::pack::PackJob {
        sources: &sources,
        out: out.to_path_buf(),
        options,
        part: None,
        threads: 2,
    };
    crate::pack::pack(&job, &mut |_| {})?;
    Ok(out.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_covers_a_reasonable_area() {
        for (class, kind) in KINDS.iter().enumerate() {
            let n = 200;
            let hits = (0..n * n)
                .filter(|i| {
                    let (u, v) = (
                        (i % n) as f32 / n as f32 * 2.0 - 1.0,
                        (i / n) as f32 / n as f32 * 2.0 - 1.0,
                    );
                    inside(class, u, v)
                })
                .count();
            let area = hits as f32 / (n * n) as f32;
            assert!(
                (0.1..0.8).contains(&area),
                "{kind} covers {area} of its box"
            );
        }
    }

    #[test]
    fn every_pixel_blends_the_one_palette() {
        // Within the noise, each pixel lies between the background and the object colour: no
        // image gets colours of its own, which a short self-supervised run would learn first.
        let tolerance = NOISE * 3f32.sqrt() + 1.0 / 255.0;
        for stream in 0..20 {
            let img = draw(0, stream, stream as usize % KINDS.len(), 48);
            let mut covered = 0;
            for p in img.pixels() {
                let c: Rgb = std::array::from_fn(|k| p.0[k] as f32 / 255.0);
                let d: Rgb = std::array::from_fn(|k| OBJECT[k] - BACKGROUND[k]);
                let t = (0..3).map(|k| (c[k] - BACKGROUND[k]) * d[k]).sum::<f32>()
                    / (0..3).map(|k| d[k] * d[k]).sum::<f32>();
                let t = t.clamp(0.0, 1.0);
                let off = (0..3)
                    .map(|k| (c[k] - BACKGROUND[k] - t * d[k]).powi(2))
                    .sum::<f32>()
                    .sqrt();
                assert!(
                    off <= tolerance,
                    "stream {stream}: pixel {c:?} off the palette"
                );
                covered += usize::from(t > 0.5);
            }
            let share = covered as f32 / (48 * 48) as f32;
            assert!(
                (0.03..0.5).contains(&share),
                "stream {stream}: object covers {share}"
            );
        }
    }

    #[test]
    fn same_seed_same_pixels_different_stream_different_pixels() {
        let a = draw(7, 1, 3, 48);
        assert_eq!(a, draw(7, 1, 3, 48));
        assert_ne!(a, draw(7, 2, 3, 48));
        assert_ne!(a, draw(8, 1, 3, 48));
    }
}
