#!/usr/bin/env bash
# The CPU step's convolutions against PyTorch's, layer by layer, in the same run: `trainer bench
# convs` and tools/bench_torch_convs.py on the same shapes, rounds alternated. Prints, for each
# distinct convolution, the median over the rounds of PyTorch's time / ours (above 1: ours is
# faster) for the forward and the backward, and the same for all the backbone's convolutions.
# Where tools/bench-step.sh shows a shortfall, this shows which layers hold it.
# Usage: tools/bench-convs.sh [ROUNDS]   (default 5)
#   PYTHON=PATH    a Python with torch (default python3); see tools/bench-step.sh
#   THREADS=N      threads for both programs (default 2)
#   TRAINER=PATH   a trainer binary to use instead of building target/release/trainer
#   SHAPES="r18 demo"   which backbones: r18 (ResNet-18, 64 px, 64 images: batch 32, two views)
#                  and demo (the demo's quarter-width ResNet-18 with small stem, 32 px, 128 images)
# MASKDEEP_ISA (ours) and ATEN_CPU_CAPABILITY / DNNL_MAX_CPU_ISA (PyTorch's) pass through, to
# narrow the instruction sets, as in tools/bench-step.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
source tools/bench-common.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cpu_line
for shape in $shapes; do
  read -r -a ours <<<"$(ours_args "$shape")"
  for r in $(seq "$rounds"); do
    "$TRAINER" bench convs "${ours[@]}" --json >"$work/$shape-$r-ours.json"
    "$python" tools/bench_torch_convs.py "$work/$shape-$r-ours.json" --threads "$threads" \
      >"$work/$shape-$r-torch.json"
    echo "$shape round $r done"
  done
  "$python" - "$work" "$shape" "$rounds" <<'EOF'
import json, statistics, sys
work, shape, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
load = lambda side, r: json.load(open(f"{work}/{shape}-{r}-{side}.json"))
runs = [(load("ours", r), load("torch", r)) for r in range(1, rounds + 1)]
first, torch_first = runs[0]
print(f"{shape}: {first['convs']['images']} images; ours: {first['preset']}, kernels on "
      f"{first['kernels']}; PyTorch: {torch_first['library']}, {torch_first['instruction_set']}")
print("c_in  side  c_out  k  stride  count   forward: ours ms  PyTorch ms  ratio"
      "   backward: ours ms  PyTorch ms  ratio")
med = statistics.median
for i, layer in enumerate(first["convs"]["layers"]):
    cols = []
    for key in ("forward_ms", "backward_ms"):
        o = [a["convs"]["layers"][i][key] for a, _ in runs]
        t = [b["convs"]["layers"][i][key] for _, b in runs]
        cols.append(f"{med(o):17.2f}  {med(t):10.2f}  {med(y / x for x, y in zip(o, t)):5.2f}")
    print(f"{layer['c_in']:4}  {layer['side']:4}  {layer['c_out']:5}  {layer['k']}  "
          f"{layer['stride']:6}  {layer['count']:5}  {cols[0]}  {cols[1]}")
for key in ("forward_ms", "backward_ms"):
    ratios = [b["convs"][key] / a["convs"][key] for a, b in runs]
    print(f"{shape} all convolutions, {key[:-3]}: median over {rounds} rounds of PyTorch's time "
          f"/ ours: {med(ratios):.3f} (rounds {', '.join(f'{x:.2f}' for x in ratios)})")
EOF
done
