#!/usr/bin/env bash
# Two single-GPU capacity benches side by side on a 2-GPU host (docs/benchmarks.md "GPU runs 32–36"): one row,
# GPU 0 at --max-batch 512 and GPU 1 at 256, the arms in opposite orders on the two GPUs and (by default,
# INTERLEAVE=1) point by point, so that a slow spell of the host or the arm order does not land on one arm. Each half is `bench/gpu_capacity.sh` (server on 4 cores, fleet on 12).
# Writes $OUT/b512, $OUT/b256 (bench.json, records.tgz, steps.txt: the servers' `steps` and switch lines) and the
# printed lines $OUT/b{512,256}.log.
#   OUT=/tmp/pair ARMS=centralized,wisp,wisp+wisp+slo,sled N=544,624,704 bash bench/gpu_pair.sh
set -u
OUT=${OUT:-runs/gpu-pair}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export DURATION=${DURATION:-12} WARMUP=${WARMUP:-3} SLED_K=${SLED_K:-3} TPOT=${TPOT:-60}
export DEVICE_PROFILE=${DEVICE_PROFILE:-mac-m4} LINK=${LINK:-metro-edge} WORKLOAD=${WORKLOAD:-sharegpt}
export INTERLEAVE=${INTERLEAVE-1}  # every arm at one N before the next (`wisp bench run --interleave`); INTERLEAVE= for arm by arm
CONFIG=${CONFIG:-qwen2.5-7b}
EST=${EST:-bench/results/estimator/est-h200-7b-varlen.json}
ARMS=${ARMS:-centralized,wisp,sled}
REVERSED=$(echo "$ARMS" | tr ',' '\n' | tac | paste -sd, -)
EXTRA=${SERVE_EXTRA:-"--max-context-len 1024 --graph-warmup-s 60 --admission-target 0"}
CUDA_VISIBLE_DEVICES=0 SERVER_CORES=0-3 FLEET_CORES=4-15 CONFIG=$CONFIG KV=${KV512:-800000} MAX_BATCH=512 \
  N=${N:-544,624,704} OUT=$OUT/b512 POLICIES=$ARMS EST=$EST SERVE_EXTRA="$EXTRA" \
  timeout "${TMO:-450}" bash bench/gpu_capacity.sh > "$OUT/b512.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 SERVER_CORES=16-19 FLEET_CORES=20-31 CONFIG=$CONFIG KV=${KV256:-400000} MAX_BATCH=256 \
  N=${N:-544,624,704} OUT=$OUT/b256 POLICIES=$REVERSED EST=$EST SERVE_EXTRA="$EXTRA" \
  timeout "${TMO:-450}" bash bench/gpu_capacity.sh > "$OUT/b256.log" 2>&1 &
wait
for d in b512 b256; do
  tmp=$(mktemp -d)
  # the records' tarball, or (a bench stopped by TMO before it packed them) the server's log as it was left
  tar -C "$tmp" -xzf "$OUT/$d/records.tgz" 2>/dev/null || cp -r "$OUT/$d/bench/logs" "$tmp/" 2>/dev/null
  grep -hE "server_start|steps n=|policy_switch|session_switch" "$tmp"/logs/*.log > "$OUT/$d/steps.txt" 2>/dev/null || true
  rm -rf "$tmp"
  grep -hE "N=|capacity" "$OUT/$d.log" | cut -c1-160
done
