#!/usr/bin/env bash
# Create .venv and install WISP with every role's extras (edge, export, cloud, dev) from the lock, locks/dev.txt.
# The lock pins every package (torch: the 2.13.0 CPU build; an unpinned torch would pull a multi-GB CUDA build), so
# two fresh machines get the same versions. Update the locks with `bash scripts/lock.sh` (docs/development.md).
#
# Env: PYTHON (interpreter, default python3); WISP_TORCH_INDEX (extra index holding torch==2.13.0+cpu, e.g.
#      https://download.pytorch.org/whl/cpu, for machines whose pip config does not already find it);
#      WISP_UPGRADE="numpy ..." installs the newest release of those packages over the lock (a check that the
#      tests do not depend on a patch release; CI's lock check still runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP_VERSION=26.3
start=$(date +%s)
"$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else "setup: needs Python >= 3.11")'
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)
extra=()
[ -n "${WISP_TORCH_INDEX:-}" ] && extra=(--extra-index-url "$WISP_TORCH_INDEX")
quiet() { "$@" 2> >(grep -v "is ignored: it is neither" >&2) >/dev/null; }
quiet "${pip[@]}" install -q "pip==$PIP_VERSION"
.venv/bin/python scripts/check_locks.py
quiet "${pip[@]}" install -q "${extra[@]}" -r locks/dev.txt
# wisp itself, editable; its build backend (setuptools) comes from the lock, so no unpinned build environment.
quiet "${pip[@]}" install -q --no-deps --no-build-isolation -e .
if [ -n "${WISP_UPGRADE:-}" ]; then
    # shellcheck disable=SC2086
    quiet "${pip[@]}" install -q --upgrade $WISP_UPGRADE
    echo "setup: upgraded over the lock: $(.venv/bin/python -m pip list --format=freeze 2>/dev/null | grep -iE "^($(echo $WISP_UPGRADE | tr ' ' '|'))==" | tr '\n' ' ')"
fi
"${pip[@]}" check >/tmp/wisp-pip-check.$$ 2>&1 || { cat /tmp/wisp-pip-check.$$; echo "setup: pip check found broken requirements" >&2; exit 1; }
echo "setup: ok in $(( $(date +%s) - start )) s ($(.venv/bin/python -c 'import torch, transformers, onnxruntime, numpy; print("torch", torch.__version__, "transformers", transformers.__version__, "onnxruntime", onnxruntime.__version__, "numpy", numpy.__version__)'))"
