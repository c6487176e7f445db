"""End to end: the SDK against a real `wisp serve` over real websockets, with a real ONNX draft.

Nothing of ours is mocked: the server is the `wisp serve` CLI in a subprocess, the draft is the tiny draft
exported to ONNX, and the reference is `transformers` generate of the target alone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from wisp_sdk import EdgeClient, FixedK, ServerError, Wisp

PROMPTS = [
    [{"role": "user", "content": "Write a function that returns the sum of a list of numbers."}],
    "def fibonacci(n):\n",
    [{"role": "user", "content": "Explain how binary search works."}],
]


class ServerProcess:
    """`wisp serve` in a subprocess; `url` once it printed `listening on ws://HOST:PORT`."""

    def __init__(self, target: Path, port: int = 0, *extra: str, timeout: float = 180.0) -> None:
        cmd = [
            sys.executable,
            "-m",
            "wisp_sdk.cli",
            "serve",
            "--target",
            str(target),
            "--port",
            str(port),
            *extra,
        ]
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
                m = re.search(r"listening on (wss?://\S+)", line)
                if m and not found.is_set():
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(timeout) or not self.url:
            self.kill()
            raise RuntimeError("wisp serve did not start:\n" + "".join(self.lines[-30:]))
        self.port = int(self.url.rsplit(":", 1)[1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    x = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.fixture(scope="module")
def server(tiny_target):
    srv = ServerProcess(tiny_target)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def target_model(tiny_target):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def client(server, tiny_bundle):
    c = EdgeClient(server.url, tiny_bundle, threads=1)
    yield c
    c.close()


@pytest.mark.parametrize("controller", ["wisp", "fixed:4", "wisp+ahead"])
def test_greedy_is_token_identical_to_transformers(client, target_model, controller):
    for prompt in PROMPTS:
        ids = client.encode_prompt(prompt)
        ref = hf_greedy(target_model, ids, 24)
        res = client.generate(prompt, max_new_tokens=24, controller=controller)
        assert res.token_ids == ref, f"{controller} on {prompt!r}"
        assert res.stats.new_tokens == len(ref)
        assert res.text == client.tokenizer.decode(ref)
        rounds = res.stats.rounds
        assert rounds and all(r.accepted <= r.drafted for r in rounds)
        assert sum(r.committed for r in rounds) + 1 == len(ref)  # + the token Opened committed


def test_stream_yields_deltas_that_make_the_text(client):
    deltas = list(client.stream(PROMPTS[0], max_new_tokens=20))
    res = client.last_result
    assert res is not None and "".join(deltas) == res.text and len(deltas) > 1


def test_stop_string_ends_generation(client, target_model):
    full = client.generate(PROMPTS[1], max_new_tokens=24)
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    res = client.generate(PROMPTS[1], max_new_tokens=24, stop=[stop])
    assert res.finish_reason == "stop" and res.text == text[: text.index(stop)]
    assert res.token_ids == full.token_ids[: len(res.token_ids)]


def test_wisp_wastes_fewer_draft_tokens_than_fixed8(client):
    wisp, fixed = [], []
    for prompt in PROMPTS:
        a = client.generate(prompt, max_new_tokens=32, controller=Wisp())
        b = client.generate(prompt, max_new_tokens=32, controller=FixedK(8))
        assert a.token_ids == b.token_ids  # equal output
        wisp.append(a.stats)
        fixed.append(b.stats)
    wasted_wisp = sum(s.wasted_tokens for s in wisp)
    wasted_fixed = sum(s.wasted_tokens for s in fixed)
    assert wasted_wisp < wasted_fixed, (wasted_wisp, wasted_fixed)
    draft_wasted_wisp = sum(r.wasted_ms - r.idle_ms for s in wisp for r in s.rounds)
    draft_wasted_fixed = sum(r.wasted_ms - r.idle_ms for s in fixed for r in s.rounds)
    assert draft_wasted_wisp < draft_wasted_fixed


def test_centralized_mode_streams_the_targets_tokens(server, tiny_bundle, target_model):
    with EdgeClient(server.url, tiny_bundle, mode="centralized") as c:
        ids = c.encode_prompt(PROMPTS[0])
        res = c.generate(PROMPTS[0], max_new_tokens=16)
    assert res.token_ids == hf_greedy(target_model, ids, 16)
    assert res.stats.mode == "centralized" and not res.stats.rounds


def test_tokenizer_mismatch_is_a_clear_error(server, tiny_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad-bundle"
    shutil.copytree(tiny_bundle, bad)
    manifest = json.loads((bad / "wisp-draft.json").read_text())
    manifest["tokenizer_fingerprint"] = "sha256:" + "0" * 64
    (bad / "wisp-draft.json").write_text(json.dumps(manifest))
    with EdgeClient(server.url, bad) as c, pytest.raises(ServerError) as err:
        c.generate("hello", max_new_tokens=4)
    assert err.value.code == "tokenizer_mismatch"


def test_cli_generate_json_and_stats_line(server, tiny_bundle):
    base = [
        sys.executable,
        "-m",
        "wisp_sdk.cli",
        "generate",
        "--server",
        server.url,
        "--draft",
        str(tiny_bundle),
    ]
    out = subprocess.run(
        [
            *base,
            "--json",
            "--max-new-tokens",
            "12",
            "--controller",
            "fixed:3",
            "Explain how binary search works.",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == {"text", "token_ids", "stats"} and len(data["token_ids"]) == 12
    assert data["stats"]["controller"] == "fixed:3" and data["stats"]["rounds"]
    out = subprocess.run(
        [*base, "--max-new-tokens", "8", "Explain how binary search works."],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    # the stats line goes to stderr, so `> out.txt` captures the text alone
    last = [ln for ln in out.stderr.strip().splitlines() if "tokens=" in ln][-1]
    for key in ("tokens=8", "mean_accepted=", "acceptance=", "ttft=", "tpot=", "wasted_draft="):
        assert key in last
    assert "tokens=" not in out.stdout
    version = subprocess.run(
        [sys.executable, "-m", "wisp_sdk.cli", "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0 and version.stdout.startswith("wisp ")


def _target_joint(
    model, prompt_ids: list[int], temperature: float, top_k: int, depth: int
) -> dict[tuple, float]:
    """Exact P(t1..t_depth) of the target under temperature + top-k (HF warper semantics)."""
    import torch
    from wisp_sdk.sampling import hf_reference_probs

    out: dict[tuple, float] = {}

    def walk(prefix: tuple, p: float) -> None:
        if len(prefix) == depth:
            out[prefix] = p
            return
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + list(prefix)])).logits[0, -1].numpy()
        probs = hf_reference_probs(logits, temperature, top_k)
        for t in np.nonzero(probs)[0]:
            walk((*prefix, int(t)), p * float(probs[t]))

    walk((), 1.0)
    return out


@pytest.mark.slow
def test_sampling_matches_the_targets_distribution(server, tiny_bundle, target_model):
    """Chi-square of (t1, t2, t3) over seeded runs vs the target's exact joint: drafts, q and acceptance."""
    from scipy.stats import chisquare

    temperature, top_k, n_runs, n_clients = 1.0, 3, 360, 4
    prompt = PROMPTS[1]
    counts: Counter = Counter()
    lock = threading.Lock()

    def worker(w: int) -> None:
        with EdgeClient(server.url, tiny_bundle, threads=1, controller=FixedK(2)) as c:
            for i in range(w, n_runs, n_clients):
                r = c.generate(prompt, max_new_tokens=4, temperature=temperature, top_k=top_k, seed=1000 + i)
                with lock:
                    counts[tuple(r.token_ids[:3])] += 1

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sum(counts.values()) == n_runs
    with EdgeClient(server.url, tiny_bundle) as c:
        ids = c.encode_prompt(prompt)
    joint = _target_joint(target_model, ids, temperature, top_k, 3)
    assert set(counts) <= set(joint), "sampled a sequence the target gives probability 0"
    # Pool cells with small expectations so that the chi-square approximation holds.
    cells = sorted(joint, key=lambda k: -joint[k])
    obs, exp, acc_o, acc_e = [], [], 0.0, 0.0
    for k in cells:
        e = joint[k] * n_runs
        if e >= 5:
            obs.append(counts[k])
            exp.append(e)
        else:
            acc_o += counts[k]
            acc_e += e
    obs.append(acc_o)
    exp.append(acc_e)
    stat, pvalue = chisquare(obs, exp)
    assert pvalue > 1e-3, (stat, pvalue, list(zip(obs, exp, strict=True)))


