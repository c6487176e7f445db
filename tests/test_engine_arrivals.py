"""A round that reaches the server while a step's outcomes are being committed rides the very next step.

The engine's loop is busy between a forward's end and the next launch (the commit, the next selection): it reads
no socket then. A round whose bytes arrived in that window used to be read only after the next launch, and waited
a whole step more (H200 runs 63-67, 7B: that window was 15-25 ms of a 50-ms step). The real gateway and engine
over loopback websockets with `FakeBackend`; the round is sent from a second connection's own thread while the
loop is held inside the commit, so it is in the server's socket before the next batch is selected.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from websockets.sync.client import connect as connect_sync
from wisp_cloud.backends.base import BatchStats, ItemResult, WorkItem
from wisp_cloud.backends.fake import FAKE_FINGERPRINT, FakeBackend, next_token
from wisp_cloud.config import ServerConfig
from wisp_cloud.server import WispServer
from wisp_sdk.protocol import (
    SUBPROTOCOL,
    Hello,
    Open,
    Opened,
    Round,
    Verdict,
    decode_server,
    encode,
    encode_round,
)
from ws_client import Client

VOCAB = 1000


class RecordingBackend(FakeBackend):
    """`FakeBackend` that keeps the sequence ids of every forward's items, in launch order."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.batches: list[set[str]] = []

    def forward(self, items: list[WorkItem]) -> tuple[list[ItemResult], BatchStats]:
        self.batches.append({it.seq_id for it in items})
        return super().forward(items)


async def _decode(url: str, stop: asyncio.Event) -> None:
    """A server-decoded session: its decode rides every step, so the loop always has a next step to launch."""
    c = await Client.connect(url)
    await c.request(Hello(tokenizer_fingerprint=FAKE_FINGERPRINT))
    await c.request(Open(prompt_ids=[9, 8, 7], max_new_tokens=5000, mode="centralized"))
    while not stop.is_set():
        await c.recv()
    await c.aclose()


@pytest.mark.parametrize("read", [True, False])
def test_a_round_that_arrives_during_the_commit_rides_the_next_step(read: bool):
    async def main() -> tuple[list[set[str]], int, str]:
        backend = RecordingBackend(VOCAB, base_s=0.01)
        cfg = ServerConfig(port=0, policy="fifo", admission_target=0.0, read_before_launch=read)
        server = WispServer(backend, cfg)
        await server.start()
        stop = asyncio.Event()
        decoder = asyncio.create_task(_decode(server.url, stop))
        slot: list[bytes] = []  # the round to send from inside the next commit
        sent_after = threading.Event()
        launched: list[int] = []  # forwards launched when it was sent
        commit = server.engine.committer.commit

        conn: list = []  # the device's connection, made on its own thread (its handshake needs the loop)

        def held_commit(outcomes, stats):
            if slot:
                conn[0].send(slot.pop())  # from the loop's thread, on the other connection's socket
                time.sleep(0.05)  # the loop stays busy here: the frame lands in the server's socket meanwhile
                launched.append(len(backend.batches))
                sent_after.set()
            return commit(outcomes, stats)

        server.engine.committer.commit = (
            held_commit  # instrumentation: the real commit runs, the loop is held
        )

        def device() -> str:
            with connect_sync(server.url, subprotocols=[SUBPROTOCOL], compression=None) as ws:
                conn.append(ws)
                ws.send(encode(Hello(tokenizer_fingerprint=FAKE_FINGERPRINT)))
                decode_server(ws.recv(timeout=10))
                prompt = [3, 40, 7]
                ws.send(encode(Open(prompt_ids=prompt, max_new_tokens=64)))
                opened = decode_server(ws.recv(timeout=10))
                assert isinstance(opened, Opened), opened
                seq = prompt + [opened.next_token]
                draft = [next_token(seq[-1], len(seq) - 1, VOCAB)]
                r = Round(session_id=opened.session_id, round=1, committed_len=len(seq), draft_ids=draft)
                slot.append(encode_round(r))
                assert sent_after.wait(timeout=10)
                v = decode_server(ws.recv(timeout=10))
                assert isinstance(v, Verdict) and v.accepted == 1, v
                return opened.session_id

        try:
            sid = await asyncio.to_thread(device)
        finally:
            stop.set()
            await decoder
            await server.stop()
        return backend.batches, launched[0], sid

    batches, launched, sid = asyncio.run(main())
    # The commit that sent the round belongs to forward `launched` (1-based count of those launched by then); the
    # next launch is batches[launched]. The session's first forward (its prompt) came before.
    rode = [i for i, b in enumerate(batches) if sid in b and i >= launched]
    # `--no-read-before-launch` (benchmarks): read only after the next launch, it rides the step after that
    assert rode and rode[0] == launched + (0 if read else 1), (launched, rode[:3])
