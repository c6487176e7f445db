"""The scheduling policies inside the real server, over real websockets, with the tiny target/draft pair.

* wisp, sled and centralized, 20 sessions each with mixed SLOs: every session's greedy output is identical
  across policies and equal to transformers generate() of the target alone (speculation and scheduling are
  lossless), and the SLO accounting (/metrics, stats) saw every session.
* admission control: `--policy wisp` refuses a session it predicts would break admitted sessions' SLOs with
  `overloaded`, and counts the refusal.
* the CLI wiring: `--policy`, `--estimator`, `--engine` reach the server and the backend.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from metrics_scrape import scrape_metrics
from wisp_cloud.estimator import VerifyTimeEstimator
from wisp_sdk.protocol import SLO, Open
from ws_client import Client, Drafter, generate, running_server

MAX_NEW = 12
N_SESSIONS = 20
# Mixed SLOs: tight, medium and loose (TTFT ms, TPOT ms).
SLOS = [SLO(ttft_ms=300, tpot_ms=30), SLO(ttft_ms=1000, tpot_ms=100), SLO(ttft_ms=5000, tpot_ms=1000)]


def _prompts(n: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(11)
    # mostly short prompts, a few long ones (chunked prefill next to verifications)
    return [
        rng.integers(3, 380, size=int(rng.integers(150, 300) if i % 7 == 3 else rng.integers(4, 30))).tolist()
        for i in range(n)
    ]


async def _connect(server, backend) -> Client:
    client = await Client.connect(server.url)
    welcome = await client.hello(backend.tokenizer_fingerprint)
    assert welcome.type == "welcome", welcome
    assert welcome.policy == server.policy.name
    return client


async def _centralized(client: Client, prompt: list[int], slo: SLO) -> list[int]:
    opened = await client.open(prompt, max_new_tokens=MAX_NEW, mode="centralized", slo=slo)
    assert opened.type == "opened", opened
    tokens, done = [opened.next_token], opened.done
    while not done:
        msg = await client.recv()
        assert msg.type == "tokens", msg
        tokens += msg.tokens
        done = msg.done
    return tokens


async def _speculative(client: Client, drafter: Drafter, prompt: list[int], k: int, slo: SLO) -> list[int]:
    opened = await client.open(prompt, max_new_tokens=MAX_NEW, slo=slo)
    assert opened.type == "opened", opened
    assert opened.wait_hint_ms >= 0
    from wisp_sdk.protocol import SamplingParams
    from ws_client import Generation, run_round

    gen = Generation(opened.session_id, [opened.next_token])
    done = opened.done
    while not done:
        gen.rounds += 1
        done = await run_round(client, drafter, gen, prompt, k, SamplingParams())
        assert gen.verdicts[-1].wait_hint_ms > 0  # the scheduler's predicted wait for the next round
    return gen.tokens


def test_three_policies_mixed_slos_identical_greedy_outputs(backend, drafter, reference):
    prompts = _prompts(N_SESSIONS)
    # Warm the draft's memo and the reference first (they are not what is measured).
    refs = [reference(p, MAX_NEW) for p in prompts]

    async def run(policy: str):
        async with running_server(
            backend, policy=policy, metrics_port=0, max_batch=16, prefill_chunk=64, admission_target=0
        ) as server:

            async def one(i: int) -> list[int]:
                client = await _connect(server, backend)
                slo = SLOS[i % len(SLOS)]
                try:
                    if policy == "centralized":
                        return await _centralized(client, prompts[i], slo)
                    return await _speculative(client, drafter, prompts[i], k=1 + i % 5, slo=slo)
                finally:
                    await client.aclose()

            outs = await asyncio.gather(*(one(i) for i in range(N_SESSIONS)))
            await asyncio.sleep(0)
            return outs, server.stats(), scrape_metrics(server.metrics_port)

    results = {}
    for policy in ("wisp", "sled", "centralized"):
        outs, stats, metrics = asyncio.run(run(policy))
        results[policy] = outs
        assert stats["policy"] == policy
        slo = stats["slo"]
        assert slo["sessions"] == N_SESSIONS, slo  # every session judged (done -> finished)
        assert slo["ttft_p50_ms"] > 0 and slo["tpot_p50_ms"] > 0
        assert 0.0 <= slo["attainment"] <= 1.0
        assert slo["inflation_mean"] > 0
        assert metrics["wisp_slo_sessions"] == N_SESSIONS
        assert "wisp_slo_goodput_tok_s" in metrics and "wisp_slo_round_misses" in metrics
        if policy != "centralized":
            assert max(stats["batch_sizes"]) >= 2, stats  # sessions shared forward passes
    for policy, outs in results.items():
        for prompt, out, ref in zip(prompts, outs, refs, strict=True):
            assert out == ref, (policy, prompt)


def test_wisp_admission_refuses_with_overloaded(backend, drafter):
    # An estimator that says every item costs 40 ms: with a 100 ms TPOT target (E(4, 0.7) = 2.77 tokens a round,
    # so 277 ms a round) only a handful of sessions fit before admitted sessions would miss their SLO.
    est = VerifyTimeEstimator.default()
    est.coef = [0.04 if f == "batch" else c for f, c in zip(est.features, est.coef, strict=True)]
    slo = SLO(ttft_ms=5000, tpot_ms=100)

    async def main():
        from wisp_cloud.config import ServerConfig
        from wisp_cloud.server import WispServer

        cfg = ServerConfig(port=0, metrics_port=0, policy="wisp", max_batch=64, admission_target=0.9)
        server = WispServer(backend, cfg, estimator=est)
        assert server.estimator is est and server.policy.estimator is est
        await server.start()
        try:
            client = await _connect(server, backend)
            opened, refused = [], None
            for _ in range(40):
                msg = await client.request(Open(prompt_ids=[5, 6, 7, 8], max_new_tokens=64, slo=slo))
                if msg.type == "error":
                    refused = msg
                    break
                assert msg.type == "opened", msg
                opened.append(msg.session_id)
            # Once the admitted sessions end, there is room again.
            for sid in opened:
                assert (await client.close_session(sid)).type == "closed"
            again = await client.request(Open(prompt_ids=[5, 6, 7, 8], max_new_tokens=64, slo=slo))
            stats, metrics = server.stats(), scrape_metrics(server.metrics_port)
            await client.aclose()
            return opened, refused, again, stats, metrics
        finally:
            await server.stop()

    opened, refused, again, stats, metrics = asyncio.run(main())
    assert refused is not None, "admission control never refused"
    assert refused.code.value == "overloaded"
    assert "attainment" in refused.message
    assert 2 <= len(opened) <= 20, len(opened)
    assert again.type == "opened", again
    assert stats["slo"]["refused"] == 1
    assert metrics["wisp_slo_refused"] == 1
    assert metrics['wisp_errors_total{code="overloaded"}'] == 1


def test_sled_and_centralized_do_no_admission(backend):
    from wisp_cloud.config import ServerConfig
    from wisp_cloud.engine import Engine

    est = VerifyTimeEstimator.default()
    est.coef = [
        1.0 if f == "batch" else c for f, c in zip(est.features, est.coef, strict=True)
    ]  # 1 s an item
    for name in ("sled", "centralized", "fifo"):
        engine = Engine(backend, ServerConfig(policy=name), est)
        assert engine.admission is None and engine.policy.name == name
        engine.close()
    for target, has in ((0.9, True), (0.0, False)):
        engine = Engine(backend, ServerConfig(policy="wisp", admission_target=target), est)
        assert (engine.admission is not None) is has
        engine.close()


def test_cli_serves_wisp_with_an_estimator_on_the_paged_engine(tiny_target, drafter, reference, tmp_path):
    """`wisp serve --policy wisp --estimator FILE --engine paged --save-estimator OUT` as a real subprocess."""
    import signal

    from test_cloud_cli import start_server

    est_in, est_out = tmp_path / "est.json", tmp_path / "refined.json"
    VerifyTimeEstimator.default().save(est_in)
    proc, url = start_server(
        tiny_target,
        "--threads",
        "1",
        "--policy",
        "wisp",
        "--estimator",
        str(est_in),
        "--save-estimator",
        str(est_out),
        "--engine",
        "paged",
        "--kv-budget-tokens",
        "8192",
        "--admission-target",
        "0",
    )
    prompt = [5, 17, 42, 99, 123, 7, 8, 9]

    async def main():
        client = await Client.connect(url)
        welcome = await client.hello(_fp(tiny_target))
        assert welcome.policy == "wisp"
        gen = await generate(client, drafter, prompt, MAX_NEW, k=3)
        await client.aclose()
        return gen

    try:
        gen = asyncio.run(main())
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    stderr = proc.stderr.read()
    assert rc == 0, stderr[-2000:]
    assert "engine backend=paged" in stderr and "policy=wisp" in stderr
    assert gen.tokens == reference(prompt, MAX_NEW)
    refined = VerifyTimeEstimator.load(est_out)  # the online-refined estimator was written on exit
    assert refined.features == VerifyTimeEstimator.load(est_in).features


def _fp(target) -> str:
    from wisp_sdk.bundle import tokenizer_fingerprint

    return tokenizer_fingerprint(Path(target) / "tokenizer.json")


def test_cli_rejects_unknown_policy(tiny_target):
    import argparse

    from wisp_cloud import cli_serve

    parser = argparse.ArgumentParser()
    cli_serve.add_parser(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--target", str(tiny_target), "--policy", "nope"])
    args = parser.parse_args(["serve", "--target", str(tiny_target), "--policy", "sled"])
    assert (args.policy, args.engine, args.estimator, args.admission_target) == ("sled", "auto", None, 0.9)


def test_wisp_on_the_paged_engine(tiny_target, drafter, reference):
    """The engine `wisp serve --backend native` uses on CUDA (here on CPU): same greedy outputs under wisp."""
    from wisp_cloud.backends.paged import PagedBackend

    paged = PagedBackend(tiny_target, device="cpu", kv_budget_tokens=16384)
    prompts = _prompts(8)

    async def main():
        async with running_server(
            paged, policy="wisp", max_batch=16, prefill_chunk=64, kv_budget_tokens=16384
        ) as server:

            async def one(i: int) -> list[int]:
                client = await _connect(server, paged)
                try:
                    return await _speculative(client, drafter, prompts[i], k=1 + i % 5, slo=SLOS[i % 3])
                finally:
                    await client.aclose()

            return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    for prompt, out in zip(prompts, asyncio.run(main()), strict=True):
        assert out == reference(prompt, MAX_NEW)
