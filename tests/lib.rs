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

/// The reference photos shipped beside the repository (`../shared/data/photos`).
pub fn photos_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/photos");
    assert!(
        dir.is_dir(),
        "{} is missing: the tests read real photos from it",
        dir.display()
    );
    dir
}
