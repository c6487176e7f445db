#!/usr/bin/env bash
# The SGLang CI stage: build .venv-sglang (scripts/setup_sglang.sh, cached), build the tiny-model fixtures with
# the main .venv, and run tests/sglang against a real SGLang Engine on CPU: lossless verification (greedy
# identical to HF and to the native backend, also through `wisp serve --backend sglang` + `wisp generate`),
# exact sampling and its refusal mode, WISP ordering in SGLang's queue, and the timing plugin.
# Needs .venv (scripts/setup.sh). Extra arguments go to pytest. Env: WISP_SGLANG_VENV, WISP_SGLANG_WHEELS.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
if [ ! -x .venv/bin/python ]; then
    echo "test_sglang: .venv is missing: run scripts/setup.sh first (fixtures and clients use it)" >&2
    exit 1
fi
bash scripts/setup_sglang.sh
VENV=${WISP_SGLANG_VENV:-.venv-sglang}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false SGLANG_USE_CPU_ENGINE=1
# TEST-ONLY stand-ins for the CPU run (sgl_kernel, torchvision op shim), also seen by SGLang's subprocesses.
export PYTHONPATH="$PWD/tests/sglang/stubs${PYTHONPATH:+:$PYTHONPATH}"
work=$(mktemp -d "${TMPDIR:-/tmp}/wisp-sglang.XXXXXX")
trap 'rm -rf "$work"' EXIT
export WISP_SGLANG_FIXTURES="$work/fixtures"
.venv/bin/python tests/sglang/build_fixtures.py "$WISP_SGLANG_FIXTURES"
set +e
"$VENV/bin/python" -m pytest -q -ra -p no:cacheprovider --timeout=1800 --basetemp="$work/pytest" tests/sglang "$@"
rc=$?
set -e
echo "test_sglang: done in $(( $(date +%s) - start )) s (pytest exit $rc)"
# pytest exits 5 when it collected no tests: that is a failure, not a pass.
if [ "$rc" -eq 5 ]; then echo "test_sglang: no tests were collected" >&2; exit 1; fi
exit "$rc"
