#!/usr/bin/env bash
# The GPU capacity run of docs/benchmarks.md ("Capacity and goodput"): one `wisp bench run`, one fresh
# `wisp serve --policy P` per policy, all on one GPU; target = the Qwen2.5-7B architecture with random bf16
# weights (--stable-argmax, so the emulated devices' precomputed continuations stay valid) on the paged engine;
# the emulated fleet on the same machine's CPU cores.
#
# Needs: .whl (websockets, pydantic, ... for the GPU image), .fleetdata/bundle (the draft bundle's manifest and
# tokenizer; no ONNX, and no vocab.json or merges.txt, which nothing here reads (the SDK's tokenizer is
# tokenizer.json): `mkdir -p .fleetdata/bundle && cp BUNDLE/*.json BUNDLE/*.jinja .fleetdata/bundle/ &&
# rm .fleetdata/bundle/vocab.json` from an exported draft bundle: 11 MB, where the device tool carries 64 MiB with
# the tracked tree), the workload's prompt set and trace (WORKLOAD=code10|sharegpt|humaneval; see
# `wisp bench run --help` and docs/workloads.md; no dataset package needed). EST: an estimator from `wisp profile` on the same GPU
# kind (made here first if missing). INTERLEAVE=1: every arm at one N before the next (`--interleave`). EXTEND=K: an
# arm still at the target at the largest N runs up to K more points, 1.15x each (`--extend`).
# CPU dry run: CONFIG=/tmp/tinyq DEVICE=cpu PROCS=1 N=2,4 bash bench/gpu_capacity.sh
# The server runs pinned to SERVER_CORES and the emulated fleet to FLEET_CORES (taskset), so the fleet's Python
# never takes the server's cores; defaults: the first quarter of the machine's cores for the server (at least 2).
set -euo pipefail
OUT=${OUT:-runs/gpu-capacity}
CONFIG=${CONFIG:-qwen2.5-7b}
DEVICE=${DEVICE:-cuda}
N=${N:-64,128,192,256,384,512}
EST=${EST:-$OUT/est.json}
BUNDLE=${BUNDLE:-.fleetdata/bundle}
PY=${PY:-python3}
mkdir -p "$OUT"
if [ -d .whl ] && ! $PY -c "import websockets, pydantic" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/cloud:$PWD/sdk:$PWD/models/export
export PYTHONUNBUFFERED=1
NCPU=$(nproc)
SQ=$(( NCPU / 4 > 2 ? NCPU / 4 : 2 ))
SERVER_CORES=${SERVER_CORES:-0-$((SQ - 1))}
FLEET_CORES=${FLEET_CORES:-$SQ-$((NCPU - 1))}
PIN_SERVER=(); PIN_FLEET=()
if command -v taskset >/dev/null && [ "$NCPU" -ge 4 ]; then
  PIN_SERVER=(taskset -c "$SERVER_CORES"); PIN_FLEET=(taskset -c "$FLEET_CORES")
  echo "gpu_capacity: server on cores $SERVER_CORES, fleet on cores $FLEET_CORES"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
if [ ! -f "$EST" ]; then
  $PY -m wisp_sdk.cli profile --random-config "$CONFIG" --device "$DEVICE" --grid quick --reps 2 \
    --max-batch "${MAX_BATCH:-256}" --kv-budget-tokens 100000 --no-progress --out "$EST"
fi
"${PIN_FLEET[@]}" $PY -m wisp_sdk.cli bench run \
  --server-cmd "${PIN_SERVER[*]} $PY -m wisp_sdk.cli serve" \
  --serve "--random-config $CONFIG --stable-argmax --tokenizer-from $BUNDLE --device $DEVICE \
           --max-batch ${MAX_BATCH:-256} --kv-budget-tokens ${KV:-400000} --estimator $EST --save-estimator $OUT/est-online.json ${SERVE_EXTRA:-}" \
  --draft "$BUNDLE" --workload "${WORKLOAD:-code10}" \
  --policies "${POLICIES:-centralized,sled,wisp}" --sled-k "${SLED_K:-3,5}" --n "$N" \
  --duration "${DURATION:-18}" --warmup "${WARMUP:-4}" --length-scale "${LENGTH_SCALE:-0.5}" --gap 1 \
  --slo-ttft-ms 2000 --slo-tpot-ms "${TPOT:-60}" --stop-below "${STOP_BELOW:-0.6}" \
  --device-profile "${DEVICE_PROFILE:-jetson}" --link "${LINK:-wifi-metro}" --procs "${PROCS:-12}" \
  ${INTERLEAVE:+--interleave} --extend "${EXTEND:-0}" --no-plots --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
tar -C "$OUT/bench" -czf "$OUT/records.tgz" records logs 2>/dev/null || true
rm -rf "$OUT/bench/records" "$OUT/bench/logs"
