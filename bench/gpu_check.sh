#!/usr/bin/env bash
# One device check of medcae's GPU path, on a machine with a CUDA GPU and no network:
#   1. `medcae run --data demo --use-gpu` (Ray Data actors + Ray Train on the GPU), timings
#   2. `serve run cfg.yaml`: the shipped Serve config with num_gpus: 1, PNG load on /v1/predict
#   3. backbone extraction images/s, CUDA vs CPU, without Ray (bench/gpu_check.py extract)
#   4. the same `medcae run` on the CPUs, for comparison
# with nvidia-smi sampled all along. Everything lands in $OUT (log.txt, stages.txt, smi.csv,
# smi_apps.txt, summary.json, artifacts.tar.gz).
#
# Dependencies missing on the machine travel in .whl/site.tar.xz (git-ignored; 64 MiB a call):
# Python 3.12 wheels unpacked, without Ray's Java jar, RLlib, Ray LLM, py-spy, virtualenv and
# HAProxy: ray 2.60.0 and what its Data/Train/Serve/dashboard import, FastAPI, starlette, uvicorn,
# pydantic, python-multipart, tensorboardX, the EfficientNet-Lite0 code and weights packages,
# and, pinned to the versions the project's venv runs, grpcio, protobuf, aiohttp and friends.
# It is unpacked into $SITE (with any .whl/*.whl) and put on PYTHONPATH after the checkout.
# Built on a machine with pip: `pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux... -d W NAME==VERSION ...`, each wheel unzipped into one folder, the parts
# above removed, then `tar cf - . | xz -6 > .whl/site.tar.xz` (about 58 MB from 79 MB of Ray alone).
#
#   OUT=/tmp/out bash bench/gpu_check.sh
# Knobs (for trying it without a GPU): PY, SITE, SKIP_INSTALL=1, GPU_FLAG (default --use-gpu),
# RUN_EXTRA (e.g. --smoke-test), RUNS (default runs), SERVE_GPUS (default 1), SERVE_ARGS,
# EXTRACT_ARGS, DEADLINE_S (default 520), SKIP_CPU_RUN=1, WORK.
set -u
ROOT=$(pwd)
OUT=${OUT:-/tmp/gpu_check_out}
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/gpu_check_work}
RUNS=${RUNS:-runs}
GPU_FLAG=${GPU_FLAG---use-gpu}
RUN_EXTRA=${RUN_EXTRA:-}
SERVE_GPUS=${SERVE_GPUS:-1}
EXTRACT_ARGS=${EXTRACT_ARGS:-}
SERVE_ARGS=${SERVE_ARGS:-}
DEADLINE_S=${DEADLINE_S:-520}
START=$(date +%s)
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1

stage() { echo "$(date +%s.%N) $*" >>"$OUT/stages.txt"; echo "=== $(date +%T) +$(($(date +%s) - START))s $*"; }
# seconds a step may take: its own cap, or what is left before the deadline less a reserve
budget() {
  local left=$((DEADLINE_S - ($(date +%s) - START) - ${2:-15}))
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}
step() {  # step NAME CAP CMD...: run under timeout when time is left, log its status
  local name=$1 cap=$2 t
  shift 2
  t=$(budget "$cap")
  if [ "$t" -lt 20 ]; then stage "$name skipped (no time left)"; return 1; fi
  stage "$name (limit ${t}s)"
  timeout -k 10 "$t" "$@"
  local rc=$?
  stage "$name done rc=$rc"
  return $rc
}

stage setup
if [ -z "${SKIP_INSTALL:-}" ] && [ ! -d "$SITE/ray" ]; then
  "$PY" - "$SITE" <<'EOF' || echo "INSTALL FAILED"
import glob, sys, tarfile, time, zipfile
site, t = sys.argv[1], time.time()
with tarfile.open(".whl/site.tar.xz") as tar:
    tar.extractall(site, filter="fully_trusted")
for w in sorted(glob.glob(".whl/*.whl")):
    zipfile.ZipFile(w).extractall(site)
print(f"unpacked into {site} in {time.time() - t:.1f}s")
EOF
fi
export PYTHONPATH="$ROOT${SITE:+:$SITE}"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 MEDCAE_CACHE_DIR=${MEDCAE_CACHE_DIR:-/tmp/medcae-cache}
nproc; free -g | head -2; df -h /tmp /dev/shm | tail -2
nvidia-smi || echo "no nvidia-smi"

SMI_PID= APPS_PID=
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,utilization.memory,memory.used,power.draw,clocks.sm \
    --format=csv,noheader -lms 500 >"$OUT/smi.csv" 2>&1 &
  SMI_PID=$!
  (while true; do
    echo "$(date +%s) $(nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader | tr '\n' ';')"
    sleep 2
  done) >"$OUT/smi_apps.txt" 2>&1 &
  APPS_PID=$!
fi

step env 90 "$PY" bench/gpu_check.py env --work "$WORK"

step run_gpu 240 "$PY" -m medcae run --data demo $GPU_FLAG $RUN_EXTRA --out $RUNS/gpucheck-gpu \
  --feature-store /tmp/fs-gpu 2>&1 | tee "$WORK/run_gpu.txt"

BUNDLE=$RUNS/gpucheck-gpu/bundle
if [ -f "$BUNDLE/bundle.json" ]; then
  step serve_gpu 200 "$PY" bench/gpu_check.py serve --bundle "$BUNDLE" --num-gpus "$SERVE_GPUS" \
    --work "$WORK" $SERVE_ARGS
else
  stage "serve_gpu skipped (no bundle from run_gpu)"
fi

step extract 120 "$PY" bench/gpu_check.py extract --work "$WORK" $EXTRACT_ARGS

if [ -z "${SKIP_CPU_RUN:-}" ]; then
  step run_cpu 200 "$PY" -m medcae run --data demo $RUN_EXTRA --out $RUNS/gpucheck-cpu \
    --feature-store /tmp/fs-cpu 2>&1 | tee "$WORK/run_cpu.txt"
  if [ ! -f "$WORK/serve.json" ] && [ -f $RUNS/gpucheck-cpu/bundle/bundle.json ]; then
    step serve_gpu_cpubundle 150 "$PY" bench/gpu_check.py serve --bundle $RUNS/gpucheck-cpu/bundle \
      --num-gpus "$SERVE_GPUS" --work "$WORK" $SERVE_ARGS
  fi
fi

stage end
[ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null
[ -n "$APPS_PID" ] && kill "$APPS_PID" 2>/dev/null
timeout 60 "$PY" bench/gpu_check.py summarize --work "$WORK" --out "$OUT"
cp -f "$OUT"/stages.txt "$WORK"/ 2>/dev/null
RAYLOGS=${RAY_TMPDIR:-/tmp}/ray
tar czf "$OUT/artifacts.tar.gz" "$WORK" $RUNS/gpucheck-*/results.json $RUNS/gpucheck-*/*.log \
  "$RAYLOGS"/session_*/logs/serve "$RAYLOGS"/session_*/logs/worker-*.err 2>/dev/null
if [ "$(stat -c %s "$OUT/artifacts.tar.gz" 2>/dev/null || echo 0)" -gt 15000000 ]; then
  tar czf "$OUT/artifacts.tar.gz" "$WORK" $RUNS/gpucheck-*/results.json 2>/dev/null
fi
ls -la "$OUT"
echo "total $(($(date +%s) - START))s"
