#!/usr/bin/env bash
# The GPU check, in one call on a machine with a GPU (run from the repository root):
#
#   tools/gpu_check.sh                 # on the GPU machine, .whl/ carried (tools/gpu_wheels.sh)
#   tools/gpu_check.sh --cpu-plumbing  # here, on CPU: the same steps, GPU parts skipped
#                                      # (or GPU_CHECK_CPU_PLUMBING=1)
#
# Steps, each time-boxed so that the whole check ends within 8 minutes on an H100 even when
# every step runs to its limit: environment 20 s, install 45 s + pip check 15 s, gpu tests
# 100 s, plan 40 s, bench 200 s (420 s, plus at most 10 s per step to kill one that ignores
# SIGTERM). The bench starts no new session count after 140 s and then prints its tables;
# estimated for an H100: ~2 minutes of bench (6 listed counts at ~10 s, ~4 search probes).
#   1. environment: GPU, driver, python, torch          -> $OUT/env.txt
#   2. install the project and what it needs from .whl/ -> $OUT/install.log
#      (pip --no-index --no-deps -r .whl/requirements.txt: the image's packages stay where
#      they are as new; in plumbing mode a --dry-run, the environment is left as it is)
#   3. the gpu-marked tests (tests/test_gpu.py)         -> $OUT/pytest.log, $OUT/junit.xml
#   4. the memory plan for this card                    -> $OUT/plan.md
#   5. bench gpu: eager vs graphs, sessions up to what fits, tick p50/p99 per bucket, LM
#      step, codec encode + decode, memory per session  -> $OUT/bench.log, $OUT/bench.jsonl
# Everything is written under $OUT as it runs (default ./gpu-check-out), so a killed check
# keeps what it measured; $OUT/summary.txt has each step's exit status and seconds.
set -uo pipefail
cd "$(dirname "$0")/.."

plumbing=${GPU_CHECK_CPU_PLUMBING:-0}
for arg in "$@"; do
  case "$arg" in
    --cpu-plumbing) plumbing=1 ;;
    -h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (--cpu-plumbing)" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-./gpu-check-out}
mkdir -p "$OUT"
if [ "$plumbing" = 1 ] && [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
export PYTHONUNBUFFERED=1
# plumbing: one torch thread (a shared CPU box; the figures mean nothing there anyway)
[ "$plumbing" = 1 ] && export OMP_NUM_THREADS=1
started=$(date +%s)
failed=0

log() { echo "[gpu_check +$(($(date +%s) - started))s] $*" | tee -a "$OUT/summary.txt"; }

# step NAME LIMIT_S LOGFILE COMMAND...: run it with a time limit, output to LOGFILE and here
step() {
  local name=$1 limit=$2 logfile=$3 t0 rc
  shift 3
  t0=$(date +%s)
  log "$name: start (limit ${limit}s)"
  : >"$logfile"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$logfile"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  log "$name: exit $rc in $(($(date +%s) - t0))s$([ "$rc" -eq 124 ] && echo ' (time limit)')"
  return 0
}

: >"$OUT/summary.txt"
log "mode: $([ "$plumbing" = 1 ] && echo 'cpu plumbing (GPU parts skipped, tiny presets)' || echo gpu)"

# 1. environment
{
  echo "date: $(date -u +%FT%TZ)"
  echo "python: $(timeout 10 $PY -c 'import sys; print(sys.version)' 2>&1)"
  timeout 20 $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")' 2>&1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  lscpu 2>/dev/null | grep -m1 'Model name'
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 2. install: --no-deps, so that pip does not walk into torch's CUDA dependencies (the
# image installed them its way); .whl/requirements.txt is a set resolved together
if [ -f .whl/requirements.txt ]; then
  install=(-m pip install --no-index --find-links .whl --no-deps --no-cache-dir
    --disable-pip-version-check -r .whl/requirements.txt)
  [ "$plumbing" = 1 ] && install+=(--dry-run)
  step install 45 "$OUT/install.log" $PY "${install[@]}"
  timeout 15 $PY -m pip check >>"$OUT/install.log" 2>&1 ||
    log "install: pip check reports conflicts (install.log)"
else
  log "install: no .whl/ here (tools/gpu_wheels.sh makes it); using the environment as it is"
fi

# 3. gpu-marked tests (they skip without CUDA: in plumbing mode this proves they collect)
step "gpu tests" 100 "$OUT/pytest.log" $PY -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_gpu.py --junitxml="$OUT/junit.xml"

# 4. memory plan for this card, then 5. the bench
if [ "$plumbing" = 1 ]; then
  models=(--lm-config tiny --mimi-config tiny)
  step plan 40 "$OUT/plan.md" $PY -m moshi_grpc.cli bench gpu --plan "${models[@]}" \
    --gpu-memory 16MiB --reserve 4MiB
  step bench 200 "$OUT/bench.log" $PY -m moshi_grpc.cli bench gpu --device cpu "${models[@]}" \
    --dtype float32 --sessions 1,2 --steps 2 --search-max 3 --budget-ms 1000000 \
    --time-budget-s 140 --out-json "$OUT/bench.jsonl"
else
  total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
  step plan 40 "$OUT/plan.md" $PY -m moshi_grpc.cli bench gpu --plan \
    --gpu-memory "${total_mib:-81559}MiB"
  step bench 200 "$OUT/bench.log" $PY -m moshi_grpc.cli bench gpu --time-budget-s 140 \
    --out-json "$OUT/bench.jsonl"
fi

log "done in $(($(date +%s) - started))s; $failed step(s) failed; files in $OUT"
[ "$failed" -eq 0 ]
