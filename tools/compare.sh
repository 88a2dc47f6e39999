#!/usr/bin/env bash
# Side by side on one labelled dataset, one recipe: our MaskDeep, our BYOL and the random backbone
# they start from, over a list of seeds. Prints kNN (k=20) top-1 on val after every epoch, and
# each method's gain over its own random initialisation (mean and sample std over the seeds);
# with REPORT=test the final backbones are also scored on test (choose on val, report on test).
# Usage: tools/compare.sh SHARDS [OUT]
#   SHARDS holds packed train/, val/ (and test/) shards, e.g. from tools/fetch-real-data.sh.
#   SEEDS="0 1 2"   the seeds (default 0 1 2)
#   RECIPE="..."     --set values shared by both methods (default: the recipe below)
#   EXTRA_MASKDEEP="--set targets=cross"   extra options of the MaskDeep runs only (an ablation)
#   METHODS="maskdeep"   which of `maskdeep byol torch-byol` to run (default `maskdeep byol`)
#   TRAINER=PATH   a trainer binary to use instead of building target/release/trainer
# torch-byol: tools/byol_torch_reference.py, an independent PyTorch BYOL, on the image folders the
# shards were packed from, with the same recipe written as its flags:
#   IMAGES=DIR   train/, val/ (and test/) class folders of image files (e.g. tools/fetch-real-data.sh)
#   PYTHON=PATH  a Python with torch and torchvision (default python3)
#   TORCH_RECIPE="..."   its flags (default: the recipe below); give it whenever RECIPE changes
set -euo pipefail
cd "$(dirname "$0")/.."
shards=$(realpath "$1")
out=$(realpath -m "${2:-compare-out}")
seeds=${SEEDS:-0 1 2}
# Quarter-width ResNet-18 with the small stem, 5 epochs of batch 128 at 32 px, heads 1024/128,
# SGD 0.1 (per 256) momentum 0.9, weight decay 1e-5, constant rate, no warmup, EMA 0.99 -> 1.
recipe=${RECIPE:---set width=0.25 --set image_size=32 --set batch_size=128 --set proj_hidden=1024
    --set pred_hidden=1024 --set proj_dim=128 --set optimizer=sgd --set lr=0.1 --set momentum=0.9
    --set weight_decay=1e-5 --set lr_final=1 --set warmup_epochs=0 --set ema_base=0.99
    --set ema_final=1 --set epochs=5}
torch_recipe=${TORCH_RECIPE:---width 16 --size 32 --batch 128 --hidden 1024 --dim 128 --optimizer sgd
    --lr 0.1 --momentum 0.9 --weight-decay 1e-5 --schedule constant --ema 0.99 --epochs 5}
trainer=${TRAINER:-target/release/trainer}
[ -n "${TRAINER:-}" ] || cargo build --release --bin trainer
mkdir -p "$out"
knn() { # BACKBONE_ARGS... -- SPLIT: prints top-1
    local args=("$@"); local split=${args[-1]}; unset 'args[-1]'
    "$trainer" eval knn "${args[@]}" --train "$shards/train" --val "$shards/$split" --k 20 --json 2>/dev/null |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["knn"][0]["top1"])'
}
for seed in $seeds; do
    for method in ${METHODS:-maskdeep byol}; do
        run="$out/$method-seed$seed"
        if [ "$method" = torch-byol ]; then
            [ -n "${IMAGES:-}" ] || { echo "torch-byol needs IMAGES=DIR (the class folders)" >&2; exit 2; }
            test_flag=()
            [ "${REPORT:-val}" = test ] && test_flag=(--test)
            # shellcheck disable=SC2086
            "${PYTHON:-python3}" tools/byol_torch_reference.py "$IMAGES" $torch_recipe --seed "$seed" \
                "${test_flag[@]}" >"$run.log" 2>&1 || { tail -5 "$run.log"; exit 1; }
            line=$(tail -n 1 "$run.log" | python3 -c '
import json, sys
d = json.load(sys.stdin)
line = "random %s, per epoch %s" % (d["random_val"], " ".join("%.2f" % v for v in d["per_epoch"]))
if "final_test" in d:
    line += "; test: random %s, final %s" % (d["random_test"], d["final_test"])
print(line)')
            echo "$method seed $seed: $line" | tee -a "$out/results.txt"
            continue
        fi
        extra=()
        [ "$method" = maskdeep ] && read -ra extra <<<"${EXTRA_MASKDEEP:-}"
        rm -rf "$run"
        # shellcheck disable=SC2086
        "$trainer" pretrain --preset "$method-r18-small" --data "$shards/train" --val "$shards/val" \
            --out "$run" $recipe --set seed="$seed" --set knn_every=1 --set knn_per_class=0 \
            --set checkpoint_every=0 "${extra[@]}" --json >"$run.log" 2>&1 ||
            { tail -5 "$run.log"; exit 1; }
        random=$(knn --random --config "$run/config.json" val)
        curve=$(python3 -c '
import json, sys
print(" ".join("%.2f" % json.loads(l)["knn_top1"] for l in open(sys.argv[1]) if "knn_top1" in l))' \
            "$run/metrics.jsonl")
        line="$method seed $seed: random $random, per epoch $curve"
        if [ "${REPORT:-val}" = test ]; then
            line="$line; test: random $(knn --random --config "$run/config.json" test), final $(knn --checkpoint "$run" test)"
        fi
        echo "$line" | tee -a "$out/results.txt"
    done
done
# Gain of the last epoch over the random start, per method.
grep -h "seed" "$out/results.txt" | awk '
    { m = $1; r = $5; sub(",", "", r); g = $NF - r
      if (index($0, "; test:")) { split($0, t, "; test: random "); split(t[2], u, ", final "); g = u[2] - u[1] }
      n[m]++; s[m] += g; ss[m] += g * g; all[m] = all[m] sprintf(" %+.2f", g) }
    END { for (m in n) { mean = s[m] / n[m]; var = (n[m] > 1) ? (ss[m] - n[m] * mean * mean) / (n[m] - 1) : 0
          printf "%s: gain over random%s  mean %+.2f  std %.2f\n", m, all[m], mean, sqrt(var > 0 ? var : 0) } }'
