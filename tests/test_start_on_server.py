"""Sessions that start on the server (Open.start_on_server, taken by `wisp serve --policy wisp` with its regime on, the default): the server decodes
while the device's draft prefills the prompt, then hands the session to the edge with a Switch. Real websockets on
loopback, the in-process server with the tiny target, the real SDK client with the tiny ONNX draft; lossless."""

from __future__ import annotations

import asyncio

import pytest
from wisp_sdk import AsyncEdgeClient, FixedK
from wisp_sdk.protocol import Opened, Switch, Tokens
from ws_client import Client, running_server

PROMPTS = [[5, 17, 42, 99, 123], [7, 8, 9, 10, 11, 12, 13, 200], [300, 12, 45]]
MAX_NEW = 40  # past the hybrid's 16-token dwell: every session is handed to the edge and drafts


def test_sdk_greedy_is_identical_when_sessions_start_on_the_server(backend, tiny_bundle, reference):
    async def main():
        async with running_server(backend, policy="wisp", hybrid=True, regime=True) as server:
            async with AsyncEdgeClient(server.url, tiny_bundle, threads=1, controller=FixedK(3)) as client:
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
