"""Server-priced speculation, truncated verification and the load-adaptive hybrid, end to end and lossless.

Real websockets on loopback, the in-process server (the `wisp serve` code path) with the tiny target, and the
real SDK client with the tiny ONNX draft. Switches and truncation are forced with the server's test hooks
(`hybrid_every`, `verify_cap`), so every generation crosses them several times.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from cli_process import ServerProcess
from reference import pooled_counts, target_tree
from scipy.stats import chisquare
from wisp_sdk import AsyncEdgeClient, FixedK
from wisp_sdk.protocol import SamplingParams, Switch, Tokens, Verdict
from ws_client import Client, Drafter, running_server

MAX_NEW = 20
PROMPTS = [[5, 17, 42, 99, 123], [7, 8, 9, 10, 11, 12, 13, 200], [300, 12, 45]]


@pytest.mark.parametrize(
    "hooks",
    [
        {"hybrid_every": 2},
        {"verify_cap": 1},
        {"hybrid_every": 3, "verify_cap": 2},
    ],
)
def test_sdk_greedy_is_identical_across_switches_and_truncation(backend, tiny_bundle, reference, hooks):
    async def main():
        async with running_server(backend, **hooks) as server:
            async with AsyncEdgeClient(server.url, tiny_bundle, threads=1, controller=FixedK(4)) as client:
                return [await client.generate(p, max_new_tokens=MAX_NEW) for p in PROMPTS]

    results = asyncio.run(main())
    for prompt, res in zip(PROMPTS, results, strict=True):
        assert res.token_ids == reference(prompt, MAX_NEW)
        rounds = res.stats.rounds
        if "hybrid_every" in hooks:
            assert res.stats.switches >= 2, res.stats  # out to the server and back at least once
        if "verify_cap" in hooks:
            cap = hooks["verify_cap"]
            truncated = [r for r in rounds if r.unverified]
            assert truncated and all(r.drafted - r.unverified == cap for r in truncated)
            assert all(r.accepted <= r.drafted - r.unverified for r in rounds)


def test_sdk_wisp_controller_greedy_identical_under_the_wisp_policy(backend, tiny_bundle, reference):
    """`--policy wisp` with the hybrid and truncation on by default (no hooks): output unchanged."""

    async def main():
        async with running_server(backend, policy="wisp", hybrid=True) as server:
            async with AsyncEdgeClient(server.url, tiny_bundle, threads=1) as client:
                return [await client.generate(p, max_new_tokens=MAX_NEW) for p in PROMPTS]

    for prompt, res in zip(PROMPTS, asyncio.run(main()), strict=True):
        assert res.token_ids == reference(prompt, MAX_NEW)


# ---- sampling: the committed continuation keeps the target's distribution through truncation and switches ----

SAMPLING = SamplingParams(temperature=1.0, top_k=4)
SAMPLE_PROMPT = [5, 17, 42, 99, 123]
N_RUNS = 900


async def _sampled_run(
    client: Client, drafter: Drafter, seed: int, start: bool
) -> tuple[list[int], bool, bool]:
    """Open, one round of 2 drafts (the server verifies 1 of them and switches the session to its own decoding),
    then whatever Tokens and Switch frames come, rounds again after a switch back, until 3 tokens. `start`: offer to
    start on the server (taken: Tokens first, then a Switch to the edge)."""
    sp = SAMPLING.model_copy(update={"seed": seed})
    rng = np.random.default_rng(50_000 + seed)
    opened = await client.open(SAMPLE_PROMPT, max_new_tokens=3, sampling=sp, start_on_server=start)
    assert opened.mode == "speculative" or start, opened
    central = opened.mode == "centralized"
    tokens, done, rnd, switched = [opened.next_token], opened.done, 0, central
    while not done:
        if central:
            msg = await client.recv()
            if isinstance(msg, Switch):
                central = False
                continue
            assert isinstance(msg, Tokens), msg
            tokens += msg.tokens
            done = msg.done
            continue
        rnd += 1
        ctx = SAMPLE_PROMPT + tokens
        draft, q_ids, q_probs = drafter.draft_sampled(ctx, 2, sp, rng)
        v = await client.round(opened.session_id, rnd, len(ctx), draft, q_ids, q_probs)
        assert isinstance(v, Verdict), v
        assert v.unverified == 1 and v.accepted <= 1
        tokens += draft[: v.accepted] + [v.next_token]
        done, central = v.done, v.centralize
        switched |= central
    await client.close_session(opened.session_id)
    return tokens, switched, opened.mode == "centralized"


@pytest.mark.parametrize("start", [False, True], ids=["start-on-edge", "start-on-server"])
def test_sampling_is_exact_through_truncation_and_switches(backend, drafter, target_model, start):
    exact = target_tree(target_model, SAMPLE_PROMPT, 3, SAMPLING)
    # start-on-server: the wisp policy with its regime takes the offer (admission off: 30 workers open at once)
    server_kw = {"policy": "wisp", "admission_target": 0.0} if start else {}

    async def main():
        async with running_server(backend, hybrid_every=1, verify_cap=1, **server_kw) as server:
            counts: dict[tuple[int, ...], int] = {}
            switched = started = 0
            seeds = iter(range(N_RUNS))

            async def worker():
                client = await Client.connect(server.url)
                await client.hello(backend.tokenizer_fingerprint)
                nonlocal switched, started
                for seed in seeds:
                    tokens, moved, began = await _sampled_run(client, drafter, seed, start)
                    started += began
                    counts[tuple(tokens)] = counts.get(tuple(tokens), 0) + 1
                    switched += moved
                await client.aclose()

            await asyncio.gather(*(worker() for _ in range(30)))
            return counts, switched, started

    counts, switched, started = asyncio.run(main())
    assert sum(counts.values()) == N_RUNS
    assert switched > N_RUNS // 4  # a third token decoded by the server after a switch, in many runs
    # with the offer, every session (the probes too) started decoded by the server; without, none
    assert started == (N_RUNS if start else 0), started
    obs, exp = pooled_counts(counts, exact, N_RUNS)
    assert chisquare(obs, exp).pvalue > 1e-3, (obs, exp)


# ---- reconnects across switches: a lost switch verdict, Tokens or Switch frame loses and repeats nothing ----


@pytest.fixture(scope="module")
def hybrid_server(tiny_target):
    srv = ServerProcess(tiny_target, 0, "--debug-hybrid-every", "2")
    yield srv
    srv.stop()


@pytest.mark.parametrize("how", ["cut", "drop"])
def test_sdk_resumes_across_switches(hybrid_server, tiny_bundle, reference, how):
    from test_sdk_faults import CutProxy
    from wisp_sdk import EdgeClient

    proxy = CutProxy(hybrid_server.port)
    try:
        # A dropped frame leaves the connection up (TCP never loses one without a cut): the client only notices
        # when its response timeout fires, then resumes. 5 s, not the default 60, so a lost Switch or last Tokens
        # frame costs seconds, not minutes (answers on the tiny model take milliseconds).
        with EdgeClient(proxy.url, tiny_bundle, threads=1, resume_deadline_s=60, response_timeout_s=5) as c:
            for prompt in PROMPTS:
                n = 0
                for _ in c.stream(prompt, max_new_tokens=30, controller=FixedK(2)):
                    n += 1
                    if n in (2, 4, 7, 11):
                        if how == "cut":
                            proxy.cut()
                        else:  # the next frame (a verdict, Tokens or Switch) is applied by the server, then lost
                            proxy.drop_next_downlink.set()
                res = c.last_result
                assert res is not None
                assert res.token_ids == reference(prompt, 30), (how, prompt)
                assert res.stats.reopened == 0  # resumed every time, never rebuilt
                assert res.stats.switches >= 2
        assert proxy.cuts >= 3
    finally:
        proxy.close()
