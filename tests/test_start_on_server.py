"""Sessions that start on the server (Open.start_on_server, taken by `wisp serve --policy wisp` with its regime on, the default): the server decodes
while the device's draft prefills the prompt, then hands the session to the edge with a Switch. Real websockets on
loopback, the in-process server with the tiny target, the real SDK client with the tiny ONNX draft; lossless."""

from __future__ import annotations

import asyncio
import time

import pytest
from wisp_cloud.sched.regime import PROBE_CAP
from wisp_sdk import AsyncEdgeClient, FixedK
from wisp_sdk.protocol import Opened, Switch, Tokens
from wisp_sdk.session import offers_start_on_server, server_decodes_next
from ws_client import Client, running_server

PROMPTS = [[5, 17, 42, 99, 123], [7, 8, 9, 10, 11, 12, 13, 200], [300, 12, 45]]
MAX_NEW = 40  # past the hybrid's 16-token dwell: every session is handed to the edge and drafts


def test_sdk_greedy_is_identical_when_sessions_start_on_the_server(backend, tiny_bundle, reference):
    async def main():
        async with running_server(backend, policy="wisp", hybrid=True, regime=True) as server:
            async with AsyncEdgeClient(
                server.url, tiny_bundle, threads=1, controller=FixedK(3), start_on_server=True
            ) as client:
                results = [await client.generate(p, max_new_tokens=MAX_NEW) for p in PROMPTS]
            registry = server.engine.metrics.registry
            # three sessions are too few samples for a decision: still speculative, no capacities yet
            assert registry.get_sample_value("wisp_regime_centralized") == 0.0
            assert registry.get_sample_value("wisp_regime_capacity", {"mode": "speculative"}) == -1.0
            return results

    for prompt, res in zip(PROMPTS, asyncio.run(main()), strict=True):
        assert res.token_ids == reference(prompt, MAX_NEW)
        assert res.stats.switches >= 1, res.stats  # handed from the server to the edge
        assert res.stats.rounds, res.stats  # ... and it drafted there
        assert sum(r.committed for r in res.stats.rounds) < MAX_NEW - 16  # the first 16 tokens were decoded


@pytest.mark.parametrize("regime, take", [(True, True), (False, True), (True, False)])
def test_the_server_takes_the_offer_only_with_the_regime(backend, regime, take):
    """`--no-start-on-server` (take=False) declines the offer although the regime is on."""

    async def main():
        async with running_server(
            backend, policy="wisp", hybrid=True, regime=regime, start_on_server=take
        ) as server:
            client = await Client.connect(server.url)
            await client.hello(backend.tokenizer_fingerprint)
            opened = await client.open(PROMPTS[0], max_new_tokens=24, start_on_server=True)
            assert isinstance(opened, Opened)
            frames = []
            if opened.mode == "centralized":  # Tokens until the Switch hands it to the edge
                while not frames or isinstance(frames[-1], Tokens) and not frames[-1].done:
                    frames.append(await client.recv())
            await client.close_session(opened.session_id)
            await client.aclose()
            return opened, frames

    opened, frames = asyncio.run(main())
    if not (regime and take):
        assert opened.mode == "speculative" and not frames
        return
    assert opened.mode == "centralized"
    tokens = [t for f in frames if isinstance(f, Tokens) for t in f.tokens]
    assert isinstance(frames[-1], Switch) and frames[-1].committed_len == len(PROMPTS[0]) + 1 + len(tokens)
    assert len(tokens) == 16  # the hybrid's dwell: then the edge, whose draft has prefilled meanwhile


def test_the_sdk_offers_only_where_its_prompt_prefill_is_a_sizable_share_of_the_tpot_budget():
    # a Mac-mini-class draft prefills 1.81 ms a token; TPOT budgets of 30 and 60 ms
    assert offers_start_on_server(129, 24, 30.0, 1.81)  # HumanEval's median: 10 ms a token of a 30 ms budget
    assert not offers_start_on_server(26, 120, 60.0, 1.81)  # ShareGPT's median: 0.4 ms a token of 60
    assert not offers_start_on_server(129, 24, 60.0, 1.0)
    assert offers_start_on_server(5, 200, 60.0, None)  # nothing timed yet: offer, the server decides


