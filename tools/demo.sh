#!/usr/bin/env bash
# The main job, end to end, on the embedded dataset (no download): build, draw the dataset,
# pack train and val into shards, verify them, profile the input pipeline, pretrain MaskDeep and
# BYOL (ResNet-18, small stem, CPU), compare their kNN accuracy with a random backbone and plot
# loss and kNN accuracy over training (OUT_DIR/training.png).
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

trainer=target/release/trainer
# Short CPU runs: a quarter-width ResNet-18 on 32 px views, AdamW (LARS needs long schedules) at
# a constant learning rate (lr_final=1: a short run that decays its rate learns little), every
# view turned by a random angle (rotation=180: the shapes come at any angle, and without it both
# views of an image share the shape's orientation, which a short run learns instead of the shape).
run=(--set width=0.25 --set image_size=32 --set batch_size=64 --set proj_hidden=512
    --set pred_hidden=512 --set proj_dim=128 --set epochs="${DEMO_EPOCHS:-16}" --set warmup_epochs=0.5
    --set rotation=180
    --set optimizer=adamw --set lr=0.008 --set lr_final=1 --set weight_decay=1e-4
    --set checkpoint_every=0 --set knn_every=4)
for method in maskdeep byol; do
    echo "== pretraining $method (ResNet-18, small stem) on $out/train"
    rm -rf "$out/$method"
    "$trainer" pretrain --preset "$method-r18-small" --data "$out/train" --val "$out/val" \
        --out "$out/$method" "${run[@]}"
done

echo "== kNN evaluation on the val split"
knn() { "$trainer" eval knn --train "$out/train" --val "$out/val" --k 20,200 "$@"; }
{
    knn --checkpoint "$out/maskdeep"
    knn --checkpoint "$out/byol"
    knn --random --preset maskdeep-r18-small "${run[@]}"
} | tee "$out/results.txt"

echo "== plotting loss and kNN accuracy over training"
random_top1=$(sed -nE 's/^random .*k=20: top-1 ([0-9.]+)%.*/\1/p' "$out/results.txt")
"$trainer" plot --run "MaskDeep=$out/maskdeep" --run "BYOL=$out/byol" \
    --reference "random backbone=$random_top1" --out "$out/training.png"
echo "== done: shards in $out/train and $out/val, runs in $out/maskdeep and $out/byol, kNN results in $out/results.txt, plot in $out/training.png"
