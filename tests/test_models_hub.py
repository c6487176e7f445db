"""Models by Hugging Face hub id: found in the HF cache offline, and one clear line when they are not there.

Tests never reach the hub (conftest sets HF_HUB_OFFLINE=1); the cached case is a real HF cache layout
(`models--ORG--NAME/snapshots/COMMIT`, `refs/main`) that huggingface_hub itself resolves."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from wisp_export.hub import is_hub_id

RESOLVE = "from wisp_export.fetch import resolve_model; print(resolve_model({!r}))"


def _run(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_hub_ids_are_told_from_paths():
    assert is_hub_id("Qwen/Qwen2.5-Coder-1.5B-Instruct") and is_hub_id("org/name.v2")
    for text in ("./org/name", "/abs/path", "~/models/x", "name", "a/b/c", "../x/y"):
        assert not is_hub_id(text), text


def test_a_cached_hub_id_resolves_offline(tiny_target, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--wisp-test--tiny-target"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_target, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    proc = _run(RESOLVE.format("wisp-test/tiny-target"), tmp_path / "hub")
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == snapshot


def test_an_uncached_hub_id_offline_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    out = tmp_path / "bundle"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "wisp_sdk.cli",
            "export",
            "--model",
            "wisp-test/not-cached",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "wisp-test/not-cached: not in the Hugging Face cache" in lines[0], proc.stderr
    assert not out.exists()
