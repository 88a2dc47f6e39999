#!/usr/bin/env bash
# Pack throughput on real photos against Pillow decode + resize, in the same run.
# Usage: tools/bench-pack.sh [PHOTOS_DIR] [REPEATS]   (default ../shared/data/photos, 5)
# Needs python3 with Pillow (pip install pillow). Prints median images/s and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
photos=${1:-../shared/data/photos}
repeats=${2:-5}
cargo build --release --bins -q
loader=target/release/loader
# Shards go to memory (tmpfs) when there is one, so the figures compare decode+resize+write work
# with Pillow's decode+resize rather than this machine's disk speed.
tmp=$(mktemp -d -p "$( [ -d /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")")
trap 'rm -rf "$tmp"' EXIT

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
rate() { python3 -c 'import json,sys; print(json.load(sys.stdin)["images_per_second"])'; }

run_loader() { # threads encoding
  for _ in $(seq "$repeats"); do
    rm -rf "$tmp/out"
    "$loader" pack "$photos" --unlabelled --out "$tmp/out" --threads "$1" --encoding "$2" --json | rate
  done | median
}

cores=$(nproc)
pil=$(python3 tools/bench_pillow.py "$photos" --repeats "$repeats" | rate)
raw1=$(run_loader 1 raw)
rawn=$(run_loader "$cores" raw)
jpg1=$(run_loader 1 jpeg)
echo "output folder: $tmp ($(df --output=fstype "$tmp" | tail -1)); $(nproc) cores; $(date -u +%F)"
printf '%-44s %10s %8s\n' "pipeline (short side 256, $(ls "$photos" | wc -l) photos)" "images/s" "ratio"
printf '%-44s %10.1f %8s\n' "Pillow decode+resize, 1 thread" "$pil" "1.00"
printf '%-44s %10.1f %8.2f\n' "loader pack raw, 1 thread" "$raw1" "$(echo "$raw1 / $pil" | bc -l)"
printf '%-44s %10.1f %8.2f\n' "loader pack jpeg q90, 1 thread" "$jpg1" "$(echo "$jpg1 / $pil" | bc -l)"
printf '%-44s %10.1f %8.2f\n' "loader pack raw, $cores threads" "$rawn" "$(echo "$rawn / $pil" | bc -l)"
