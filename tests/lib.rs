//! Helpers for the end-to-end tests: locate and run the built binaries, make small datasets.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The path of a workspace binary built by the same `cargo test` run (`target/<profile>/NAME`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile folder");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is not built: run the tests with `cargo test --workspace`",
        path.display()
    );
    path
}

/// Runs `loader ARGS...` and returns its output.
pub fn loader(args: &[&str]) -> Output {
    Command::new(bin("loader"))
        .args(args)
        .output()
        .expect("run loader")
}

/// Runs `loader ARGS...`, panicking with its stderr unless it succeeds.
pub fn loader_ok(args: &[&str]) -> Output {
    let out = loader(args);
    assert!(
        out.status.success(),
        "loader {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The stdout of a command as one JSON value.
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Draws a small embedded dataset into `dir` (train and val splits).
pub fn synth(dir: &Path, classes: usize, per_class: usize, size: u32) {
    let (c, n, s) = (classes.to_string(), per_class.to_string(), size.to_string());
    loader_ok(&[
        "synth",
        "--out",
        p(dir),
        "--classes",
        &c,
        "--train-per-class",
        &n,
        "--val-per-class",
        "3",
        "--test-per-class",
        "2",
        "--size",
        &s,
        "--seed",
        "5",
    ]);
}

/// A path as `&str` for command lines.
pub fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Every file in `dir` with its bytes, sorted by name.
pub fn folder_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Writes `count` photo-like JPEGs (quality 90, 4:2:0 chroma, odd sizes of 300-500 px a side)
/// named `0000.jpg`, ... into `dir` and returns their paths. Each image blends smooth colour
/// gradients, a few hard-edged discs and fine deterministic grain, so that the decoder's and the
/// resizer's work on it resembles their work on a real photo; everything is made here, so the
/// tests read nothing outside the repository.
pub fn write_photo_like_jpegs(dir: &Path, count: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).expect("photo folder");
    (0..count)
        .map(|i| {
            let (w, h) = (301 + 37 * i as u32 % 200, 317 + 53 * i as u32 % 180);
            let mut pixels = Vec::with_capacity((w * h * 3) as usize);
            let mut grain = 0x9e37_79b9u32.wrapping_mul(i as u32 + 1);
            for y in 0..h {
                for x in 0..w {
                    let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
                    let disc =
                        |cx: f32, cy: f32, r: f32| (fx - cx).powi(2) + (fy - cy).powi(2) < r * r;
                    let inside = disc(0.3 + 0.05 * i as f32, 0.4, 0.2) || disc(0.7, 0.65, 0.12);
                    grain ^= grain << 13;
                    grain ^= grain >> 17;
                    grain ^= grain << 5;
                    let noise = (grain % 24) as f32 - 12.0;
                    let base = [
                        90.0 + 120.0 * fx + 30.0 * (9.0 * fy).sin(),
                        60.0 + 150.0 * fy * (1.0 - fx),
                        140.0 + 80.0 * (6.0 * fx + 4.0 * fy).cos(),
                    ];
                    for (ch, v) in base.iter().enumerate() {
                        let v = if inside {
                            255.0 - v * (0.5 + 0.2 * ch as f32)
                        } else {
                            *v
                        };
                        pixels.push((v + noise).clamp(0.0, 255.0) as u8);
                    }
                }
            }
            let img = shared::decode::RgbImage::new(w, h, pixels).expect("sized pixels");
            let jpeg = shared::pack::encode_jpeg(&img, 90).expect("encodable size");
            let path = dir.join(format!("{i:04}.jpg"));
            std::fs::write(&path, jpeg).expect("write photo");
            path
        })
        .collect()
}
