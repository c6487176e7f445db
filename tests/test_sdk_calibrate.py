"""`wisp calibrate` on the tiny pair, and the edge SDK's no-torch rule."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from wisp_sdk.bundle import load_manifest
from wisp_sdk.controllers import Wisp, make_controller
from wisp_sdk.predictor import FEATURES, RejectionPredictor


@pytest.mark.slow
def test_calibrate_fits_and_stores_the_predictor(tiny_bundle, tiny_target, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "Write quicksort in Python.\n"
        + json.dumps({"messages": [{"role": "user", "content": "Explain how binary search works."}]})
        + "\ndef fibonacci(n):\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "wisp_sdk.cli",
        "calibrate",
        "--draft",
        str(bundle),
        "--target",
        str(tiny_target),
    ]
    out = subprocess.run(
        [*cmd, "--prompts", str(prompts), "--max-new-tokens", "24"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "predictor written to" in out.stdout
    stored = load_manifest(bundle).predictor
    assert stored is not None and stored["source"] == "calibrated" and stored["features"] == list(FEATURES)
    assert stored["n_train"] > 20 and 0.0 <= stored["greedy_agreement"] <= 1.0
    pred = RejectionPredictor.from_dict(stored)
    ctl = make_controller("wisp", pred)
    assert isinstance(ctl, Wisp) and list(ctl.predictor.weights) == list(pred.weights)
    assert 0.0 < pred.p_accept(0.9, 0.5, 1, 0.5) < 1.0


def test_calibrate_refuses_a_non_bundle(tiny_target, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "wisp_sdk.cli",
        "calibrate",
        "--draft",
        str(tmp_path),
        "--target",
        str(tiny_target),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not a draft bundle" in out.stderr


def test_edge_sdk_never_imports_torch():
    code = (
        "import sys\n"
        "import wisp_sdk, wisp_sdk.client, wisp_sdk.cli_generate, wisp_sdk.cli_calibrate, wisp_sdk.calibration\n"
        "import wisp_sdk.controllers, wisp_sdk.draft_runner, wisp_sdk.session, wisp_sdk.tokenizer\n"
        "bad = [m for m in ('torch', 'transformers', 'wisp_cloud') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
