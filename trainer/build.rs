//! With the `cuda` feature, compiles each op family's CUDA kernels (`src/ops/<family>/cuda.cu`)
//! to PTX in `OUT_DIR/<family>.ptx`, which the family's `cuda.rs` embeds. nvcc comes from
//! `CUDA_HOME`'s `bin/` or the `PATH` (`tools/build-cuda.sh` sets both); the PTX targets
//! `compute_$CUDA_COMPUTE_CAP` (default 80), which the driver compiles for newer GPUs too.
//! CPU builds run nothing here.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // The folder, so that a new family's kernels are found.
    println!("cargo:rerun-if-changed=src/ops");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|home| Path::new(&home).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let families = std::fs::read_dir("src/ops").expect("src/ops is readable");
    for family in families {
        let dir = family.expect("src/ops entry").path();
        let source = dir.join("cuda.cu");
        if !source.exists() {
            continue;
        }
        println!("cargo:rerun-if-changed={}", source.display());
        let name = dir.file_name().expect("a folder name").to_string_lossy();
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&source)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} ({e}): the `cuda` feature needs nvcc; \
                     tools/build-cuda.sh installs it and sets CUDA_HOME",
                    nvcc.display()
                )
            });
        assert!(status.success(), "nvcc failed on {}", source.display());
    }
}