def test_the_client_times_its_prefill_and_then_offers_by_the_rule(backend, tiny_bundle, reference):
    """The first generation offers (no prefill timed yet) and is started on the server; the tiny draft's prefill of
    a few tokens is then timed, and a 40-token generation does not offer: it speculates from its first round."""

    async def main():
        async with running_server(backend, policy="wisp", hybrid=True, regime=True) as server:
            async with AsyncEdgeClient(server.url, tiny_bundle, threads=1, controller=FixedK(3)) as client:
                assert client.prefill_ms_per_token is None
                first = await client.generate(PROMPTS[0], max_new_tokens=MAX_NEW)
                rate = client.prefill_ms_per_token
                second = await client.generate(PROMPTS[1], max_new_tokens=MAX_NEW)
                return first, rate, second

    first, rate, second = asyncio.run(main())
    assert first.token_ids == reference(PROMPTS[0], MAX_NEW) and first.stats.switches >= 1
    assert rate is not None and 0.0 < rate < 1000.0
    assert not offers_start_on_server(len(PROMPTS[1]), MAX_NEW, 200.0, rate)
    assert second.token_ids == reference(PROMPTS[1], MAX_NEW)
    # every token after the first (the Open's) came from its rounds
    assert (
        second.stats.switches == 0
        and sum(r.committed for r in second.stats.rounds) == second.stats.new_tokens - 1
    )


def test_warm_up_times_the_prefill_before_the_first_generation(backend, tiny_bundle, reference):
    """`warm_up` runs the real draft and times a prefill, so the first generation already follows the rule: this
    40-token one does not offer and speculates from its first round. The centralized mode has no draft to time."""

    async def main():
        async with running_server(backend, policy="wisp", hybrid=True, regime=True) as server:
            async with AsyncEdgeClient(server.url, tiny_bundle, threads=1, controller=FixedK(3)) as client:
                rate = await client.warm_up(16)
                assert rate == client.prefill_ms_per_token
                first = await client.generate(PROMPTS[1], max_new_tokens=MAX_NEW)
            async with AsyncEdgeClient(server.url, tiny_bundle, mode="centralized") as central:
                none = await central.warm_up()
            return rate, first, none

    rate, first, none = asyncio.run(main())
    assert rate is not None and 0.0 < rate < 1000.0 and none is None
    assert first.token_ids == reference(PROMPTS[1], MAX_NEW)
    assert first.stats.switches == 0
    assert sum(r.committed for r in first.stats.rounds) == first.stats.new_tokens - 1


def test_decode_all_holds_the_centralized_regime_from_the_first_session(backend, tiny_bundle, reference):
    """`wisp serve --decode-all` (the bench arm `wisp~decode-all`): the regime decodes every session from the start
    and never re-decides; sessions that offer to start on the server stay there to the end, lossless."""

    async def main():
        async with running_server(
            backend, policy="wisp", hybrid=True, regime=True, decode_all=True
        ) as server:
            async with AsyncEdgeClient(
                server.url, tiny_bundle, threads=1, controller=FixedK(3), start_on_server=True
            ) as client:
                results = [await client.generate(p, max_new_tokens=MAX_NEW) for p in PROMPTS]
            assert server.engine.metrics.registry.get_sample_value("wisp_regime_centralized") == 1.0
            return results

    for prompt, res in zip(PROMPTS, asyncio.run(main()), strict=True):
        assert res.token_ids == reference(prompt, MAX_NEW)
        assert res.stats.switches == 0 and not res.stats.rounds, res.stats  # decoded by the server throughout


@pytest.mark.parametrize(
    "previous, moved, handed, on_edge, offer",
    [
        (False, True, False, False, True),  # moved by a verdict and decoded to the end: the server decodes us
        (True, False, False, False, True),  # decoded from the start, finished before any hand-back: no news
        (False, False, False, False, False),
        (True, True, True, True, False),  # handed back to the edge: the server speculates again
        (True, False, False, True, False),  # stayed on the edge
    ],
)
def test_server_decodes_next_follows_the_last_generations_moves(previous, moved, handed, on_edge, offer):
    assert server_decodes_next(previous, moved, handed, on_edge) is offer


