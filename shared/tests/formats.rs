//! Every awkward-but-valid format decodes like Pillow's `convert("RGB")`, and every broken file
//! gives an error, never a panic. Fixtures come from `tools/make_fixtures.py`.

use shared::decode::{decode_rgb, DEFAULT_MAX_PIXELS};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/formats")
}

fn files(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(fixtures().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// Largest per-channel difference and mean absolute difference between two RGB buffers.
fn diff(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len());
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0);
    let sum: u64 = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y) as u64).sum();
    (max, sum as f64 / a.len() as f64)
}

#[test]
fn valid_formats_match_pillow() {
    let valid = files("valid");
    assert!(
        valid.len() >= 15,
        "fixtures missing: run tools/make_fixtures.py"
    );
    for path in valid {
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        let got = decode_rgb(&std::fs::read(&path).unwrap(), DEFAULT_MAX_PIXELS)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let expected = fixtures().join("expected").join(format!("{name}.png"));
        let want = image::open(&expected).unwrap().to_rgb8();
        assert_eq!((got.width, got.height), want.dimensions(), "{name}");
        let want = if name == "png_gray16" {
            // Pillow clips 16-bit values to 255; we scale them (v / 257), as the image crate does.
            let g = image::open(path).unwrap().to_luma16();
            g.pixels()
                .flat_map(|p| [(p.0[0] as f64 / 257.0).round() as u8; 3])
                .collect()
        } else {
            want.into_raw()
        };
        let (max, mean) = diff(&got.pixels, &want);
        // JPEG decoders may round IDCT and chroma upsampling differently; the rest is lossless.
        let (max_ok, mean_ok) = if name.starts_with("jpeg") {
            (4, 0.5)
        } else {
            (0, 0.0)
        };
        eprintln!("{name}: max diff {max}, mean {mean:.3}");
        assert!(
            max <= max_ok && mean <= mean_ok,
            "{name}: max diff {max}, mean {mean:.3} vs Pillow"
        );
    }
}

#[test]
fn broken_files_are_errors_not_panics() {
    let broken = files("broken");
    assert!(broken.len() >= 5);
    for path in broken {
        let bytes = std::fs::read(&path).unwrap();
        let result = decode_rgb(&bytes, DEFAULT_MAX_PIXELS);
        assert!(result.is_err(), "{} decoded but is broken", path.display());
    }
}
