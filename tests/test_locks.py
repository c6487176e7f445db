"""The dependency locks must match what they are made from (scripts/check_locks.py), and the check must fail when
they do not."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_locks", ROOT / "scripts" / "check_locks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_locks_match_pyproject():
    assert _checker().main() == 0


def test_stale_lock_is_named(tmp_path):
    check = _checker()
    lock = tmp_path / "dev.txt"
    lock.write_text("numpy==2.4.6\n    # via wisp\ntorch==2.13.0+cpu\n")
    # a new dependency, a range the pin falls outside, and pins that satisfy
    assert check.problems(lock, ["numpy>=1.24", "torch==2.13.0"]) == []
    out = check.problems(lock, ["numpy>=2.5", "torch==2.13.0", "Pydantic>=2.6,<3"])
    assert any("numpy is locked at 2.4.6" in p for p in out)
    assert any("Pydantic" in p and "not in the lock" in p for p in out)
    assert check.problems(tmp_path / "missing.txt", ["numpy"]) == ["missing.txt is missing"]
