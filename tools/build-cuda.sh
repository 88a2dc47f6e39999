#!/usr/bin/env bash
# Cross-builds the CUDA trainer (and loader) on a machine without a GPU, then bundles them for the
# GPU machine. Usage: tools/build-cuda.sh [toolkit|build|bundle|all]   (default: all)
#
# - toolkit: installs the pinned CUDA 13.0 compiler, headers and libraries from PyPI into
#   $CUDA_CACHE (default ~/.cache/maskdeep-cuda, outside the repo), adds the unversioned library
#   links and a link-time stub for the driver library (libcuda.so belongs to the driver).
# - build: `cargo build --release` with `--features cuda` and with `--features cudnn`, each with
#   `nccl` for data-parallel runs (and each variant's op test binaries, `cargo test --no-run`) into
#   $CUDA_TARGET (default ~/.cache/maskdeep-cuda/target; it stores absolute paths, keep it in place).
# - bundle: writes carry/cuda-bundle.tar.xz (binaries + tools/gpu-check.sh) into the repo's ignored
#   `carry/` folder, ready to travel to the GPU machine.
# Versions are pinned to what PyTorch 2.11 cu130 ships, so the carried binary finds matching libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
CACHE=${CUDA_CACHE:-$HOME/.cache/maskdeep-cuda}
PREFIX=$CACHE/toolkit
ROOT=$PREFIX/nvidia/cu13
TARGET=${CUDA_TARGET:-$CACHE/target}

toolkit() {
    if [ -x "$ROOT/bin/nvcc" ] && [ -f "$ROOT/lib/stubs/libcuda.so" ] && [ -f "$ROOT/lib/libnccl.so" ]; then
        echo "toolkit: already in $ROOT"; return
    fi
    # pip --target does not merge into an existing tree: an incomplete toolkit is installed anew.
    rm -rf "$PREFIX"
    python3 -m pip install --quiet --no-deps --target "$PREFIX" \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 \
        nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35 nvidia-cudnn-cu13==9.19.0.56 \
        nvidia-nccl-cu13==2.28.9
    # cuDNN and NCCL ship in their own folders; bring their headers and libraries into the one root.
    for extra in cudnn nccl; do
        if [ -d "$PREFIX/nvidia/$extra" ]; then
            cp -rn "$PREFIX/nvidia/$extra/include/." "$ROOT/include/"
            cp -rn "$PREFIX/nvidia/$extra/lib/." "$ROOT/lib/"
        fi
    done
    (
        cd "$ROOT/lib"
        for lib in cudart cublas cublasLt curand nvrtc cudnn nccl; do
            versioned=$(ls lib$lib.so.* 2>/dev/null | sort | head -n 1 || true)
            [ -n "$versioned" ] && ln -sf "$versioned" "lib$lib.so"
        done
    )
    ln -sfn lib "$ROOT/lib64"
    # Link-time stub for the driver API: every cu* symbol cudarc's bindings name, SONAME libcuda.so.1.
    local sys
    sys=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19*/src/driver/sys 2>/dev/null | head -n 1 || true)
    if [ -z "$sys" ]; then
        cargo fetch --quiet
        sys=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19*/src/driver/sys | head -n 1)
    fi
    mkdir -p "$ROOT/lib/stubs"
    grep -rhoE 'pub (unsafe )?fn cu[A-Za-z0-9_]+' "$sys" | sed -E 's/.*fn //' | sort -u |
        sed -E 's/(.*)/void \1(void) {}/' >"$ROOT/lib/stubs/cuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib/stubs/libcuda.so" "$ROOT/lib/stubs/cuda_stub.c"
    echo "toolkit: ready in $ROOT"
}

cuda_env() {
    export CUDA_HOME=$ROOT CUDA_PATH=$ROOT CUDA_ROOT=$ROOT CUDNN_LIB=$ROOT/lib
    export PATH=$ROOT/bin:$PATH
    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
    export LIBRARY_PATH=$ROOT/lib:$ROOT/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
    export CPATH=$ROOT/include${CPATH:+:$CPATH}
}

build() {
    cuda_env
    for feature in cuda cudnn; do
        # One target folder for both: the CUDA kernels (most of the build) are compiled once.
        cargo build --release --features "$feature nccl" -p trainer --target-dir "$TARGET/gpu"
        mkdir -p "$TARGET/bin"
        cp "$TARGET/gpu/release/trainer" "$TARGET/bin/trainer-$feature"
        # The op tests of this variant (they run each op on the GPU when one is present).
        mkdir -p "$TARGET/bin/tests-$feature"
        cargo test --release --no-run --features "$feature nccl" -p trainer --target-dir "$TARGET/gpu" \
            --test ops \
            --message-format=json |
            python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])' |
            while read -r name exe; do cp "$exe" "$TARGET/bin/tests-$feature/$name"; done
    done
    cargo build --release -p loader --target-dir "$TARGET/gpu"
    cp "$TARGET/gpu/release/loader" "$TARGET/bin/loader"
}

bundle() {
    local stage_dir
    stage_dir=$(mktemp -d)
    mkdir -p "$stage_dir/bundle" carry
    cp "$TARGET/bin/trainer-cuda" "$TARGET/bin/trainer-cudnn" "$TARGET/bin/loader" "$stage_dir/bundle/"
    cp -r "$TARGET/bin/tests-cuda" "$TARGET/bin/tests-cudnn" "$stage_dir/bundle/"
    strip "$stage_dir/bundle/"* "$stage_dir/bundle/"tests-*/* 2>/dev/null || true
    cp tools/gpu-check.sh tools/bench_torch_step.py tools/gpu_summary.py tools/bf16_torch_reference.py "$stage_dir/bundle/"
    tar -C "$stage_dir" -cJf carry/cuda-bundle.tar.xz.tmp bundle
    mv carry/cuda-bundle.tar.xz.tmp carry/cuda-bundle.tar.xz
    rm -rf "$stage_dir"
    ls -l carry/cuda-bundle.tar.xz
}

case "$stage" in
    toolkit) toolkit ;;
    build) build ;;
    bundle) bundle ;;
    all) toolkit; build; bundle ;;
    *) echo "usage: $0 [toolkit|build|bundle|all]" >&2; exit 2 ;;
esac
