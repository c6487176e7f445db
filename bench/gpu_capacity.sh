#!/usr/bin/env bash
# The GPU capacity run of docs/benchmarks.md ("Capacity and goodput"): one `wisp bench run` on one GPU machine,
# target = Qwen2.5-7B architecture with random bf16 weights on the paged backend, the emulated fleet on the
# machine's CPU cores. Needs: .whl (websockets, pydantic, ...), .fleetdata/bundle (the draft bundle's manifest and
# tokenizer: no ONNX), bench/traces/qwen-coder.json. OUT defaults to runs/gpu.
set -euo pipefail
OUT=${OUT:-runs/gpu}
N=${N:-32,64,128,256}
mkdir -p "$OUT"
WHL=${WHL:-.whl}
if [ -d "$WHL" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/cloud:$PWD/sdk:$PWD/models/export
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m wisp_sdk.cli bench run \
  --server-cmd "python3 -m wisp_cloud.fleet.serve_bench" \
  --serve "--config qwen2.5-7b --random-weights --tokenizer-from .fleetdata/bundle --backend paged --device cuda \
           --max-batch 256 --kv-budget-tokens 600000 --embed-scale 1000 ${SERVE_EXTRA:-} --estimator ${EST:-$OUT/est.json} --save-estimator $OUT/est-final.json" \
  --reuse-server --bundle .fleetdata/bundle --trace bench/traces/qwen-coder.json \
  --prompts bench/prompts/code10.jsonl --policies centralized,sled,wisp --sled-k ${SLED_K:-3,5} --n "$N" \
  --duration ${DURATION:-10} --warmup 2 --drain ${DRAIN:-8} --gap 1 --slo-ttft-ms 2000 --slo-tpot-ms 60 \
  --device-profile jetson --link wifi-metro --procs 12 --no-plots --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
tar -C "$OUT/bench" -czf "$OUT/records.tgz" records 2>/dev/null || true
rm -rf "$OUT/bench/records"
