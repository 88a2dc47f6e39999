#!/usr/bin/env bash
# Input pipeline (byol preset) against torchvision's BYOL transform, in the same run.
# Usage: tools/bench-views.sh [PHOTOS_DIR] [PYTHON]
#   PYTHON: an interpreter with torch, torchvision and Pillow (default python3), for example
#   python3 -m venv /root/tv && /root/tv/bin/pip install torch torchvision pillow
# Packs the photos (short side 256, raw) to tmpfs, runs `loader bench` (median of 5) and
# tools/bench_torchvision.py (one thread, median of 3), and prints both and the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
photos=${1:-../shared/data/photos}
python=${2:-python3}
cargo build --release --bins -q
loader=target/release/loader
tmp=$(mktemp -d -p "$( [ -d /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")")
trap 'rm -rf "$tmp"' EXIT
"$loader" pack "$photos" --unlabelled --out "$tmp/shards" --short-side 256 2>/dev/null
"$loader" bench "$tmp/shards" --preset byol --samples 256 --repeats 5
ours=$("$loader" bench "$tmp/shards" --preset byol --samples 256 --repeats 5 --threads 1 --json |
  "$python" -c 'import json,sys; print(json.load(sys.stdin)["samples_per_second"])')
ref=$("$python" tools/bench_torchvision.py "$photos" --samples 128 --repeats 3 |
  "$python" -c 'import json,sys; print(json.load(sys.stdin)["samples_per_second"])')
echo "date $(date -u +%F), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
printf '%-46s %12s %8s\n' "byol, 2 views of 224 px, 1 thread" "samples/s" "ratio"
printf '%-46s %12.1f %8s\n' "torchvision BYOL transform (PIL)" "$ref" "1.00"
printf '%-46s %12.1f %8.2f\n' "loader bench (raw shards)" "$ours" "$(echo "$ours / $ref" | bc -l)"
