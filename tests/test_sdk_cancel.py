"""Cancellation frees everything: a generation left early (break, cancelled task, timeout) closes its server
session at once, and the next generation on the same client starts right away and is exact."""

from __future__ import annotations

import asyncio
import time

import pytest
from cli_process import ServerProcess
from metrics_scrape import wait_for_metric
from wisp_sdk import EdgeClient
from wisp_sdk.client import AsyncEdgeClient

PROMPT = [5, 17, 33, 60, 61, 70]
LONG = 400  # far more tokens than a test waits for


@pytest.fixture(scope="module")
def server(tiny_target):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    srv = ServerProcess(tiny_target, 0, "--threads", "1", "--metrics-port", str(metrics_port))
    srv.metrics_port = metrics_port
    yield srv
    srv.stop()


def _wait_sessions(server, want: float, within: float = 1.0) -> float:
    return wait_for_metric(server.metrics_port, "wisp_sessions", want, within)


async def _await_sessions(server, want: float, within: float = 1.0) -> float:
    """As `_wait_sessions`, letting the event loop run meanwhile (a generator left by `break` is closed by it)."""
    return await asyncio.to_thread(_wait_sessions, server, want, within)


def test_breaking_out_of_an_async_stream_closes_the_session(server, tiny_bundle):
    async def main():
        async with AsyncEdgeClient(server.url, str(tiny_bundle), controller="fixed:3") as c:
            reference = (await c.generate(PROMPT, max_new_tokens=12)).token_ids
            assert await _await_sessions(server, 0) == 0
            parts = 0
            async for _ in c.stream(PROMPT, max_new_tokens=LONG):
                parts += 1
                if parts == 3:
                    break
            n = await _await_sessions(server, 0)
            t0 = time.monotonic()
            again = (await c.generate(PROMPT, max_new_tokens=12)).token_ids
            return n, time.monotonic() - t0, reference, again

    n, took, reference, again = asyncio.run(main())
    assert n == 0, "the abandoned session still holds the server"
    assert again == reference  # the next generation is exact (no stale frame, draft cache consistent)
    assert took < 10.0


def test_cancelled_task_and_timeout_close_the_session(server, tiny_bundle):
    async def main():
        async with AsyncEdgeClient(server.url, str(tiny_bundle), controller="fixed:3") as c:
            started = asyncio.Event()

            async def consume() -> None:
                async for _ in c.stream(PROMPT, max_new_tokens=LONG):
                    started.set()

            task = asyncio.create_task(consume())
            await started.wait()  # mid-generation: tokens flow, most of the LONG ones still to come
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            after_cancel = await _await_sessions(server, 0)
            with pytest.raises(TimeoutError, match="timed out"):
                await c.generate(PROMPT, max_new_tokens=LONG, timeout=0.2)
            after_timeout = await _await_sessions(server, 0)
            ok = (await c.generate(PROMPT, max_new_tokens=8)).token_ids
            return after_cancel, after_timeout, ok

    after_cancel, after_timeout, ok = asyncio.run(main())
    assert after_cancel == 0 and after_timeout == 0
    assert len(ok) == 8


def test_centralized_stream_left_early_closes_the_session(server, tiny_bundle):
    async def main():
        async with AsyncEdgeClient(server.url, str(tiny_bundle), mode="centralized") as c:
            reference = (await c.generate(PROMPT, max_new_tokens=10)).token_ids
            async for _ in c.stream(PROMPT, max_new_tokens=LONG):
                break
            n = await _await_sessions(server, 0)
            again = (await c.generate(PROMPT, max_new_tokens=10)).token_ids
            return n, reference, again

    n, reference, again = asyncio.run(main())
    assert n == 0 and again == reference


def test_sync_stream_left_early_closes_the_session(server, tiny_bundle):
    with EdgeClient(server.url, str(tiny_bundle), controller="fixed:3") as c:
        reference = c.generate(PROMPT, max_new_tokens=12).token_ids
        for i, _ in enumerate(c.stream(PROMPT, max_new_tokens=LONG)):
            if i == 2:
                break
        assert _wait_sessions(server, 0) == 0
        assert c.generate(PROMPT, max_new_tokens=12).token_ids == reference


def test_timeout_must_be_positive(server, tiny_bundle):
    from wisp_sdk import WispError

    with EdgeClient(server.url, str(tiny_bundle)) as c, pytest.raises(WispError, match="timeout"):
        c.generate(PROMPT, max_new_tokens=4, timeout=0)
