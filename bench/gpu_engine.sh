#!/usr/bin/env bash
# Issue 6 on one GPU (H100 or H200) in a single call: the paged verifier's step time against the HBM bound,
# its argmax against HF eager (bf16, and fp32 vs bf16 on the same weights), chunked-prefill TTFT, the
# `wisp profile` fit of its verify-cost curve (held-out MAPE), and the attention launch sweep.
#
#     OUT=/some/dir bash bench/gpu_engine.sh        # needs torch, transformers, triton (+ .whl/ for wisp profile)
#     DRY=/tmp/tiny PYTHON=.venv/bin/python OUT=/tmp/ge bash bench/gpu_engine.sh   # CPU plumbing check, tiny model
#
# Steps run most important first, each under `timeout`, inside a total of BUDGET_S seconds (default 420), so a
# slow machine loses the tail, not the headline. Each step writes its JSON directly into $OUT (rewritten as it
# goes: a step cut short keeps what it measured); everything printed goes to $OUT/gpu_engine.log:
#
#     vs-llama8b-512.json  Llama-3-8B shape, 512 context: B in {1,8,32,64} x k in {1,5,9}, HF, argmax, TTFT,
#                          torch.profiler kernel split
#     est-qwen7b.json      `wisp profile --random-config qwen2.5-7b --grid full`: estimator + held-out MAPE (meta)
#     vs-rest.json         Llama-3-8B at 2048; Qwen2.5-7B at 512 and 2048 (+ HF, argmax, TTFT at 512)
#     vs-fp32.json         Llama-3-8B argmax check in fp32 and, same weights rounded, bf16, on the same inputs
#     attn_sweep.json      paged attention launch configurations (Llama-3-8B shape)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-engine}
BUDGET_S=${BUDGET_S:-430}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG=$OUT/gpu_engine.log
START=$(date +%s)

if [ -z "${DRY:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then  # pydantic & co. for wisp_sdk (wisp profile)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/cloud:$PWD/sdk:$PWD/models/export${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{
    echo "# gpu_engine.sh $(date -u '+%Y-%m-%d %H:%M:%S') UTC, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit,memory.total --format=csv
    $PY -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'triton', triton.__version__)"
} 2>&1 | tee -a "$LOG"

# step NAME CAP_S CMD...: run CMD under `timeout` for CAP_S seconds or what is left of the budget if less.
step() {
    local name=$1 cap=$2
    shift 2
    local now left limit t0 rc
    now=$(date +%s)
    left=$((BUDGET_S - (now - START) - 8))
    limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 25 ]; then
        echo "## $name: skipped, ${left}s of the budget left" | tee -a "$LOG"
        return
    fi
    echo "## $name (at $((now - START))s, limit ${limit}s): $*" | tee -a "$LOG"
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "## $name: rc=$rc in $(($(date +%s) - t0))s" | tee -a "$LOG"
}

if [ -n "${DRY:-}" ]; then  # DRY=<tiny HF model folder (tests/tiny_models.py)>: the plumbing on a CPU
    VS="$PY bench/verify_step.py --out $OUT --device cpu --no-plot"
    PROFILE="--random-config $DRY --device cpu --grid quick --reps 1 --kv-budget-tokens 300000"
else
    VS="$PY bench/verify_step.py --out $OUT --iters 15 --no-plot"
    PROFILE="--random-config qwen2.5-7b --device cuda --grid full --reps 3 --kv-budget-tokens 300000"
fi

# 1. the goal's shape: Llama-3-8B, 512 context (+ HF eager speed, argmax agreement, TTFT, kernel split)
step llama8b-512 150 $VS --models llama-3-8b:512 --fp32-check none --name vs-llama8b-512
# 2. the verify-cost curve `wisp profile` fits on the GPU, and its held-out MAPE (KV pool for 32 x 8k contexts;
#    contexts are claimed uncomputed, the ~180 shapes x 4 passes take seconds: Triton compiles (one per tile
#    size x split count) and graph captures for the ragged shapes dominate)
step profile-qwen7b 200 $PY -m wisp_sdk.cli profile $PROFILE --out "$OUT/est-qwen7b.json" --json --no-progress
# 3. the rest of the grid: Llama-3-8B at 2048, Qwen2.5-7B at 512 and 2048 (HF, argmax and TTFT at 512)
step rest 200 $VS --models llama-3-8b:2048,qwen2.5-7b:512/2048 --fp32-check none --name vs-rest
# 4. are the bf16 argmax flips rounding? fp32 (IEEE dots, no TF32) and the same weights in bf16, same inputs
step fp32-check 90 $VS --fp32-only --fp32-check llama-3-8b --name vs-fp32
# 5. attention launch configurations, timed inside CUDA graphs
step attn-sweep 80 $VS --attn-sweep --name attn_sweep

echo "# done in $(($(date +%s) - START))s; files:" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
