set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export DURATION=12 WARMUP=3 SLED_K=3,5
CUDA_VISIBLE_DEVICES=0 SERVER_CORES=0-3 FLEET_CORES=4-15 CONFIG=qwen2.5-32b KV=200000 N=32,48,64 OUT=$OUT/b32 \
  TPOT=30 DEVICE_PROFILE=mac-m4 LINK=metro-edge WORKLOAD=humaneval POLICIES=centralized,wisp,wisp~no-regime,sled \
  EST=bench/results/capacity/est-h200-run13-32b-online.json \
  SERVE_EXTRA="--max-context-len 1024 --graph-warmup-s 100 --admission-target 0" timeout 500 bash bench/gpu_capacity.sh > $OUT/b32.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 SERVER_CORES=16-19 FLEET_CORES=20-31 CONFIG=qwen2.5-7b KV=400000 N=256,384,512 OUT=$OUT/b7 \
  TPOT=60 DEVICE_PROFILE=jetson LINK=wifi-metro WORKLOAD=sharegpt POLICIES=centralized,wisp,sled \
  EST=bench/results/capacity/est-h200-run12-7b-online.json \
  SERVE_EXTRA="--max-context-len 1024 --graph-warmup-s 60 --admission-target 0" timeout 500 bash bench/gpu_capacity.sh > $OUT/b7.log 2>&1 &
wait
tar -C $OUT -czf $OUT/all.tgz b32 b7 b32.log b7.log 2>/dev/null
tail -c 1500 $OUT/b32.log | tr '\r' '\n' | tail -8; tail -c 1500 $OUT/b7.log | tr '\r' '\n' | tail -8
