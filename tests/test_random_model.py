"""Random-weight targets (`--random-config`): the stable-argmax construction, `wisp profile` and `wisp serve`.

The bench's emulated devices replay continuations precomputed by the server; they only stay on track if the
server's greedy token does not depend on batch shape. These tests check that a stable-argmax model's greedy
next token is `next_token[last]` in ragged paged batches of every shape, and that the CLI paths run.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


def test_named_configs_load_and_bad_spec_errors(tmp_path):
    from wisp_cloud.random_model import CONFIGS, load_config
    from wisp_sdk.errors import WispError

    for name in CONFIGS:
        cfg = load_config(name)
        assert cfg.hidden_size > 0 and cfg.vocab_size > 100_000
    with pytest.raises(WispError, match="not one of"):
        load_config(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(WispError, match="model_type"):
        load_config(str(tmp_path))


def test_stable_argmax_is_batch_shape_invariant(tiny_target):
    from wisp_cloud.backends.base import WorkItem
    from wisp_cloud.backends.paged import PagedBackend
    from wisp_cloud.random_model import build_random_model, next_token_map, special_ids

    model = build_random_model(str(tiny_target), "cpu", "float32", seed=3, stable_argmax=True)
    nxt = next_token_map(model.config.vocab_size, special_ids(model.config), 3)
    assert not set(nxt.tolist()) & special_ids(model.config)
    be = PagedBackend(model, "cpu", "float32", kv_budget_tokens=4096)
    rng = random.Random(0)
    vocab = model.config.vocab_size
    for step in range(6):  # ragged batches: prefill chunks and verifies of several lengths together
        items = []
        for b in range(rng.randint(1, 5)):
            seq = f"s{step}-{b}"
            toks = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
            items.append(WorkItem(seq, toks, n_logits=min(len(toks), 6)))
        results, _ = be.forward(items)
        for it, res in zip(items, results, strict=True):
            want = [int(nxt[t]) for t in it.new_tokens[-len(res.argmax) :]]
            assert res.argmax == want
            be.release(it.seq_id)


def test_profile_random_config_reports_heldout_mape(tmp_path, tiny_target):
    out = tmp_path / "est.json"
    cmd = [sys.executable, "-m", "wisp_sdk.cli", "profile", "--random-config", str(tiny_target)]
    cmd += [
        "--device",
        "cpu",
        "--grid",
        "quick",
        "--reps",
        "1",
        "--kv-budget-tokens",
        "20000",
        "--max-batch",
        "16",
    ]
    proc = subprocess.run(
        [*cmd, "--out", str(out), "--json", "--no-progress"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heldout_batches"] > 0 and report["heldout_mape_pct"] >= 0.0
    saved = json.loads(out.read_text())
    assert saved["meta"]["engine"] == "paged"
    bad = subprocess.run(
        [sys.executable, "-m", "wisp_sdk.cli", "profile", "--out", str(out)], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "--random-config" in bad.stderr


def test_serve_random_config_speculative_equals_centralized(tmp_path, tiny_target, tiny_bundle):
    """`wisp serve --random-config --stable-argmax`: greedy outputs follow the map, whichever mode asks."""
    from wisp_cloud.fleet.server_proc import ServerProc
    from wisp_cloud.random_model import next_token_map, special_ids
    from wisp_sdk.client import AsyncEdgeClient

    args = ["--random-config", str(tiny_target), "--stable-argmax", "--tokenizer-from", str(tiny_bundle)]
    args += ["--seed", "5", "--device", "cpu", "--threads", "1"]
    prompt = [5, 17, 33, 60, 61]

    async def gen(url: str, mode: str) -> list[int]:
        async with AsyncEdgeClient(url, str(tiny_bundle), mode=mode) as c:
            return (await c.generate(prompt, max_new_tokens=12)).token_ids

    with ServerProc(args, "wisp", tmp_path / "serve.log") as server:
        central = asyncio.run(gen(server.url, "centralized"))
        spec = asyncio.run(gen(server.url, "speculative"))
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_target)
    vocab = json.loads((Path(tiny_bundle) / "tokenizer.json").read_text())["model"]["vocab"]
    nxt = next_token_map(cfg.vocab_size, special_ids(cfg), 5, len(vocab))
    want, last = [], prompt[-1]
    for _ in range(12):
        last = int(nxt[last])
        want.append(last)
    assert central == want
    assert spec == want


@pytest.mark.parametrize("cmd", ["serve", "profile"])
def test_cli_rejects_random_weight_options_without_random_config(tmp_path, tiny_target, cmd):
    base = [sys.executable, "-m", "wisp_sdk.cli", cmd, "--target", str(tiny_target), "--stable-argmax"]
    extra = ["--out", str(tmp_path / "e.json")] if cmd == "profile" else []
    proc = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--stable-argmax goes with --random-config" in proc.stderr
    both = [
        sys.executable,
        "-m",
        "wisp_sdk.cli",
        cmd,
        "--target",
        str(tiny_target),
        "--random-config",
        "qwen2.5-7b",
    ]
    proc = subprocess.run([*both, *extra], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "either --target" in proc.stderr


def test_profile_caps_contexts_to_the_kv_pool(tmp_path, tiny_target):
    """A grid whose batches would not fit the KV pool profiles shorter contexts, or says what to raise."""
    base = [sys.executable, "-m", "wisp_sdk.cli", "profile", "--random-config", str(tiny_target)]
    base += ["--device", "cpu", "--grid", "quick", "--reps", "1", "--no-progress", "--max-batch", "16"]
    out = tmp_path / "est.json"
    proc = subprocess.run(
        [*base, "--kv-budget-tokens", "8000", "--out", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the grid gives a batch of B sequences contexts of at most pool/B - 272 tokens: 228 at B = 16
    assert "batches up to 16" in proc.stdout
    saved = json.loads(out.read_text())
    assert saved["meta"]["max_batch"] == 16
    small = subprocess.run(
        [*base, "--kv-budget-tokens", "2000", "--out", str(out)], capture_output=True, text=True
    )
    assert small.returncode != 0 and "Traceback" not in small.stderr
    assert "give a larger --kv-budget-tokens" in small.stderr
