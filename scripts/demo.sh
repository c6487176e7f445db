#!/usr/bin/env bash
# The demo on the real pair: fetch 0.5B draft + 1.5B target, export the draft (q8, parity table),
# serve the 1.5B on CPU, generate from the edge with the 0.5B ONNX draft, print text and stats.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WISP=.venv/bin/wisp
RUNS=${WISP_RUNS:-runs}
mkdir -p "$RUNS"

DRAFT=$($WISP models fetch qwen2.5-coder-0.5b-instruct | tail -n 1)
TARGET=$($WISP models fetch qwen2.5-coder-1.5b-instruct | tail -n 1)
echo "draft model:  $DRAFT"
echo "target model: $TARGET"

BUNDLE="$RUNS/qwen2.5-coder-0.5b-q8"
if [ -f "$BUNDLE/wisp-draft.json" ]; then
    echo "draft bundle: $BUNDLE (exists; its parity report follows)"
    .venv/bin/python -c "import sys; from wisp_sdk.bundle import load_manifest; p = load_manifest(sys.argv[1]).parity; print(p.model_dump_json(indent=1) if p else 'no parity report')" "$BUNDLE"
else
    $WISP export --model "$DRAFT" --out "$BUNDLE" --quant q8
fi

if ! .venv/bin/python -c "import wisp_cloud.cli_serve, wisp_sdk.cli_generate" 2>/dev/null; then
    echo "demo: serve/generate are not built yet; stopping after export"
    exit 0
fi

LOG="$RUNS/serve.log"
$WISP serve --target "$TARGET" --port 0 >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
    URL=$(grep -o 'ws://[^ ]*' "$LOG" | head -n 1 || true)
    [ -n "$URL" ] && break
    kill -0 $SERVER 2>/dev/null || { cat "$LOG"; echo "demo: server failed to start" >&2; exit 1; }
    sleep 0.5
done
echo "server: $URL"
$WISP generate --server "$URL" --draft "$BUNDLE" --max-new-tokens 96 \
    "Write a Python function that checks whether a string is a palindrome."
