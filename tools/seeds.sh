#!/usr/bin/env bash
# The demo's kNN table over training seeds 0-4: runs tools/demo.sh once per seed (same dataset,
# seed S for the networks' initialisation, the views and the masks) into OUT_DIR/seed-S, then
# prints kNN (k=20) top-1 on the test split and on val for MaskDeep, BYOL and the random backbone
# of every seed, with the mean and the sample standard deviation over the seeds.
# Usage: tools/seeds.sh [OUT_DIR]   (default: demo-seeds; SEEDS="0 1 2 3 4" to choose them)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-demo-seeds}
seeds=${SEEDS:-0 1 2 3 4}
mkdir -p "$out"
for seed in $seeds; do
    echo "== seed $seed (log: $out/seed-$seed.log)"
    start=$SECONDS
    DEMO_SEED=$seed tools/demo.sh "$out/seed-$seed" >"$out/seed-$seed.log" 2>&1 ||
        { tail -20 "$out/seed-$seed.log"; exit 1; }
    echo "demo with seed $seed: $((SECONDS - start)) s"
    cat "$out/seed-$seed/results.txt"
done

# results.txt lines: "SPLIT: MODEL ...: kNN k=20: top-1 X%  top-5 Y% MODEL ...: kNN k=200: ..."
for seed in $seeds; do
    sed -nE "s/^(test|val): (maskdeep|byol|random)[^:]*: kNN k=20: top-1 ([0-9.]+)%.*/$seed \2 \1 \3/p" \
        "$out/seed-$seed/results.txt"
done | awk '
    { v[$2 " " $3] = v[$2 " " $3] " " $4; seen[$1] = 1 }
    END {
        n = split("maskdeep byol random", models, " ")
        printf "| backbone | split | kNN k=20 top-1 per seed | mean | std |\n|---|---|---|---:|---:|\n"
        for (m = 1; m <= n; m++) {
            for (s = 1; s <= 2; s++) {
                split_name = (s == 1) ? "test" : "val"
                k = models[m] " " split_name
                c = split(v[k], xs, " ")
                sum = 0; for (i = 1; i <= c; i++) sum += xs[i]
                mean = sum / c; ss = 0
                for (i = 1; i <= c; i++) ss += (xs[i] - mean) ^ 2
                std = (c > 1) ? sqrt(ss / (c - 1)) : 0
                printf "| %s | %s |%s | %.1f | %.1f |\n", models[m], split_name, v[k], mean, std
            }
        }
    }'
