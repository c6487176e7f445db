"""End to end: the SDK against a real `wisp serve` over real websockets, with a real ONNX draft.

Nothing of ours is mocked: the server is the `wisp serve` CLI in a subprocess, the draft is the tiny draft
exported to ONNX, and the reference is `transformers` generate of the target alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter

import pytest
from cli_process import ServerProcess
from reference import pooled_counts, target_tree
from wisp_sdk import EdgeClient, FixedK, ServerError, Wisp
from wisp_sdk.protocol import SamplingParams

PROMPTS = [
    [{"role": "user", "content": "Write a function that returns the sum of a list of numbers."}],
    "def fibonacci(n):\n",
    [{"role": "user", "content": "Explain how binary search works."}],
]


@pytest.fixture(scope="module")
def server(tiny_target):
    srv = ServerProcess(tiny_target)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server, tiny_bundle):
    c = EdgeClient(server.url, tiny_bundle, threads=1)
    yield c
    c.close()


@pytest.mark.parametrize("controller", ["wisp", "fixed:4", "wisp+ahead", "wisp+tree"])
def test_greedy_is_token_identical_to_transformers(client, reference, controller):
    for prompt in PROMPTS:
        ids = client.encode_prompt(prompt)
        ref = reference(ids, 24)
        res = client.generate(prompt, max_new_tokens=24, controller=controller)
        assert res.token_ids == ref, f"{controller} on {prompt!r}"
        assert res.stats.new_tokens == len(ref)
        assert res.text == client.tokenizer.decode(ref)
        rounds = res.stats.rounds
        assert rounds and all(r.accepted <= r.drafted for r in rounds)
        assert sum(r.committed for r in rounds) + 1 == len(ref)  # + the token Opened committed


def test_token_trees_commit_siblings_and_stay_token_identical(client, reference):
    """Rounds carrying a sibling per draft token (the draft's second choice): the server commits a sibling where
    its draft token is rejected and it is the target's token, and the output stays the target's alone."""
    sent = hits = 0
    for prompt in [*PROMPTS, "import numpy as np\n", "The capital of France is"]:
        ids = client.encode_prompt(prompt)
        ref = reference(ids, 40)
        res = client.generate(prompt, max_new_tokens=40, controller=Wisp(tree=4))
        assert res.token_ids == ref, prompt
        rounds = res.stats.rounds
        assert sum(r.committed for r in rounds) + 1 == len(ref)
        sent += sum(r.siblings for r in rounds)
        hits += sum(r.sibling for r in rounds)
        # a committed sibling is one more token than the accepted draft and the target's token
        assert all(r.committed == r.accepted + 1 + r.sibling for r in rounds if not r.resent)
    assert sent > 10 and hits > 0, (sent, hits)


def test_stream_yields_deltas_that_make_the_text(client):
    deltas = list(client.stream(PROMPTS[0], max_new_tokens=20))
    res = client.last_result
    assert res is not None and "".join(deltas) == res.text and len(deltas) > 1


def test_stop_string_ends_generation(client):
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


def test_centralized_mode_streams_the_targets_tokens(server, tiny_bundle, reference):
    with EdgeClient(server.url, tiny_bundle, mode="centralized") as c:
        ids = c.encode_prompt(PROMPTS[0])
        res = c.generate(PROMPTS[0], max_new_tokens=16)
    assert res.token_ids == reference(ids, 16)
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


@pytest.mark.slow
@pytest.mark.parametrize("controller", ["fixed:2", "wisp+tree"])
def test_sampling_matches_the_targets_distribution(server, tiny_bundle, target_model, controller):
    """Chi-square of (t1, t2, t3) over seeded runs vs the target's exact joint: drafts, q and acceptance; with
    `wisp+tree` the rounds carry siblings (second draws from q) and their recursive rejection too."""
    from scipy.stats import chisquare

    temperature, top_k, n_runs, n_clients = 1.0, 3, 360, 4
    prompt = PROMPTS[1]
    counts: Counter = Counter()
    trees: Counter = Counter()
    lock = threading.Lock()

    def worker(w: int) -> None:
        with EdgeClient(server.url, tiny_bundle, threads=1, controller=controller) as c:
            for i in range(w, n_runs, n_clients):
                r = c.generate(prompt, max_new_tokens=4, temperature=temperature, top_k=top_k, seed=1000 + i)
                with lock:
                    counts[tuple(r.token_ids[:3])] += 1
                    trees["sent"] += sum(x.siblings for x in r.stats.rounds)
                    trees["hits"] += sum(x.sibling for x in r.stats.rounds)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sum(counts.values()) == n_runs
    if controller == "wisp+tree":
        assert trees["hits"] > 10, trees  # the sibling path ran
    with EdgeClient(server.url, tiny_bundle) as c:
        ids = c.encode_prompt(prompt)
    joint = target_tree(target_model, ids, 3, SamplingParams(temperature=temperature, top_k=top_k))
    assert set(counts) <= set(joint), "sampled a sequence the target gives probability 0"
    obs, exp = pooled_counts(counts, joint, n_runs)
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
