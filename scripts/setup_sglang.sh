#!/usr/bin/env bash
# Build .venv-sglang: the SGLang verifier backend's own environment, CPU build (CI and development machines).
#
# sglang 0.5.23 pins torch 2.14.1 (CUDA) and transformers 5.19, so it cannot share .venv (torch 2.13,
# transformers 4.57). Here: the CPU torch 2.13 wheel (a constraint stops pip from pulling CUDA torch), sglang and
# a few packages with --no-deps, their pure-Python requirements, and wisp itself (editable, so SGLang finds the
# `wisp` plugin entry point). sgl_kernel has no CPU build: the test stage supplies a TEST-ONLY stand-in
# (tests/sglang/stubs). GPU servers install differently: docs/sglang.md.
#
# Idempotent: a complete environment built from the same requirement files is left alone. Wheels are cached
# in .cache/sglang-wheels (git-ignored): a rebuild from a warm cache needs no network.
# Env: PYTHON (interpreter, default python3), WISP_SGLANG_VENV, WISP_SGLANG_WHEELS,
#      WISP_TORCH_INDEX (extra index holding torch==2.13.0+cpu, e.g. https://download.pytorch.org/whl/cpu,
#      for machines whose pip config does not already find it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${WISP_SGLANG_VENV:-.venv-sglang}
WHEELS=${WISP_SGLANG_WHEELS:-.cache/sglang-wheels}
PY=${PYTHON:-python3}
REQ=scripts/sglang
start=$(date +%s)

want=$(cat scripts/setup_sglang.sh "$REQ"/*.txt locks/sglang.txt | sha256sum | cut -c1-16)
stamp="$VENV/.wisp-sglang-stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && "$VENV/bin/python" -c "import sglang, torchvision, wisp_cloud.backends.sglang" 2>/dev/null \
    && PYTHONPATH=tests/sglang/stubs "$VENV/bin/python" -c "import sglang.srt.entrypoints.engine" 2>/dev/null; then
    echo "setup_sglang: $VENV is up to date"
    exit 0
fi

"$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 10) else "setup_sglang: needs Python >= 3.10")'
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
extra=()
[ -n "${WISP_TORCH_INDEX:-}" ] && extra=(--extra-index-url "$WISP_TORCH_INDEX")
mkdir -p "$WHEELS"

# 1. The locked set (locks/sglang.txt, made from $REQ/requirements-cpu.txt by scripts/lock.sh; torch held to the
#    CPU build).
deps=(-c "$REQ/constraints-cpu.txt" -r locks/sglang.txt)
if ! "${pip[@]}" install -q --no-index --find-links "$WHEELS" "${deps[@]}" 2>/dev/null; then
    echo "setup_sglang: downloading wheels into $WHEELS"
    "${pip[@]}" download -q -d "$WHEELS" "${extra[@]}" "${deps[@]}"
    "${pip[@]}" install -q --no-index --find-links "$WHEELS" "${deps[@]}"
fi
# 2. Without dependencies (theirs are CUDA-only; the pure-Python ones are in step 1).
if ! "${pip[@]}" install -q --no-deps --no-index --find-links "$WHEELS" -r "$REQ/requirements-nodeps.txt" 2>/dev/null; then
    "${pip[@]}" download -q --no-deps -d "$WHEELS" -r "$REQ/requirements-nodeps.txt"
    "${pip[@]}" install -q --no-deps --no-index --find-links "$WHEELS" -r "$REQ/requirements-nodeps.txt"
fi
# 3. wisp itself, editable: the backend, and the `wisp` entry point in group sglang.srt.plugins.
"${pip[@]}" install -q --no-deps --no-build-isolation -e .

"$VENV/bin/python" -c "import torch; assert torch.__version__.endswith('+cpu'), torch.__version__"
PYTHONPATH=tests/sglang/stubs "$VENV/bin/python" -c "
import sglang, torch, transformers
from importlib.metadata import entry_points
from sglang.srt.entrypoints.engine import Engine  # noqa: F401
assert any(ep.name == 'wisp' for ep in entry_points(group='sglang.srt.plugins')), 'wisp plugin not registered'
print(f'setup_sglang: sglang {sglang.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')
"
echo "$want" > "$stamp"
echo "setup_sglang: $VENV ready in $(( $(date +%s) - start )) s"