@pytest.mark.real
@pytest.mark.skipif(os.environ.get("WISP_REAL") != "1", reason="real pair: set WISP_REAL=1")
def test_real_pair_wisp_wastes_less_than_fixed8(request):
    """Qwen2.5-Coder 1.5B target on CPU, 0.5B draft bundle: equal greedy output, less wasted drafting."""
    from wisp_export.fetch import resolve_model

    target = resolve_model(os.environ.get("WISP_REAL_TARGET", "qwen2.5-coder-1.5b-instruct"))
    # The q8 0.5B bundle is exported once per test session and shared with the export tests.
    bundle = os.environ.get("WISP_REAL_BUNDLE") or request.getfixturevalue("real_q8_bundle")[1].bundle
    srv = ServerProcess(target, 0, timeout=900)
    try:
        with EdgeClient(srv.url, bundle) as c:
            # Prose, where draft and target disagree now and then (on code the pair agrees almost always).
            prompt = [{"role": "user", "content": "Explain the difference between a process and a thread."}]
            a = c.generate(prompt, max_new_tokens=64, controller=Wisp())
            b = c.generate(prompt, max_new_tokens=64, controller=FixedK(8))
        print("wisp:", a.stats.summary(), "\nfixed:8:", b.stats.summary())
        print("wisp rounds (drafted, accepted):", [(r.drafted, r.accepted) for r in a.stats.rounds])
        assert a.token_ids == b.token_ids
        assert a.stats.wasted_tokens < b.stats.wasted_tokens
        draft_a = sum(r.wasted_ms - r.idle_ms for r in a.stats.rounds)
        draft_b = sum(r.wasted_ms - r.idle_ms for r in b.stats.rounds)
        assert draft_a < draft_b
    finally:
        srv.stop()


def test_context_limit_finishes_with_length(server, tiny_bundle):
    """The server's context limit ends a generation with `length`, as HF and OpenAI call it."""
    prompt = [5 + i % 300 for i in range(505)]  # the tiny target holds 512 positions
    with EdgeClient(server.url, str(tiny_bundle), controller="fixed:3") as c:
        res = c.generate(prompt, max_new_tokens=100)
    assert res.finish_reason == "length" and 0 < len(res.token_ids) < 100