def test_a_device_offers_once_the_server_has_moved_its_session_and_stops_after_a_hand_back(
    backend, tiny_bundle, reference
):
    """The client's offer rule (`start_on_server=None`): the prefill rule, or the last generation's moves. Under
    `--decode-all` a session that did not offer is moved at its first verdict after one speculative round; the
    device's next session then offers and is decoded from its first token. Once the server speculates again, an
    offered session is handed to the edge after the dwell, and the one after it follows the prefill rule."""
    prompt = PROMPTS[1]

    async def main():
        async with running_server(
            backend, policy="wisp", hybrid=True, regime=True, decode_all=True
        ) as server:
            async with AsyncEdgeClient(server.url, tiny_bundle, threads=1, controller=FixedK(3)) as client:
                results = []
                # unmeasured prefill: offered; then measured (the tiny draft is fast): the rule does not offer
                for _ in range(3):
                    results.append(await client.generate(prompt, max_new_tokens=MAX_NEW))
                regime = server.engine.committer.regime
                regime.hold, regime.mode, regime.min_samples = None, "speculative", 1 << 30  # speculates now
                for _ in range(2):
                    results.append(await client.generate(prompt, max_new_tokens=MAX_NEW))
                return results

    results = asyncio.run(main())
    for res in results:
        assert res.token_ids == reference(prompt, MAX_NEW)
    rounds = [len(res.stats.rounds) for res in results]
    assert rounds[0] == 0 and rounds[1] == 1 and rounds[2] == 0, (
        rounds
    )  # offered / moved at round 1 / offered
    assert results[3].stats.switches == 1 and rounds[3] > 0  # offered, decoded 16 tokens, handed to the edge
    assert (
        results[4].stats.switches == 0 and rounds[4] > 0
    )  # the prefill rule again: no offer, all on the edge


@pytest.mark.parametrize("probe", [True, False], ids=["probe", "decoded"])
def test_a_probe_in_the_centralized_regime_starts_decoded_then_speculates_then_moves_back(
    backend, tiny_bundle, reference, probe
):
    """While the regime decodes the fleet, a probe takes its device's offer like any session (opened speculative,
    its first round waited for its draft's prompt prefill: on an H200, 32B / HumanEval / TPOT 30, run 75, such probes
    met the SLO 8 times in 13), goes to the edge once it has dwelt, speculates for the regime's `probe_rounds`
    rounds, and moves back. Any other session stays decoded. Greedy output is the target's either way."""
    max_new = (
        80  # 17 decoded, then 8 rounds of at most 3 tokens (PROBE_CAP): the move back comes before the end
    )

    async def main():
        async with running_server(backend, policy="wisp", hybrid=True, regime=True) as server:
            regime = server.engine.committer.regime
            assert regime is not None
            regime.mode, regime.min_samples = "centralized", 1 << 30
            regime.probe_every = 1 if probe else 1 << 30
            regime.every_s, regime._decided_at = 3600.0, time.monotonic()  # no decision in this test
            async with AsyncEdgeClient(
                server.url, tiny_bundle, threads=1, controller=FixedK(3), start_on_server=True
            ) as client:
                res = await client.generate(PROMPTS[0], max_new_tokens=max_new)
            return res, dict(server.engine.committer.switch_reasons)

    res, reasons = asyncio.run(main())
    assert res.token_ids == reference(PROMPTS[0], max_new)
    st = res.stats  # deliveries of new tokens: the first token's, then each decode step's or verdict's
    assert 2 <= st.deliveries <= max_new and 0.0 < st.first_gap_ms <= st.max_gap_ms, st
    if not probe:
        assert res.stats.switches == 0 and not res.stats.rounds, res.stats
        return
    assert reasons == {"probe": 1, "regime": 1}, reasons
    assert res.stats.switches == 2 and len(res.stats.rounds) == 8, res.stats
    # a probe in the centralized regime drafts at most PROBE_CAP (the verdicts' draft_cap; the server verifies no
    # more of a round drafted before its first verdict)
    verified = [r.drafted - r.unverified for r in res.stats.rounds]
    assert max(verified) == PROBE_CAP < 3 and all(r.drafted <= PROBE_CAP for r in res.stats.rounds[1:]), (
        verified
    )
