"""The device time the server learns per session (`Session.think_s`: draft + network between an answer and the next
round) leaves out the rounds that carry one-off device work: the first one (the draft's prompt prefill) and the
first after a return from server decoding (the catch-up feed of the tokens decoded meanwhile). Folding the latter in
made returned sessions look slow, and the hybrid's too-slow rule sent them back (H200 run 41: 828 `slow` moves in
three points). Real gateway and engine over loopback websockets with `FakeBackend`; the `hybrid_every` hook switches
the session every 2 rounds and back every 2 decoded tokens."""

from __future__ import annotations

import asyncio

from wisp_cloud.backends.fake import FAKE_FINGERPRINT, FakeBackend, next_token
from wisp_cloud.config import ServerConfig
from wisp_cloud.server import WispServer
from wisp_sdk.protocol import SLO, Hello, Open, Round, Switch, Tokens, Verdict
from ws_client import Client

VOCAB = 1000
CATCH_UP_S = 0.3  # the device's catch-up feed after each return to the edge


async def drive(url: str, prompt: list[int], n: int) -> tuple[str, int]:
    """Perfect 3-token drafts sent at once, except the first round after each return: (session id, returns)."""
    c = await Client.connect(url)
    await c.request(Hello(tokenizer_fingerprint=FAKE_FINGERPRINT))
    opened = await c.request(Open(prompt_ids=prompt, max_new_tokens=n, slo=SLO(tpot_ms=60.0)))
    tokens = [opened.next_token]
    done, rnd, central, returns = opened.done, 0, False, 0
    while not done:
        if central:
            msg = await c.recv()
            if isinstance(msg, Switch):
                central, returns = False, returns + 1
                await asyncio.sleep(CATCH_UP_S)
            else:
                assert isinstance(msg, Tokens), msg
                tokens += msg.tokens
                done = msg.done
            continue
        rnd += 1
        seq = prompt + tokens
        draft: list[int] = []
        for _ in range(min(3, n - len(tokens) - 1)):
            draft.append(next_token(seq[-1], len(seq) - 1, VOCAB))
            seq = seq + [draft[-1]]
        v = await c.request(
            Round(
                session_id=opened.session_id,
                round=rnd,
                committed_len=len(prompt) + len(tokens),
                draft_ids=draft,
            )
        )
        assert isinstance(v, Verdict), v
        tokens += draft[: v.accepted] + [v.next_token]
        done, central = v.done, v.centralize
    await c.aclose()
    return opened.session_id, returns


def test_catch_up_after_a_return_is_not_device_time():
    async def main():
        backend = FakeBackend(VOCAB, base_s=0.001, per_token_s=0.0)
        config = ServerConfig(port=0, policy="wisp", admission_target=0.0, regime=False, hybrid_every=2)
        server = WispServer(backend, config)
        await server.start()
        try:
            sid, returns = await drive(server.url, [5, 6, 7], 40)
            session = server.engine.store.get(sid)
            assert session is not None
            return returns, session.think_s
        finally:
            await server.stop()

    returns, think_s = asyncio.run(main())
    assert returns >= 3  # the hook really sent it back and forth
    # every round but the skipped ones was sent at once: tens of ms at most, not a share of the 0.3 s catch-ups
    assert think_s is not None and think_s < 0.05, think_s
