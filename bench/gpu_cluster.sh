#!/usr/bin/env bash
# Scale-out on the GPU (docs/benchmarks.md, "Replicas behind HAProxy"): the capacity bench of gpu_capacity.sh
# (Qwen2.5-7B shape, random bf16 weights, paged engine, WISP policy) against ONE `wisp serve`, then against
# `wisp cluster --replicas 2` (two replicas behind HAProxy); then the balancer's added round latency (the same
# sequential rounds straight to a replica and through HAProxy, bench/balancer_latency.py). Writes
# $OUT/summary.json: capacity 1 vs 2 replicas, the scaling, and the added p50.
#
# With 2+ GPUs each replica gets its own (wisp cluster sets CUDA_VISIBLE_DEVICES); with 1 GPU both replicas
# share it, and summary.json says so ("gpus": 1): that measures the balancer, not the scaling.
#
# HAProxy travels as .deb files (the GPU box reaches no network; a bare GPU image has no haproxy):
#   on the dev VM first:   bash bench/gpu_cluster.sh debs     # apt-get download into .debs/ (carry it)
#   on the GPU box:        bash bench/gpu_cluster.sh          # dpkg -i .debs/*.deb when haproxy is missing
# Also needs what gpu_capacity.sh needs (.whl, .fleetdata/bundle, bench/traces/qwen-coder.json).
# Syntax check: bash -n bench/gpu_cluster.sh. CPU dry run (tiny config, short):
#   CONFIG=/tmp/tinyq DEVICE=cpu PROCS=1 N1=2,4 N2=4,8 DURATION=4 WARMUP=1 ROUNDS=50 bash bench/gpu_cluster.sh
set -euo pipefail

if [ "${1:-}" = debs ]; then
  # haproxy and the libraries it needs beyond a bare Debian/Ubuntu image (`apt-cache depends haproxy`; libc6,
  # libssl3, libpcre2-8-0, libcrypt1, libsystemd0 are in every image).
  mkdir -p .debs
  (cd .debs && apt-get download haproxy liblua5.3-0 libopentracing-c-wrapper0 libopentracing1)
  ls -l .debs
  exit 0
fi

OUT=${OUT:-runs/gpu-cluster}
CONFIG=${CONFIG:-qwen2.5-7b}
DEVICE=${DEVICE:-cuda}
N1=${N1:-64,128,192,256,384,512}
N2=${N2:-128,256,384,512,768,1024}
EST=${EST:-$OUT/est.json}
BUNDLE=${BUNDLE:-.fleetdata/bundle}
PY=${PY:-python3}
mkdir -p "$OUT"

