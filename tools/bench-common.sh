# Shared by tools/bench-step.sh and tools/bench-convs.sh, sourced from the repository root: the
# settings both read (PYTHON, THREADS, TRAINER, SHAPES; see their headers), the trainer binary,
# and the two shapes of issue 23.
python=${PYTHON:-python3}
threads=${THREADS:-2}
shapes=${SHAPES:-r18 demo}
if [ -z "${TRAINER:-}" ]; then
  cargo build --release -q -p trainer
  TRAINER=target/release/trainer
fi
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads

# `trainer bench` (and `trainer bench convs`) arguments of a shape, r18 or demo; the heads' settings
# matter to the step only.
ours_args() {
  case $1 in
    r18) echo "--preset byol-r18-imagenet --batch 32 --size 64" ;;
    demo) echo "--preset byol-r18-small --set width=0.25 --set proj_hidden=512 \
      --set pred_hidden=512 --set proj_dim=128 --set optimizer=sgd --batch 64 --size 32" ;;
    *) echo "unknown shape '$1' (r18 or demo)" >&2; exit 2 ;;
  esac
}

# The CPU, its cores and the threads both programs use.
cpu_line() {
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores, $threads threads"
}
