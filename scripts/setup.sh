#!/usr/bin/env bash
# Create .venv and install WISP with every role's extras (edge, export, cloud, dev).
# torch is pinned to 2.13.0 (CPU build); an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[edge,export,cloud,dev]"
echo "setup: ok ($(.venv/bin/python -c 'import torch, transformers, onnxruntime; print("torch", torch.__version__, "transformers", transformers.__version__, "onnxruntime", onnxruntime.__version__)'))"