if ! command -v haproxy >/dev/null; then
  if ! ls .debs/*.deb >/dev/null 2>&1; then
    echo "gpu_cluster: no haproxy and no .debs/: run 'bash bench/gpu_cluster.sh debs' on the dev VM and carry .debs" >&2
    exit 1
  fi
  if ! dpkg -i .debs/*.deb >"$OUT/dpkg.log" 2>&1; then
    # A bare image may lack what the package's scripts want (adduser, ...): unpack the files instead, and run
    # the binary through a wrapper that finds the unpacked libraries.
    echo "gpu_cluster: dpkg -i failed (tail of $OUT/dpkg.log below); unpacking the .debs into $OUT/haproxy-root" >&2
    tail -5 "$OUT/dpkg.log" >&2
    mkdir -p "$OUT/haproxy-root" && ROOT=$(cd "$OUT/haproxy-root" && pwd)
    for deb in .debs/*.deb; do dpkg -x "$deb" "$ROOT"; done
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$ROOT/usr/lib/x86_64-linux-gnu" "$ROOT/usr/sbin/haproxy" >"$ROOT/haproxy"
    chmod +x "$ROOT/haproxy"
    export PATH=$ROOT:$PATH
  fi
fi
haproxy -v >/dev/null || { echo "gpu_cluster: haproxy does not run here (glibc older than the .debs' distribution?)" >&2; exit 1; }
haproxy -v | sed -n 1p  # not head: its early exit is a SIGPIPE, fatal under pipefail

if [ -d .whl ] && ! $PY -c "import websockets, pydantic" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/cloud:$PWD/sdk:$PWD/models/export
export PYTHONUNBUFFERED=1
GPUS=0
if [ "$DEVICE" != cpu ]; then GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true); fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
echo "gpu_cluster: $GPUS GPU(s); 2 replicas $([ "$GPUS" -ge 2 ] && echo "on 2 GPUs" || echo "SHARE one device")"

if [ ! -f "$EST" ]; then
  $PY -m wisp_sdk.cli profile --random-config "$CONFIG" --device "$DEVICE" --grid quick --reps 2 \
    --kv-budget-tokens 100000 --no-progress --out "$EST"
fi
# Two replicas sharing one GPU must share its memory too.
KV=${KV:-400000}
KV2=$KV
if [ "$DEVICE" != cpu ] && [ "$GPUS" -lt 2 ]; then KV2=$((KV / 2)); fi
SERVE="--random-config $CONFIG --stable-argmax --tokenizer-from $BUNDLE --device $DEVICE --max-batch ${MAX_BATCH:-256} \
       --estimator $EST --drain-s 2 ${SERVE_EXTRA:-}"

bench() {  # bench OUTDIR N KV SERVER_CMD
  $PY -m wisp_sdk.cli bench run \
    --server-cmd "$4" --serve "$SERVE --kv-budget-tokens $3" \
    --draft "$BUNDLE" --trace bench/traces/qwen-coder.json --prompts bench/prompts/code10.jsonl \
    --policies wisp --n "$2" \
    --duration "${DURATION:-18}" --warmup "${WARMUP:-4}" --length-scale "${LENGTH_SCALE:-0.5}" --gap 1 \
    --slo-ttft-ms 2000 --slo-tpot-ms 60 --stop-below "${STOP_BELOW:-0.6}" \
    --device-profile "${DEVICE_PROFILE:-jetson}" --link "${LINK:-wifi-metro}" --procs "${PROCS:-12}" \
    --server-per-policy --no-plots --out "$1" 2>&1 | tee "$1.log"
}

echo "=== gpu_cluster: 1 replica ==="
bench "$OUT/one" "$N1" "$KV" "$PY -m wisp_sdk.cli serve"
echo "=== gpu_cluster: 2 replicas behind HAProxy ==="
bench "$OUT/two" "$N2" "$KV2" "$PY -m wisp_sdk.cli cluster --replicas 2"

echo "=== gpu_cluster: balancer latency ==="
# shellcheck disable=SC2086  # $SERVE is a list of flags
$PY -m wisp_sdk.cli cluster --replicas 2 --port 0 $SERVE --kv-budget-tokens "$KV2" >"$OUT/cluster.out" 2>"$OUT/cluster.log" &
CLUSTER=$!
trap 'kill -TERM $CLUSTER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  [ "$(grep -c '^replica ' "$OUT/cluster.out" || true)" -ge 2 ] && break
  kill -0 $CLUSTER 2>/dev/null || { tail -30 "$OUT/cluster.log"; exit 1; }
  sleep 1
done
BALANCED=$(awk '/^listening on/ {print $3}' "$OUT/cluster.out")
DIRECT=$(awk '/^replica 0 / {print $5}' "$OUT/cluster.out")
$PY bench/balancer_latency.py --direct "$DIRECT" --balanced "$BALANCED" --cookie WISPSRV=r0 --bundle "$BUNDLE" \
  --rounds "${ROUNDS:-1000}" --k "${K:-4}" --out "$OUT/latency.json"
kill -TERM $CLUSTER
wait $CLUSTER || true
trap - EXIT

$PY - "$OUT" "$GPUS" <<'EOF'
import json, sys
from pathlib import Path

out, gpus = Path(sys.argv[1]), int(sys.argv[2])
one = json.loads((out / "one" / "bench.json").read_text())["policies"]["wisp"]
two = json.loads((out / "two" / "bench.json").read_text())["policies"]["wisp"]
lat = json.loads((out / "latency.json").read_text())
summary = {
    "gpus": gpus,
    "capacity_1": one["capacity_interp"], "capacity_1_lower_bound": one["capacity_is_lower_bound"],
    "capacity_2": two["capacity_interp"], "capacity_2_lower_bound": two["capacity_is_lower_bound"],
    "scaling": round(two["capacity_interp"] / one["capacity_interp"], 3) if one["capacity_interp"] else None,
    "peak_goodput_1": one["peak_goodput"], "peak_goodput_2": two["peak_goodput"],
    "balancer_added_wall_p50_ms": lat["added_wall_p50_ms"],
    "balancer_added_wire_p50_ms": lat["added_wire_p50_ms"],
    "goal": {"scaling": 1.9, "balancer_added_p50_ms": 0.5},
}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
EOF
