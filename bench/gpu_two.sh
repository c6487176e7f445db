#!/usr/bin/env bash
# Two different rows side by side on a 2-GPU host, one per GPU (docs/benchmarks.md "GPU runs 37-40" ran them as
# inline commands): each half is `bench/gpu_capacity.sh` with the server on 4 cores and the fleet on 12, as in
# bench/gpu_pair.sh. ROW0 / ROW1 are the halves' settings, shell assignments (eval'ed, so quote values with spaces).
# Writes $OUT/g0, $OUT/g1 (bench.json, est-online.json, steps.txt) and the printed lines $OUT/g{0,1}.log:
# 8 files, the most the device tool brings back (the records' tarball and bench.log, a copy of g*.log, are removed).
# bench.json is moved up out of g*/bench/: the device tool leaves out files four folders deep, so under an OUT
# with one more folder (two calls in one run, session 16) g*/bench/bench.json did not come back.
#   OUT=/tmp/two ROW0="CONFIG=qwen2.5-7b N=640,720 POLICIES=centralized,wisp,sled" \
#     ROW1="CONFIG=qwen2.5-32b KV=200000 MAX_BATCH=256 EST=bench/results/estimator/est-h200-32b-varlen.json" \
#     bash bench/gpu_two.sh
# ONE=1 runs ROW0 alone on a 1-GPU host. SAMPLE_HOST=1: the server samples its threads' stacks (`wisp serve
# --sample-host`, one file per point), packed into g*/host.tgz (read with bench/host_profile.py).
set -u
OUT=${OUT:-runs/gpu-two}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
half() {  # half GPU SERVER_CORES FLEET_CORES ROW
  (
    export DURATION=12 WARMUP=3 SLED_K=3 TPOT=60 INTERLEAVE=1 DEVICE_PROFILE=mac-m4 LINK=metro-edge
    export WORKLOAD=sharegpt CONFIG=qwen2.5-7b KV=800000 MAX_BATCH=512 GRAPH_WARMUP_S=60
    export EST=bench/results/estimator/est-h200-7b-varlen.json
    eval "export $4"
    export SERVE_EXTRA="--max-context-len 1024 --graph-warmup-s $GRAPH_WARMUP_S --admission-target 0 ${SERVE_MORE:-}"
    [ "${SAMPLE_HOST:-0}" = 1 ] && SERVE_EXTRA="$SERVE_EXTRA --sample-host $OUT/g$1/host"
    CUDA_VISIBLE_DEVICES=$1 SERVER_CORES=$2 FLEET_CORES=$3 OUT=$OUT/g$1 \
      timeout "${TMO:-540}" bash bench/gpu_capacity.sh > "$OUT/g$1.log" 2>&1
  )
}
half 0 0-3 4-15 "${ROW0:-}" &
# ONE=1: a 1-GPU host runs ROW0 alone
[ "${ONE:-0}" = 1 ] || half 1 16-19 20-31 "${ROW1:-}" &
wait
for d in g0 $([ "${ONE:-0}" = 1 ] || echo g1); do
  tmp=$(mktemp -d)
  tar -C "$tmp" -xzf "$OUT/$d/records.tgz" 2>/dev/null || cp -r "$OUT/$d/bench/logs" "$tmp/" 2>/dev/null
  grep -hE "server_start|steps n=|policy_switch|session_switch|regime_flip|regime_decision" "$tmp"/logs/*.log > "$OUT/$d/steps.txt" 2>/dev/null || true
  rm -rf "$tmp" "$OUT/$d/records.tgz" "$OUT/$d/bench.log"
  mv "$OUT/$d/bench/bench.json" "$OUT/$d/bench.json" 2>/dev/null && rmdir "$OUT/$d/bench" 2>/dev/null
  [ -d "$OUT/$d/host" ] && tar -C "$OUT/$d" -czf "$OUT/$d/host.tgz" host && rm -rf "$OUT/$d/host"
  grep -hE "N=|capacity" "$OUT/$d.log" | cut -c1-200
done
