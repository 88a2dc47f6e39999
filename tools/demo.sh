#!/usr/bin/env bash
# The main job, end to end, on the embedded dataset (no download): build, draw the dataset,
# pack train and val into shards, verify them and show what they hold.
# Usage: tools/demo.sh [OUT_DIR]   (default: demo-out)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-demo-out}

echo "== building (release)"
cargo build --release --bins
loader=target/release/loader

echo "== drawing the embedded dataset into $out/data"
"$loader" synth --out "$out/data" --seed 0

echo "== packing train and val into shards"
"$loader" pack "$out/data/train" --out "$out/train" --short-side 64
"$loader" pack "$out/data/val" --out "$out/val" --short-side 64

echo "== verifying every checksum"
"$loader" verify "$out/train"
"$loader" verify "$out/val"

"$loader" inspect "$out/train"
"$loader" inspect "$out/train" --dump 0 --to "$out/record0.png"
echo "== profiling the multi-view input pipeline on the train shards"
"$loader" bench "$out/train" --preset byol-small --samples 256 --repeats 1

echo "== done: shards in $out/train and $out/val"
