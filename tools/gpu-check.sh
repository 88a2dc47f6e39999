#!/usr/bin/env bash
# Every check of the CUDA trainer on the GPU machine, in one run (about 7-8 minutes); ends with a
# short table. Needs carry/cuda-bundle.tar.xz (tools/build-cuda.sh) and carry/photos/ (a few JPEGs)
# in the repository; the machine needs the NVIDIA driver and PyTorch (cu13) for its libraries and
# the reference step.
#   tools/gpu-check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$out"
work=$(mktemp -d)
log="$out/gpu-check.log"
: >"$log"
# Each result is appended to the table as soon as it is known (a cut-short run keeps what it got).
printf '| check | result |\n|---|---|\n' >"$out/table.md"
row() { printf '| %s | %s |\n' "$1" "$2" | tee -a "$out/table.md"; }
note() { echo "== $*" | tee -a "$log"; }

tar -C "$work" -xJf carry/cuda-bundle.tar.xz
bin=$work/bundle
nv=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')
export LD_LIBRARY_PATH="$nv/cu13/lib:$nv/cudnn/lib:$nv/cublas/lib:$nv/nccl/lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
row "GPU" "$gpu"

# 0. The op tests of both builds: every op on the GPU against its CPU kernel and reference.
for t in cuda cudnn; do
    for test in "$bin/tests-$t"/*; do
        name=$(basename "$test")
        note "op tests $name ($t build)"
        if NVIDIA_TF32_OVERRIDE=0 timeout 120 "$test" --nocapture >"$work/test-$t-$name" 2>&1; then
            row "op tests $name ($t)" "$(grep -E '^test result' "$work/test-$t-$name" | tail -n 1)"
        else
            row "op tests $name ($t)" "FAILED: $(grep -E 'panicked|^test .* FAILED' "$work/test-$t-$name" | head -n 2 | tr '\n' ' ')"
        fi
        cat "$work/test-$t-$name" >>"$log"
    done
done

# 1. Parity: CPU f32 vs CUDA f32 and bf16. TF32 off (cuDNN and cuBLAS would otherwise round f32
# convolutions and matmuls to 10-bit mantissas); the throughput runs below keep it, as PyTorch does.
for t in cuda cudnn; do
    note "parity ($t build)"
    if NVIDIA_TF32_OVERRIDE=0 timeout 120 "$bin/trainer-$t" parity --device cuda >"$work/parity-$t" 2>&1; then :; fi
    cat "$work/parity-$t" | tee -a "$log"
    while read -r line; do
        case "$line" in parity*) row "parity $t $(echo "$line" | awk '{print $3}' | tr -d :)" \
            "$(echo "$line" | sed -E 's/^parity [^ ]+ [^ ]+: //')";; esac
    done <"$work/parity-$t"
done
# bf16's own cost on the same kind of step, for reading the bf16 rows.
row "pytorch resnet18 bf16 autocast vs f32" \
    "$(timeout 60 python3 tools/bf16_torch_reference.py --device cuda 2>>"$log" || echo FAILED)"
# The benchmarks use the cuDNN build when its f32 parity passes.
t=cuda
grep -q "f32: .*PASS" "$work/parity-cudnn" && t=cudnn
note "benchmarks use trainer-$t"

# 2. Short pretrain on shards packed from real photos, stopped and resumed; every step logged (the
# ImageNet presets log every 20) for the table's per-step figures.
note "pack photos"
"$bin/loader" pack carry/photos --unlabelled --out "$work/shards" --short-side 256 --threads 16 2>&1 | tail -n 1 | tee -a "$log"
note "pretrain (trainer-$t): 40 steps, stopped at 25 and resumed"
common=(--preset maskdeep-r18-imagenet --data "$work/shards" --out "$work/run" --device cuda
    --set batch_size=64 --set max_steps=40 --set warmup_epochs=0.5 --set threads=16 --set checkpoint_every=0
    --set log_every=1 --json)
timeout 200 "$bin/trainer-$t" pretrain "${common[@]}" --stop-after 25 2>&1 | tail -n 2 | tee -a "$log"
timeout 150 "$bin/trainer-$t" pretrain "${common[@]}" --resume 2>&1 | tail -n 2 | tee -a "$log"
if [ -f "$work/run/metrics.jsonl" ]; then
    cp "$work/run/metrics.jsonl" "$out/pretrain-metrics.jsonl"
    row "pretrain r18 224px b64 (40 steps, resumed)" "$(python3 tools/gpu_summary.py pretrain "$work/run/metrics.jsonl")"
    ls "$work/run/checkpoints" | tee -a "$log"
else
    row "pretrain" "FAILED (see log)"
fi

# 2b. Data-parallel through NCCL (issue 19): one process, then one rank of a torchrun-style group
# of one, then (where PyTorch's NCCL allows two ranks on one GPU, 2.30+) two ranks sharing the
# GPU, each against the plain run's losses.
note "data-parallel (trainer-$t)"
dp=(--preset maskdeep-r18-imagenet --data "$work/shards" --device cuda --set batch_size=64
    --set max_steps=8 --set warmup_epochs=0.5 --set threads=8 --set checkpoint_every=0 --set log_every=1 --json)
ranks() { # world, out: starts `world` ranks on GPU 0 and waits for them
    local world=$1 dir=$2 pids=() r
    for r in $(seq 0 $((world - 1))); do
        NCCL_MULTI_RANK_GPU_ENABLE=1 RANK=$r WORLD_SIZE=$world LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 \
            MASTER_PORT=29517 timeout 150 "$bin/trainer-$t" pretrain "${dp[@]}" --out "$dir" \
            >>"$log" 2>&1 &
        pids+=($!)
    done
    local rc=0
    for r in "${pids[@]}"; do wait "$r" || rc=1; done
    return $rc
}
timeout 150 "$bin/trainer-$t" pretrain "${dp[@]}" --out "$work/dp-plain" >>"$log" 2>&1
for world in 1 2; do
    if ranks "$world" "$work/dp-$world"; then
        row "NCCL $world rank(s) on 1 GPU vs one process, r18 b64, 8 steps" \
            "$(python3 tools/gpu_summary.py same-run "$work/dp-plain/metrics.jsonl" "$work/dp-$world/metrics.jsonl")"
    else
        row "NCCL $world rank(s) on 1 GPU" "did not run: $(grep -iE 'nccl|error' "$log" | tail -n 1)"
    fi
done

# 3. Throughput: trainer bench vs the PyTorch step, and the input pipeline on all cores.
bench() { # label, args...
    local label=$1; shift
    local json
    json=$(timeout 100 "$bin/trainer-$t" bench --device cuda --steps 3 --json "$@" 2>>"$log" | tail -n 1)
    echo "$label $json" >>"$log"
    if [ -z "$json" ] && tail -n 30 "$log" | grep -q OUT_OF_MEMORY; then
        row "$label" "out of GPU memory"
    else
        row "$label" "$(echo "$json" | python3 tools/gpu_summary.py bench)"
    fi
}
torch_step() { # label, args...
    local label=$1; shift
    row "$label" "$(timeout 120 python3 tools/bench_torch_step.py --device cuda --steps 5 "$@" 2>>"$log" | python3 tools/gpu_summary.py torch)"
}
note "throughput"
bench "maskdeep r50 224 b64 bf16" --preset maskdeep-r50-imagenet --batch 64 --set bf16=true --groups 1,8
torch_step "pytorch r50 224 b64 bf16 channels_last" --arch resnet50 --size 224 --batch 64 --bf16 --channels-last
bench "maskdeep r50 224 b64 fp32" --preset maskdeep-r50-imagenet --batch 64 --groups 1
bench "maskdeep r50 224 b128 bf16" --preset maskdeep-r50-imagenet --batch 128 --set bf16=true --groups 1
torch_step "pytorch r50 224 b128 bf16 channels_last" --arch resnet50 --size 224 --batch 128 --bf16 --channels-last
bench "maskdeep r50 224 b256 bf16 (the preset's batch)" --preset maskdeep-r50-imagenet --batch 256 --set bf16=true
bench "maskdeep r18 224 b128 bf16" --preset maskdeep-r18-imagenet --batch 128 --set bf16=true --groups 1
torch_step "pytorch r18 224 b128 bf16 channels_last" --arch resnet18 --size 224 --batch 128 --bf16 --channels-last
v=$("$bin/loader" bench "$work/shards" --preset byol --threads 16 --samples 2048 --repeats 1 --json 2>>"$log" | python3 tools/gpu_summary.py loader)
row "input pipeline byol 224, 16 threads" "$v"
# 4. The streamed kNN at ResNet-50's width on the GPU (issue 20: peak host memory stays small).
v=$(timeout 120 "$bin/trainer-$t" bench knn --train 200000 --val 10000 --dim 2048 --device cuda 2>>"$log" || echo FAILED)
row "kNN 200k x 10k x 2048 (cuda)" "${v#*: }"

echo
cat "$out/table.md"
rm -rf "$work"
