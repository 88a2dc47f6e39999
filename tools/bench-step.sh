#!/usr/bin/env bash
# The CPU training step against PyTorch's, in the same run: `trainer bench` and
# tools/bench_torch_step.py on the two shapes of issue 23, rounds alternated, so that a noisy
# host slows both sides of a round alike. Prints the CPU, each round's views/s and ratio, and the
# median of the per-round ratios (the figure to report).
# Usage: tools/bench-step.sh [ROUNDS]   (default 7)
#   PYTHON=PATH    a Python with torch and torchvision (default python3); one from PyPI:
#                  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch torchvision
#   THREADS=N      threads for both programs (default 2)
#   TRAINER=PATH   a trainer binary to use instead of building target/release/trainer
#   SHAPES="r18 demo"   which shapes: r18 (ResNet-18, 64 px, batch 32) and demo (the demo's
#                  quarter-width ResNet-18 with small stem and heads, 32 px, batch 64)
# MASKDEEP_ISA (ours) and ATEN_CPU_CAPABILITY / DNNL_MAX_CPU_ISA (PyTorch's) pass through, to
# narrow the instruction sets; gemm inside ours still picks the widest the CPU has.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-7}
source tools/bench-common.sh

torch_args() {
  case $1 in
    r18) echo "--arch resnet18 --size 64 --batch 32" ;;
    demo) echo "--small-stem --width 0.25 --size 32 --batch 64 --hidden 512 --dim 128" ;;
  esac
}
rate() { "$python" -c 'import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["views_per_second"])'; }

isa=$("$TRAINER" bench $(ours_args demo) --steps 1 --json | "$python" -c \
  'import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(r["instruction_set"], "(ours:", r["kernels"] + ")")')
torch_isa=$("$python" -c 'import torch; print(torch.__version__, torch.backends.cpu.get_cpu_capability())')
cpu_line
echo "instruction set: $isa; PyTorch $torch_isa"
for shape in $shapes; do
  read -r -a ours <<<"$(ours_args "$shape")"
  read -r -a theirs <<<"$(torch_args "$shape")"
  ratios=()
  for r in $(seq "$rounds"); do
    a=$("$TRAINER" bench "${ours[@]}" --steps 8 --json | rate)
    b=$("$python" tools/bench_torch_step.py "${theirs[@]}" --steps 8 --threads "$threads" | rate)
    ratio=$("$python" -c "print(f'{$a / $b:.3f}')")
    ratios+=("$ratio")
    printf '%s round %d: ours %.1f views/s, PyTorch %.1f, ratio %s\n' "$shape" "$r" "$a" "$b" "$ratio"
  done
  median=$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')
  echo "$shape: median of the per-round ratios ours / PyTorch: $median"
done
