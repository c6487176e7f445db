#!/usr/bin/env bash
# Regime-table rows (docs/benchmarks.md, between <!-- regimes --> and <!-- /regimes -->) for one model and one
# (device, link), at every TPOT SLO in TPOT (default 30,60). On a machine of two GPUs the arms run side by side:
# centralized + SLED (k swept) on GPU 0 and WISP on GPU 1, each with its own server cores and fleet cores, the same
# inputs and estimator; on one GPU they run one after the other. Each half is one `wisp bench run`
# (bench/gpu_capacity.sh): one server process, its policy switched between arms (the model load and CUDA graph
# capture paid once). Centralized and SLED are judged at every TPOT SLO from one sweep (their servers ignore the
# SLO); WISP runs one sweep per SLO. bench/merge_bench.py then merges the halves and prints the table rows.
#
# Env: OUT, CONFIG, MODEL (label), EST (required: an estimator of this model on this GPU kind), KV, TPOT (a list),
# DEVICE_PROFILE and LINK (lists too: every (device, link) is a row; centralized runs once per link), WORKLOAD,
# N_BASE and N_WISP (device counts per half), DURATION, WARMUP, SLED_K, SERVE_EXTRA.
# CPU dry run: CONFIG=/tmp/tinyq DEVICE=cpu PROCS=1 N_BASE=2 N_WISP=2 EST=... bash bench/gpu_regimes.sh
set -euo pipefail
OUT=${OUT:-runs/regimes}
PY=${PY:-python3}
mkdir -p "$OUT"
if [ -d .whl ] && ! $PY -c "import websockets, pydantic" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export TPOT=${TPOT:-30,60}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/cloud:$PWD/sdk:$PWD/models/export
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
NCPU=$(nproc)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | sed 's/NVIDIA //' || true)
half() {  # half NAME POLICIES N GPU_INDEX SERVER_CORES FLEET_CORES
  local extra=()
  if [ "$NCPU" -ge 8 ]; then extra=(SERVER_CORES="$5" FLEET_CORES="$6"); fi
  # HALF_TIMEOUT: a half cut short still leaves its bench.json (written after every point) for the merge
  env CUDA_VISIBLE_DEVICES="$4" OUT="$OUT/$1" POLICIES="$2" N="$3" "${extra[@]}" \
    timeout "${HALF_TIMEOUT:-100000}" bash bench/gpu_capacity.sh > "$OUT/$1.log" 2>&1
}
H=$(( NCPU / 2 ))
if [ "$NGPU" -ge 2 ]; then
  echo "gpu_regimes: 2 GPUs ($GPU): centralized+SLED on GPU 0, WISP on GPU 1, side by side"
  half base centralized,sled "${N_BASE:-64,128,192,256}" 0 0-3 "4-$((H - 1))" & a=$!
  half wisp wisp "${N_WISP:-128,256,384,512}" 1 "$H-$((H + 3))" "$((H + 4))-$((NCPU - 1))" & b=$!
  rc=0; wait $a || rc=$?; wait $b || rc=$?
else
  echo "gpu_regimes: one GPU or none: the halves one after the other"
  rc=0
  half base centralized,sled "${N_BASE:-64,128,192,256}" 0 "" "" || rc=$?
  half wisp wisp "${N_WISP:-128,256,384,512}" 0 "" "" || rc=$?
fi
pkill -f "wisp_sdk.cli serve" 2>/dev/null || true  # a half cut by HALF_TIMEOUT leaves its server behind
grep -h "^\[bench\]" "$OUT/base.log" "$OUT/wisp.log" || true
$PY bench/merge_bench.py "$OUT/merged.json" "$OUT/base/bench/bench.json" "$OUT/wisp/bench/bench.json" \
  --model "${MODEL:-${CONFIG:-?}}" --gpu "${GPU:-?}" | tee "$OUT/table.txt"
exit $rc
