"""End to end: `wisp generate` (main env: ONNX draft) against `wisp serve --backend sglang` (this env) gives the same
tokens as against `wisp serve` with the native backend (main env), and the same as HF greedy on the target."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

MAIN_PY = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python"


class Served:
    """`wisp serve` in a subprocess; `url` once it printed `listening on ws://HOST:PORT`."""

    def __init__(self, python: str, target: Path, *extra: str, timeout: float = 900.0) -> None:
        cmd = [python, "-m", "wisp_sdk.cli", "serve", "--target", str(target), "--port", "0", *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        found = threading.Event()
        self.url = ""

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(r"listening on (ws://\S+)", line)
                if m and not found.is_set():
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(timeout) or not self.url:
            self.stop()
            raise RuntimeError("wisp serve did not start:\n" + "".join(self.lines[-40:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def servers(fixtures):
    native = Served(str(MAIN_PY), fixtures / "target")
    try:
        sgl = Served(sys.executable, fixtures / "target", "--backend", "sglang")
    except Exception:
        native.stop()
        raise
    yield {"native": native, "sglang": sgl}
    sgl.stop()
    native.stop()
    assert sgl.proc.returncode is not None


def generate(url: str, bundle: Path, prompt: str, *extra: str) -> dict:
    out = subprocess.run(
        [
            str(MAIN_PY),
            "-m",
            "wisp_sdk.cli",
            "generate",
            "--server",
            url,
            "--draft",
            str(bundle),
            "--json",
            "--raw",
        ]
        + list(extra)
        + [prompt],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("controller", ["fixed:3", "wisp"])
def test_generate_greedy_identical_to_native_and_hf(servers, fixtures, reference, controller):
    for p in reference["prompts"]:
        n = len(p["greedy"])
        args = ("--max-new-tokens", str(n), "--controller", controller)
        a = generate(servers["sglang"].url, fixtures / "bundle", p["text"], *args)
        b = generate(servers["native"].url, fixtures / "bundle", p["text"], *args)
        assert a["token_ids"] == b["token_ids"], p["text"]
        assert a["token_ids"] == p["greedy"][: len(a["token_ids"])] and a["token_ids"], p["text"]
        assert a["stats"]["rounds"]


def test_generate_sampling_sparse(servers, fixtures, reference):
    """Sampling through the default sparse path (`--sglang-sampling sparse`): the server's planner hands the draft's
    q support to the backend and acceptance runs on SGLang's draws; every run completes with valid tokens, some
    drafts are accepted and some rejected (the residual path ran)."""
    accepted = drafted = 0
    for i, p in enumerate(reference["prompts"][:3]):
        args = ("--max-new-tokens", "16", "--temperature", "0.8", "--top-k", "40", "--seed", str(10 + i))
        args += ("--controller", "fixed:3")
        a = generate(servers["sglang"].url, fixtures / "bundle", p["text"], *args)
        assert 0 < len(a["token_ids"]) <= 16 and all(0 <= t < 384 for t in a["token_ids"]), p["text"]
        accepted += a["stats"]["accepted"]
        drafted += a["stats"]["drafted"]
    assert drafted > 0 and accepted < drafted
    # Every rejection drew its residual from SGLang's samples: the server counted them (/metrics, same port).
    url = servers["sglang"].url.replace("ws://", "http://").rstrip("/") + "/metrics"
    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    draws = re.search(r"^wisp_sampling_residual_draws_total (\S+)$", text, re.M)
    assert draws and float(draws.group(1)) >= 1, text[-2000:]


def test_generate_sampling_full_same_as_native(servers, fixtures, reference):
    """Full-vocabulary sampling (`--sglang-sampling full`): with the same seed, the SGLang server commits the same
    tokens as the native one (both compute the same p; acceptance and its random stream are shared code)."""
    full = Served(sys.executable, fixtures / "target", "--backend", "sglang", "--sglang-sampling", "full")
    try:
        for i, p in enumerate(reference["prompts"][:3]):
            args = ("--max-new-tokens", "16", "--temperature", "0.8", "--top-k", "40", "--seed", str(10 + i))
            args += ("--controller", "fixed:3")
            a = generate(full.url, fixtures / "bundle", p["text"], *args)
            b = generate(servers["native"].url, fixtures / "bundle", p["text"], *args)
            assert a["token_ids"] == b["token_ids"], p["text"]
    finally:
        full.stop()
