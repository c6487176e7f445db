"""The hybrid's own rule (no test hooks) and the verify price under load: the real gateway and engine over loopback
websockets with `FakeBackend` (the model does not matter here; the lossless tests use the tiny real model). The
regime is off: it would decode every session from its start (tests/test_start_on_server.py covers that)."""

from __future__ import annotations

import asyncio

import pytest
from fake_drive import VOCAB, drive, fake_greedy
from wisp_cloud.backends.fake import FAKE_FINGERPRINT, FakeBackend
from wisp_cloud.config import ServerConfig
from wisp_cloud.server import WispServer
from wisp_sdk.protocol import Hello
from ws_client import Client


def test_loaded_server_prices_tokens_and_moves_wasteful_sessions_to_server_decoding():
    async def main():
        backend = FakeBackend(VOCAB, base_s=0.002, per_token_s=0.0004)
        server = WispServer(backend, ServerConfig(port=0, policy="wisp", admission_target=0.0, regime=False))
        await server.start()
        try:
            prompts = [[3 + i, 40 + i, 7] for i in range(24)]
            # 23 short sessions with poor drafts, a tight TPOT and a slow device (20 ms of drafting a round, for
            # ≈ 1.25 tokens: too slow for 10 ms a token whatever the queue) load the GPU; one long one (a TPOT its
            # link meets easily, so only the load can move it) outlives them
            runs = await asyncio.gather(
                *(
                    drive(
                        server.url,
                        p,
                        160 if i == 0 else 60,
                        0.2,
                        6,
                        20.0 if i == 0 else 10.0,
                        seed=i,
                        think_s=0.0 if i == 0 else 0.02,
                    )
                    for i, p in enumerate(prompts)
                )
            )
            alone = await drive(server.url, [9, 9, 9], 40, 0.2, 6, 20.0, seed=99)
            text = server.engine.metrics.registry
            switched = text.get_sample_value("wisp_session_switches_total", {"to": "centralized"})
            return prompts, runs, alone, switched
        finally:
            await server.stop()

    prompts, runs, alone, switched = asyncio.run(main())
    for p, r in zip(prompts, runs, strict=True):
        assert r.tokens == fake_greedy(p, len(r.tokens))  # the fake target's continuation, switches or not
    # Under load the verdicts carry a price; the wasteful sessions went to server-side decoding.
    assert max(max(r.prices) for r in runs) > 0
    assert switched and switched >= 12, [r.modes for r in runs]
    # The long session outlived the load: it came back to the edge once the price fell.
    assert runs[0].modes[:2] == ["centralized", "speculative"], runs[0].modes
    # Alone on the server a session pays nothing and is never moved.
    assert max(alone.prices) == 0.0 and alone.modes == []


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_an_older_client_is_refused_with_one_clear_error(version):
    from websockets.exceptions import ConnectionClosed
    from wisp_sdk.protocol import PROTOCOL_VERSION, Error

    async def main():
        server = WispServer(FakeBackend(VOCAB), ServerConfig(port=0))
        await server.start()
        try:
            c = await Client.connect(server.url)
            err = await c.request(Hello(tokenizer_fingerprint=FAKE_FINGERPRINT, protocol_version=version))
            try:
                await c.recv(timeout=5)
                closed = False
            except ConnectionClosed:
                closed = True
            return err, closed
        finally:
            await server.stop()

    err, closed = asyncio.run(main())
    assert isinstance(err, Error) and err.code.value == "bad_request" and closed
    assert (
        f"protocol version {version} not supported (server speaks {PROTOCOL_VERSION})" in err.message
        and "upgrade" in err.message
    )
