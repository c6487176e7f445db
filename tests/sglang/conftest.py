"""SGLang backend tests (the separate CI stage, scripts/test_sglang.sh): run in .venv-sglang against a real SGLang
Engine on CPU with the tiny model. In any environment without sglang (the main .venv) they are not collected.

Fixtures are built with the MAIN environment (tests/sglang/build_fixtures.py: transformers 4.57 writes the tiny
models, optimum exports the draft bundle, HF computes the references), or taken from $WISP_SGLANG_FIXTURES.
On CPU the test-only stand-ins in tests/sglang/stubs (sgl_kernel, the torchvision op shim) must be importable
in SGLang's subprocesses too: test_sglang.sh puts that folder on PYTHONPATH; this conftest does it as well
when pytest is run directly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STUBS = HERE / "stubs"
MAIN_PY = ROOT / ".venv" / "bin" / "python"


def _have_sglang() -> bool:
    # This folder is itself importable as a namespace package `sglang` once tests/ is on sys.path: only a real
    # (regular) package counts.
    try:
        spec = importlib.util.find_spec("sglang")
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None


if not _have_sglang():
    # Not the SGLang environment: nothing here can run (the main test suite skips this folder silently).
    collect_ignore_glob = ["test_*.py"]
else:
    if importlib.util.find_spec("sgl_kernel") is None:
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(STUBS), os.environ.get("PYTHONPATH", "")) if p
        )
        sys.path.insert(0, str(STUBS))
        if "sitecustomize" in sys.modules and not str(
            getattr(sys.modules["sitecustomize"], "__file__", "")
        ).startswith(str(STUBS)):
            import importlib.util as _u

            spec = _u.spec_from_file_location("wisp_sglang_test_shim", STUBS / "sitecustomize.py")
            spec.loader.exec_module(_u.module_from_spec(spec))
        else:
            import sitecustomize  # noqa: F401  (the stubs' shim)
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory) -> Path:
    given = os.environ.get("WISP_SGLANG_FIXTURES")
    out = Path(given) if given else tmp_path_factory.mktemp("sglang-fixtures")
    if not (out / "reference.json").is_file():
        if not MAIN_PY.exists():
            pytest.fail(
                f"{MAIN_PY} is missing: the SGLang stage builds its fixtures with the main env (setup.sh)"
            )
        subprocess.run([str(MAIN_PY), str(HERE / "build_fixtures.py"), str(out)], check=True, timeout=900)
    return out


@pytest.fixture(scope="session")
def reference(fixtures) -> dict:
    return json.loads((fixtures / "reference.json").read_text())


@pytest.fixture(scope="module")
def backend(fixtures):
    """One engine per test module (shut down before the end-to-end module starts its own servers)."""
    from wisp_cloud.backends.sglang import SGLangBackend

    b = SGLangBackend(fixtures / "target", device="cpu", seed=0, max_total_tokens=32768)
    yield b
    b.shutdown()
