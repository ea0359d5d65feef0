#!/usr/bin/env bash
# The whole CUDA path in one call (< 10 minutes on one H200), from the repository root:
#   1. environment (GPU, torch, Triton)      4. speech-commands KWT-1 training fed by DataLoader
#   2. CUDA tests (compiled Triton kernels,     workers vs in process: examples/s, data wait,
#      AMP steps per recipe, NCCL)             GPU busy (CUDA events), NVML and nvidia-smi load
#   3. Triton CoPE vs FlashAttention, bf16,  5. feed-only batch rate on the CPU cores
#      T = 1k-16k: time and peak memory      6. a summary (scripts/gpu_summary.py)
# Outputs go to $OUT if set, else results/gpu/check-STAMP/ (generated data and caches go to a
# temporary folder). Creates .venv (make install) if missing. Every step has a time limit and
# the whole run, install included, stops starting work at $BUDGET_S (default 570) seconds.
# Usage: scripts/gpu_check.sh [--cpu-dry-run]   (dry run: tiny sizes on the CPU, to check the
# plumbing; without it, no CUDA GPU is an error).
set -uo pipefail

DRY=0
case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
  "") ;;
  *) echo "error: unknown option ${1} (use --cpu-dry-run or --help)" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.." || exit 2
START=$(date +%s)
DEST="${OUT:-results/gpu/check-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$DEST"
export OMP_WAIT_POLICY=PASSIVE PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export COPE_CACHE_DIR="$WORK/cache"
PY="${COPE_PYTHON:-.venv/bin/python}"
BUDGET_S=${BUDGET_S:-570}

if [ ! -x "$PY" ]; then
  echo "== installing .venv (make install)"
  if ! timeout 240 make install >"$DEST/install.log" 2>&1; then
    # Offline machines: reuse the system's packages (torch, ...) and install only this project.
    echo "make install failed; trying a venv over the system's site-packages" >>"$DEST/install.log"
    rm -rf .venv
    { python3 -m venv --system-site-packages .venv &&
      .venv/bin/pip install --quiet --no-deps --no-build-isolation -e . ; } \
      >>"$DEST/install.log" 2>&1 || {
      echo "error: could not install .venv; see $DEST/install.log" >&2; exit 2; }
  fi
fi

HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$DRY" = 0 ] && [ "$HAS_CUDA" != 1 ]; then
  echo "error: no CUDA GPU visible to $PY (torch.cuda.is_available() is False);" \
    "run with --cpu-dry-run to check the script on a CPU" >&2
  exit 2
fi

STEPS="$DEST/steps.tsv"
: >"$STEPS"
step() {  # step NAME TIMEOUT_S COMMAND...: run, log to DEST/NAME.log, record rc and seconds
  local name=$1 limit=$2; shift 2
  local began=$(date +%s)
  local left=$(( BUDGET_S - (began - START) ))
  if [ "$left" -lt 15 ]; then
    printf '%s\t%s\t0\n' "$name" "skipped (budget)" >>"$STEPS"; echo "== $name: no time left"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  timeout "$limit" bash -c '"$@"' _ "$@" >"$DEST/$name.log" 2>&1  # bash: runs functions too
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - began ))" >>"$STEPS"
  tail -3 "$DEST/$name.log"
}
cope_json() {  # cope_json FILE ARGS...: `cope ARGS --json`, the JSON document into FILE
  local file=$1; shift
  "$PY" -c "from cope_cli.app import main; main()" "$@" --json >"$file"
}
export -f cope_json
export PY

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; SEQ=64,128; IMPL=sdpa,blockwise,flash; DTYPE=float32
  CLIPS="3 1 1"; BATCH=8; TRAIN_STEPS=2; WORKERS_ON=1; FEED="0,1"
else
  DEVICE=cuda; SEQ=1024,2048,4096,8192,16384; IMPL=flash,triton,sdpa; DTYPE=bfloat16
  CLIPS="40 4 4"; BATCH=512; TRAIN_STEPS=20; WORKERS_ON=8; FEED="0,4,8"
fi

step environment 30 bash -c "nvidia-smi || true; $PY -c 'import json, torch, triton, platform; \
print(json.dumps({\"torch\": torch.__version__, \"triton\": triton.__version__, \
\"python\": platform.python_version(), \"cuda\": torch.version.cuda, \
\"gpu\": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))'"

step cuda_tests 240 "$PY" -m pytest -q -rs tests/test_cuda.py -p no:cacheprovider \
  --junitxml="$DEST/cuda_tests.xml"

step bench_attention 120 cope_json "$DEST/bench_attention.json" bench attention \
  --device "$DEVICE" --dtype "$DTYPE" --seq "$SEQ" --impl "$IMPL" --batch 2 --heads 8 --dim 64 \
  --repeats 5 --warmup 2

step speech_tree 60 "$PY" tests/audio_fixtures.py "$WORK/data" $CLIPS

( [ "$DEVICE" = cuda ] && command -v nvidia-smi >/dev/null && \
  exec nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader \
    -lms 200 >"$DEST/nvidia_smi.csv" 2>/dev/null ) &
SMI=$!
for workers in "$WORKERS_ON" 0; do  # with workers first: the GPU-busy target is about them
  step "bench_train_w$workers" 100 cope_json "$DEST/bench_train_w$workers.json" bench train \
    speech-commands --preset kwt1 --pe abs,cope --device "$DEVICE" --data-dir "$WORK/data" \
    --batch-size "$BATCH" --steps "$TRAIN_STEPS" --warmup 3 --workers "$workers"
done
kill "$SMI" 2>/dev/null; wait "$SMI" 2>/dev/null

step feed_rate 60 "$PY" scripts/feed_rate.py "$WORK/data" "$BATCH" "$FEED"

"$PY" scripts/gpu_summary.py "$DEST" "$(( $(date +%s) - START ))" | tee "$DEST/summary.md"
