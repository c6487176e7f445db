"""The engine announces each speculative session's next round to the scheduler (what `fill` holds for): the real
gateway and engine over loopback websockets with `FakeBackend`."""

from __future__ import annotations

import asyncio
import time

from wisp_cloud.backends.fake import FAKE_FINGERPRINT, FakeBackend, next_token
from wisp_cloud.config import ServerConfig
from wisp_cloud.server import WispServer
from wisp_sdk.protocol import SLO, Open, Round, Verdict
from ws_client import Client

VOCAB = 1000
THINK_S = 0.03  # the device's time between a verdict and its next round


async def _one_round(c: Client, sid: str, rnd: int, prompt: list[int], tokens: list[int]) -> Verdict:
    """Round `rnd` of one token, the fake target's own next one; `tokens` (committed after the prompt) grows."""
    seq = prompt + tokens
    draft = [next_token(seq[-1], len(seq) - 1, VOCAB)]
    v = await c.request(Round(session_id=sid, round=rnd, committed_len=len(seq), draft_ids=draft))
    assert isinstance(v, Verdict)
    tokens += draft[: v.accepted] + [v.next_token]
    return v


def test_engine_announces_the_next_round_after_the_measured_device_time():
    async def main() -> list[tuple[float, float | None]]:
        server = WispServer(FakeBackend(VOCAB), ServerConfig(port=0, policy="wisp", admission_target=0.0))
        await server.start()
        seen: list[tuple[float, float | None]] = []  # (verdict received, announced time) per round
        try:
            c = await Client.connect(server.url)
            await c.hello(FAKE_FINGERPRINT)
            prompt = [5, 6, 7]
            opened = await c.request(Open(prompt_ids=prompt, max_new_tokens=60, slo=SLO(tpot_ms=200.0)))
            tokens = [opened.next_token]
            for rnd in range(1, 7):
                await asyncio.sleep(THINK_S)
                v = await _one_round(c, opened.session_id, rnd, prompt, tokens)
                assert not v.done
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


def test_a_rounds_verdict_is_built_after_the_next_step_has_launched():
    """The answers of step n (a round's verdict, with the hybrid's and regime's checks on it) are built once step
    n+1 has launched, off the device's idle path; a server-decoded session keeps a step running after each one.
    Recorded on the event loop at the engine's two seams: a step's selection (launched right after it) and the
    committer's `answer`."""
    events: list[tuple[str, float, frozenset[str]]] = []
    moved: list[bool] = []

    async def main() -> None:
        backend = FakeBackend(VOCAB, base_s=0.02)
        server = WispServer(backend, ServerConfig(port=0, policy="wisp", admission_target=0.0, hybrid=False))
        await server.start()
        engine = server.engine
        schedule, answer = engine._schedule, engine.committer.answer

        def traced_schedule(now):
            planned = schedule(now)
            if planned:
                events.append(("launch", time.monotonic(), frozenset(p.job.session.id for p in planned)))
            return planned

        def traced_answer(records, launch_in_ms=0.0):
            events.append(("answer", time.monotonic(), frozenset(r.job.session.id for r in records)))
            replies = answer(records, launch_in_ms)
            for r in records:  # every committed token moved its session's deadlines (a decode's too)
                d = r.job.session.deadlines
                moved.append(d is not None and d.committed == r.job.session.generated - 1)
            return replies

        engine._schedule = traced_schedule
        engine.committer.answer = traced_answer
        try:
            dec = await Client.connect(server.url)
            await dec.hello(FAKE_FINGERPRINT)
            first = await dec.request(Open(prompt_ids=[1, 2, 3], max_new_tokens=200, mode="centralized"))
            assert first.mode == "centralized"
            spec = await Client.connect(server.url)
            await spec.hello(FAKE_FINGERPRINT)
            prompt = [5, 6, 7]
            opened = await spec.request(Open(prompt_ids=prompt, max_new_tokens=40, slo=SLO(tpot_ms=500.0)))
            tokens = [opened.next_token]
            for rnd in range(1, 4):
                assert (await _one_round(spec, opened.session_id, rnd, prompt, tokens)).round == rnd
            sid = opened.session_id
            await spec.aclose()
            await dec.aclose()
        finally:
            await server.stop()
        answered = [(t, ids) for kind, t, ids in events if kind == "answer" and sid in ids]
        assert len(answered) >= 4  # the Opened and three verdicts
        for t_answer, _ in answered:
            ran = max(t for kind, t, ids in events if kind == "launch" and sid in ids and t < t_answer)
            # a launch after the step that ran this session's job, and before its answer was built
            assert any(kind == "launch" and ran < t < t_answer for kind, t, _ in events), (ran, t_answer)

    asyncio.run(main())
    assert moved and all(moved)


def test_the_steps_line_reports_each_steps_mix(caplog):
    """The `steps` line carries the mean mix of the steps (rounds, decodes, prompt pieces) and the requests their
    selection left waiting, so that host time per step can be put down to the kinds of items."""
    import logging

    from wisp_cloud.backends.base import BatchStats
    from wisp_cloud.step_stats import StepLog, StepMix

    steps = StepLog(logging.getLogger("wisp.test_steps"), every_s=3600.0)  # flushed by hand below
    stats = BatchStats(
        batch_size=4, new_tokens=12, context_tokens=40, max_context=20, cache_misses=0, forward_s=0.01
    )
    steps.add(stats, StepMix.of(["verify", "verify", "decode", "prefill"], left=3), 0.02, 0.001, 0.002)
    steps.add(stats, StepMix.of(["verify", "decode", "decode", "decode"], left=1), 0.02, 0.001, 0.002)
    assert steps.totals.items == 8 and steps.totals.steps == 2
    with caplog.at_level(logging.INFO, logger="wisp.test_steps"):
        steps._flush(time.monotonic())
    line = caplog.records[-1].getMessage()
    for field in ("rounds_mean=1.5", "decodes_mean=2.0", "prefills_mean=0.5", "left_waiting_mean=2.0"):
        assert field in line, line
