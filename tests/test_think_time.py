"""The device time the server learns per session (`Session.think_s`: draft + network between an answer and the next
round) leaves out the rounds that carry one-off device work: the first one (the draft's prompt prefill) and the
first after a return from server decoding (the catch-up feed of the tokens decoded meanwhile). Folding the latter in
made returned sessions look slow, and the hybrid's too-slow rule sent them back (H200 run 41: 828 `slow` moves in
three points). Real gateway and engine over loopback websockets with `FakeBackend`; the `hybrid_every` hook switches
the session every 2 rounds and back every 2 decoded tokens."""

from __future__ import annotations

import asyncio

from fake_drive import VOCAB, drive
from wisp_cloud.backends.fake import FakeBackend
from wisp_cloud.config import ServerConfig
from wisp_cloud.server import WispServer

CATCH_UP_S = 0.3  # the device's catch-up feed after each return to the edge


def test_catch_up_after_a_return_is_not_device_time():
    async def main():
        backend = FakeBackend(VOCAB, base_s=0.001, per_token_s=0.0)
        config = ServerConfig(port=0, policy="wisp", admission_target=0.0, regime=False, hybrid_every=2)
        server = WispServer(backend, config)
        await server.start()
        try:
            # perfect 3-token drafts sent at once, except the first round after each return
            run = await drive(server.url, [5, 6, 7], 40, 1.0, 3, 60.0, seed=0, catch_up_s=CATCH_UP_S)
            session = server.engine.store.get(run.session_id)
            assert session is not None
            return run.modes.count("speculative"), session.think_s
        finally:
            await server.stop()

    returns, think_s = asyncio.run(main())
    assert returns >= 3  # the hook really sent it back and forth
    # every round but the skipped ones was sent at once: tens of ms at most, not a share of the 0.3 s catch-ups
    assert think_s is not None and think_s < 0.05, think_s
