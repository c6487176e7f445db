"""The engine announces each speculative session's next round to the scheduler (what `fill` holds for): the real
gateway and engine over loopback websockets with `FakeBackend`."""

from __future__ import annotations

import asyncio
import time

from wisp_cloud.backends.fake import FAKE_FINGERPRINT, FakeBackend, next_token
from wisp_cloud.config import ServerConfig
from wisp_cloud.server import WispServer
from wisp_sdk.protocol import SLO, Hello, Open, Round, Verdict
from ws_client import Client

VOCAB = 1000
THINK_S = 0.03  # the device's time between a verdict and its next round


def test_engine_announces_the_next_round_after_the_measured_device_time():
    async def main() -> list[tuple[float, float | None]]:
        server = WispServer(FakeBackend(VOCAB), ServerConfig(port=0, policy="wisp", admission_target=0.0))
        await server.start()
        seen: list[tuple[float, float | None]] = []  # (verdict received, announced time) per round
        try:
            c = await Client.connect(server.url)
            await c.request(Hello(tokenizer_fingerprint=FAKE_FINGERPRINT))
            prompt = [5, 6, 7]
            opened = await c.request(Open(prompt_ids=prompt, max_new_tokens=60, slo=SLO(tpot_ms=200.0)))
            tokens = [opened.next_token]
            for rnd in range(1, 7):
                await asyncio.sleep(THINK_S)
                seq = prompt + tokens
                draft = [next_token(seq[-1], len(seq) - 1, VOCAB)]
                v = await c.request(
                    Round(
                        session_id=opened.session_id,
                        round=rnd,
                        committed_len=len(prompt) + len(tokens),
                        draft_ids=draft,
                    )
                )
                assert isinstance(v, Verdict) and not v.done
                tokens += draft[: v.accepted] + [v.next_token]
                seen.append((time.monotonic(), server.engine.queue.announced.get(opened.session_id)))
            await c.aclose()
            # the step totals split the host time into its two measured phases (bench/host_path.py reads them)
            t = server.totals
            assert t.steps >= 7 and 0.0 < t.schedule_s and 0.0 < t.commit_s
            assert t.schedule_s + t.commit_s < t.step_s - t.forward_s + 0.05
        finally:
            await server.stop()
        return seen

    seen = asyncio.run(main())
    assert seen[0][1] is None  # the first round's device time includes the prompt: not learned
    for got, at in seen[2:]:
        assert at is not None
        # expected one device time after the verdict went out (the loopback adds little)
        assert 0.5 * THINK_S < at - got < 2.5 * THINK_S, (at - got, THINK_S)


def test_no_fill_reaches_the_policy():
    """`wisp serve --no-fill` (ServerConfig.fill) turns the rule off in the engine's policy; on by default."""
    on = WispServer(FakeBackend(VOCAB), ServerConfig(port=0, policy="wisp"))
    off = WispServer(FakeBackend(VOCAB), ServerConfig(port=0, policy="wisp", fill=False))
    assert on.engine.policy.fill is True and off.engine.policy.fill is False
