#!/usr/bin/env bash
# The main job, end to end, on the embedded dataset (no download): build, draw the dataset,
# pack train, val and test into shards, verify them, profile the input pipeline, pretrain
# MaskDeep and BYOL (ResNet-18, small stem, CPU), compare their kNN accuracy with a random
# backbone on the test split (the settings were chosen on val, which is shown beside it) and plot
# loss and kNN accuracy over training (OUT_DIR/training.png).
# Usage: tools/demo.sh [OUT_DIR]   (default: demo-out; DEMO_SEED=S trains with seed S, default 0)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-demo-out}

echo "== building (release)"
cargo build --release --bins
loader=target/release/loader

echo "== drawing the embedded dataset into $out/data"
"$loader" synth --out "$out/data" --seed 0

echo "== packing train, val and test into shards"
for split in train val test; do
    "$loader" pack "$out/data/$split" --out "$out/$split" --short-side 64
done

echo "== verifying every checksum"
for split in train val test; do "$loader" verify "$out/$split"; done

"$loader" inspect "$out/train"
"$loader" inspect "$out/train" --dump 0 --to "$out/record0.png"
echo "== profiling the multi-view input pipeline on the train shards"
"$loader" bench "$out/train" --preset byol-small --samples 256 --repeats 1

trainer=target/release/trainer
# Short CPU runs: a quarter-width ResNet-18 on 32 px views, AdamW (LARS needs long schedules) at
# a constant learning rate (lr_final=1: a short run that decays its rate learns little), every
# view turned by a random angle (rotation=180: the shapes come at any angle, and without it both
# views of an image share the shape's orientation, which a short run learns instead of the shape).
# targets=all (each view also predicts its own target, the paper's reading): the setting of the
# README's seeds table, and ahead of the small-image default (cross-view targets) on the shapes,
# though far behind it on MNIST (BENCHMARKS.md, issue 22).
run=(--set width=0.25 --set image_size=32 --set batch_size=64 --set proj_hidden=512
    --set pred_hidden=512 --set proj_dim=128 --set epochs="${DEMO_EPOCHS:-16}" --set warmup_epochs=0.5
    --set rotation=180 --set targets=all
    --set optimizer=adamw --set lr=0.008 --set lr_final=1 --set weight_decay=1e-4
    --set checkpoint_every=0 --set knn_every=4 --set seed="${DEMO_SEED:-0}")
for method in maskdeep byol; do
    echo "== pretraining $method (ResNet-18, small stem) on $out/train"
    rm -rf "$out/$method"
    "$trainer" pretrain --preset "$method-r18-small" --data "$out/train" --val "$out/val" \
        --out "$out/$method" "${run[@]}"
done

echo "== kNN evaluation on the test split, val beside it (features extracted once per backbone)"
mkdir -p "$out/features"
for name in maskdeep byol random; do
    if [ "$name" = random ]; then
        backbone=(--random --preset maskdeep-r18-small "${run[@]}")
    else
        backbone=(--checkpoint "$out/$name")
    fi
    for split in train val test; do
        "$trainer" eval features "${backbone[@]}" --data "$out/$split" \
            --out "$out/features/$name-$split.feat" >/dev/null
    done
    for split in test val; do
        printf '%s: ' "$split"
        "$trainer" eval knn --train "$out/features/$name-train.feat" \
            --val "$out/features/$name-$split.feat" --k 20,200 | paste -sd ' ' -
    done
done | tee "$out/results.txt"

echo "== plotting loss and kNN accuracy over training"
random_top1=$(sed -nE 's/^val: random .*k=20: top-1 ([0-9.]+)%.*/\1/p' "$out/results.txt")
"$trainer" plot --run "MaskDeep=$out/maskdeep" --run "BYOL=$out/byol" \
    --reference "random backbone=$random_top1" --out "$out/training.png"
echo "== done: shards in $out/train, $out/val and $out/test, runs in $out/maskdeep and $out/byol, kNN results in $out/results.txt, plot in $out/training.png"
