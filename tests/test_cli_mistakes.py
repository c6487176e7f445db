"""Every mistake of issue 16's list is one `error:` line on stderr, exit 2, no traceback, and fast (before any
model load where the mistake is knowable without one)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WISP = [sys.executable, "-m", "wisp_sdk.cli"]


def one_line(*args: str, timeout: float = 120) -> str:
    proc = subprocess.run([*WISP, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


def test_bundle_without_its_weights_file(bundle_copy):
    (bundle_copy / "model.onnx_data").unlink()
    line = one_line("generate", "--server", "ws://127.0.0.1:1", "--draft", str(bundle_copy), "hi")
    assert "weights file is missing" in line and "copy the whole folder" in line


def test_corrupt_manifest(bundle_copy):
    (bundle_copy / "wisp-draft.json").write_text('{"architecture": "qwen2", trunc')
    line = one_line("generate", "--server", "ws://127.0.0.1:1", "--draft", str(bundle_copy), "hi")
    assert "wisp-draft.json is corrupt" in line and "wisp export" in line


def test_manifest_with_a_wrong_field(bundle_copy):
    data = json.loads((bundle_copy / "wisp-draft.json").read_text())
    data["vocab_size"] = "many"
    (bundle_copy / "wisp-draft.json").write_text(json.dumps(data))
    assert "vocab_size" in one_line(
        "generate", "--server", "ws://127.0.0.1:1", "--draft", str(bundle_copy), "x"
    )


@pytest.mark.parametrize(
    "command",
    [["generate", "--server", "ws://127.0.0.1:1"], ["edge", "serve", "--server", "ws://127.0.0.1:1"]],
)
def test_missing_bundle_folder_says_no_such_folder(command, tmp_path):
    args = [*command, "--draft", str(tmp_path / "nope")]
    if command[0] == "generate":
        args.append("hi")
    assert "no such folder" in one_line(*args)


def test_serve_device_names(tmp_path):
    assert "'gpu' is not a device" in one_line("serve", "--target", str(tmp_path), "--device", "gpu")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "config.json").write_text("{}")
    assert "--device cuda: this torch build has no CUDA" in one_line(
        "serve", "--target", str(tmp_path), "--port", "0", "--device", "cuda"
    )


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_busy_ports_fail_before_the_model_loads(flag, tmp_path):
    # A folder whose load would fail: the port's error must come first.
    (tmp_path / "config.json").write_text("{}")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = str(busy.getsockname()[1])
        args = ["--port", port] if flag == "--port" else ["--port", "0", "--metrics-port", port]
        line = one_line("serve", "--target", str(tmp_path), *args)
    assert f"{flag} {port}: cannot listen on 127.0.0.1:{port}: Address already in use" in line


def test_export_given_a_bundle(tiny_bundle, tmp_path):
    line = one_line("export", "--model", str(tiny_bundle), "--out", str(tmp_path / "out"))
    assert "is a draft bundle" in line and not (tmp_path / "out").exists()


def test_export_to_an_unwritable_folder(tiny_draft):
    assert "--out /proc/x: cannot write there" in one_line(
        "export", "--model", str(tiny_draft), "--out", "/proc/x"
    )


def test_every_help_shows_its_defaults():
    for argv, flag, default in [
        (["serve"], "--port", "8765"),
        (["generate"], "--max-new-tokens", "256"),
        (["edge", "serve"], "--port", "8000"),
        (["bench", "run"], "--attainment", "0.9"),
        (["generate"], "--mode", "speculative"),
    ]:
        out = subprocess.run([*WISP, *argv, "--help"], capture_output=True, text=True, timeout=60).stdout
        flat = " ".join(out.split())
        assert flag in flat and f"(default: {default})" in flat, (argv, flag)


def test_bench_run_takes_draft_and_attainment_with_old_names_as_aliases():
    from wisp_sdk.cli import build_parser

    args = build_parser().parse_args(
        ["bench", "run", "--serve", "--target x", "--bundle", "B", "--target", "0.8", "--trace", "t"]
    )
    assert args.draft == "B" and args.attainment == 0.8
    args = build_parser().parse_args(
        ["bench", "run", "--serve", "--target x", "--draft", "B", "--attainment", "0.7", "--trace", "t"]
    )
    assert args.draft == "B" and args.attainment == 0.7


def test_edge_serve_fails_fast_on_a_down_server(tiny_bundle):
    import time

    t0 = time.monotonic()
    line = one_line(
        "edge", "serve", "--server", "ws://127.0.0.1:1", "--draft", str(tiny_bundle), "--port", "0"
    )
    assert "cannot connect to ws://127.0.0.1:1" in line and time.monotonic() - t0 < 30
    assert "without --api-key" in one_line(
        "edge", "serve", "--server", "ws://127.0.0.1:1", "--draft", str(tiny_bundle), "--host", "0.0.0.0"
    )
