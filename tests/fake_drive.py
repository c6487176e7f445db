"""A websocket client that drives `FakeBackend` sessions without a draft model (the fake target's continuation is
known) and follows the server's mode switches; for the hybrid's engine tests."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from wisp_cloud.backends.fake import FAKE_FINGERPRINT, next_token
from wisp_sdk.protocol import SLO, Hello, Open, Round, Switch, Tokens, Verdict
from ws_client import Client

VOCAB = 1000


@dataclass
class Run:
    session_id: str
    tokens: list[int]
    prices: list[float] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)  # the mode after each switch


def fake_greedy(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq[-1], len(seq) - 1, VOCAB))
    return seq[len(prompt) :]


async def drive(
    url: str,
    prompt: list[int],
    n: int,
    accept: float,
    k: int,
    tpot_ms: float,
    seed: int,
    think_s: float = 0.0,
    catch_up_s: float = 0.0,
) -> Run:
    """A client drafting k tokens per round, each right with probability `accept`, that follows the server's mode
    switches; `think_s`: its drafting time a round; `catch_up_s`: its draft's catch-up feed after each return to the
    edge."""
    rng = random.Random(seed)
    c = await Client.connect(url)
    await c.request(Hello(tokenizer_fingerprint=FAKE_FINGERPRINT))
    opened = await c.request(Open(prompt_ids=prompt, max_new_tokens=n, slo=SLO(tpot_ms=tpot_ms)))
    run = Run(opened.session_id, [opened.next_token])
    done, rnd, central = opened.done, 0, False
    while not done:
        if central:
            msg = await c.recv()
            if isinstance(msg, Switch):
                central = False
                run.modes.append("speculative")
                assert msg.committed_len == len(prompt) + len(run.tokens)
                if catch_up_s:
                    await asyncio.sleep(catch_up_s)
            else:
                assert isinstance(msg, Tokens), msg
                run.tokens += msg.tokens
                done = msg.done
            continue
        rnd += 1
        if think_s:
            await asyncio.sleep(think_s)
        seq = prompt + run.tokens
        draft: list[int] = []
        for _ in range(min(k, n - len(run.tokens) - 1)):
            right = next_token(seq[-1], len(seq) - 1, VOCAB)
            tok = right if rng.random() < accept else (right + 1) % VOCAB
            draft.append(tok)
            seq = seq + [tok]
        v = await c.request(
            Round(
                session_id=opened.session_id,
                round=rnd,
                committed_len=len(prompt) + len(run.tokens),
                draft_ids=draft,
            )
        )
        assert isinstance(v, Verdict), v
        run.prices.append(v.price_ms)
        run.tokens += draft[: v.accepted] + [v.next_token]
        done, central = v.done, v.centralize
        if central:
            run.modes.append("centralized")
    await c.aclose()
    return run
