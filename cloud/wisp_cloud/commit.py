"""The postprocess half of a step: commit verified tokens and build the answers (the engine hands them over).

Runs on the event loop, possibly while the next forward runs: it never touches the backend, and queues its KV
changes (truncate a rejected tail, release a finished session) in `kv_ops` for the engine to apply between
forwards.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from wisp_sdk.protocol import (
    ErrorCode,
    Mode,
    Opened,
    Switch,
    pack_tokens,
    pack_verdict,
)

from wisp_cloud.backends.base import BatchStats
from wisp_cloud.estimator import BatchShape, ItemShape, VerifyTimeEstimator
from wisp_cloud.jobs import Job, JobKind
from wisp_cloud.logs import log_event
from wisp_cloud.metrics import Metrics
from wisp_cloud.planner import Outcome, cut
from wisp_cloud.replies import Refusal, Reply
from wisp_cloud.sched import Scheduler
from wisp_cloud.sched.capacity import SessionSample
from wisp_cloud.sched.hybrid import HybridRule, SwitchInputs, round_and_decode_ms
from wisp_cloud.sched.pricing import VerifyPrice
from wisp_cloud.sched.regime import SAMPLE_ROUNDS, Regime
from wisp_cloud.sessions import Session, SessionStore
from wisp_cloud.slo_metrics import SLOMetrics

log = logging.getLogger("wisp.engine")


@dataclass(slots=True)
class Committed:
    """A job whose tokens were committed (phase 1), for its answer (phase 2a) and SLO bookkeeping (phase 2b)."""

    job: Job
    take: int  # tokens committed
    accepted: int  # draft tokens among them
    done: bool
    at: float  # when its answer went out (set by `answer`)
    next_token: int = 0  # the last committed token (the answer names it)
    switch: bool = False  # the answer moves the session to the other mode (hybrid)
    sibling: bool = False  # a round's sibling at `accepted` was committed before `next_token`
    refusals: list[Reply] | None = None  # the step failed for this job: its answer is a refusal


DEFAULT_DRAFT_LEN = 4  # what a session that has not sent a round yet is assumed to draft
_EMPTY = BatchShape()


class Committer:
    def __init__(
        self,
        store: SessionStore,
        queue: Scheduler,
        estimator: VerifyTimeEstimator,
        metrics: Metrics,
        slo: SLOMetrics,
        eos: frozenset[int],
        max_context_len: int,
        enqueue: Callable[[Job], None],
        hybrid: HybridRule | None = None,
        regime: Regime | None = None,
        forced_cap: int = 0,
    ) -> None:
        self.store, self.queue, self.estimator = store, queue, estimator
        self.metrics, self.slo = metrics, slo
        self.switch_counts: collections.Counter[str] = collections.Counter()  # by the mode moved to (stats)
        self.switch_reasons: collections.Counter[str] = collections.Counter()  # by the rule's reason (stats)
        self._eos, self.max_context_len = eos, max_context_len
        self._enqueue = enqueue  # a centralized session's next decode step goes straight back in the queue
        # KV changes for the engine to apply between forwards: (session, truncate length; None = release)
        self.kv_ops: list[tuple[str, int | None]] = []
        self._solo_memo: dict[tuple[int, int, bool], float] = {}
        self._solo_version = -1
        self.price = VerifyPrice(estimator)  # each verdict's price_ms, refreshed once per step
        self.hybrid = hybrid  # None: sessions never switch mode
        self.regime = regime  # None: the hybrid's per-session rule alone decides (sched/regime.py)
        self.forced_cap = forced_cap  # a test hook: every verdict carries this draft cap (0: the regime's)

    def wait_hint_ms(self, session: Session, now: float) -> float:
        """Expected wait (queue + model time) for this session's next round."""
        k = session.draft_len
        if k is None:
            k = DEFAULT_DRAFT_LEN if session.mode == "speculative" else 0
        return 1000.0 * self.queue.hints.hint(ItemShape(k + 1, session.committed_len), now)

    def commit(self, outcomes: list[Outcome], stats: BatchStats) -> list[Committed]:
        """Phase 1, right after the forward and before the next selection: what that selection needs. Commit the
        tokens, queue the KV changes, and put a centralized session's next decode step straight back in the
        queue, so it joins the very next batch. A round's verdict (and the hybrid's and regime's checks on it)
        waits for `answer`: its session cannot be in the next batch anyway, since its device has not drafted yet.
        """
        now = time.monotonic()
        self.metrics.observe_batch(stats.batch_size, stats.forward_s)
        self.queue.hints.finished(
            [p.planned.job.ran_shape for p in outcomes if p.planned.job.ran_shape is not None], now
        )
        self.metrics.price_ms.set(self.price.update(self.queue.hints.last_shape, len(self.queue.waiting)))
        if self.regime is not None:
            last = self.regime.last
            cap = (last.decode, last.speculative) if last is not None else (-1, -1)
            self.metrics.set_regime(self.regime.mode == "centralized", *cap)
        records: list[Committed] = []
        for out in outcomes:
            rec = self._commit_one(out, stats, now)
            if rec is not None:
                records.append(rec)
        return records

    def _commit_one(self, out: Outcome, stats: BatchStats, now: float) -> Committed | None:
        job = out.planned.job
        session = job.session
        job.forward_s += stats.forward_s
        job.batches += 1
        if self.store.get(session.id) is not session:
            self.kv_ops.append((session.id, None))  # closed while in the batch: the forward stored KV again
            return None
        if session.pending is not job:
            return None
        if out.error is not None:
            # its refusal goes out with the step's answers; no SLO bookkeeping (it did not finish)
            return Committed(job, 0, 0, False, now, refusals=self.fail(job, out.error))
        if out.residual_draws:
            self.metrics.residual_draws.inc(out.residual_draws)
        if out.dense_fallback:
            self.metrics.dense_fallbacks.inc()
        if not out.planned.final:
            return None  # more prefill chunks to go: requeued as soon as the forward ended
        session.pending = None
        session.touch()
        if job.kind != JobKind.open and job.started_at is not None:
            self.queue.hints.queued(job.started_at - job.enqueued_at)
        sib = [job.siblings[out.accepted]] if out.sibling else []
        proposed = job.draft[: out.accepted] + sib + [out.next_token]
        take, done = cut(session, proposed, self._eos, self.max_context_len)
        session.tokens += proposed[:take]
        # a sibling cut off before its target token (EOS) reads as a plain verdict whose next token it is
        taken_sib = out.sibling and take == len(proposed)
        rec = Committed(job, take, take - 1 - taken_sib, done, now, proposed[take - 1], sibling=taken_sib)
        if done:
            session.done = True
            if self.regime is not None:
                self.regime.finished(session.prompt_len, session.generated)
            self.kv_ops.append(
                (session.id, None)
            )  # no more rounds: free the KV (re-sent rounds use the cache)
        else:  # the KV holds the draft and siblings in pass order: a taken sibling is fed again next round
            self.kv_ops.append((session.id, session.committed_len - 1 - taken_sib))
        if job.kind == JobKind.round:
            return rec  # the rest in `answer`, after the next launch
        d = session.deadlines
        if d is not None:  # the answer goes out now: the next deadline counts from here
            if job.kind == JobKind.open:
                d.on_first_token(now)
            else:
                d.on_round(0, 0, now)  # a decode step (before its next one is queued, with that deadline)
        if job.kind == JobKind.open:
            session.opened = True
            session.probe = self.regime is not None and self.regime.enlist()
            if self.regime is not None and session.start_on_server and not done:
                # decoded while its draft prefills the prompt: a first round would wait for that prefill, which
                # on a Mac-mini-class draft takes ≈ 0.5 s for a 300-token prompt (docs/scheduling.md §12). A
                # probe too: it goes to the edge once it has dwelt (HybridRule.moves)
                session.mode = "centralized"
        else:  # centralized decode step: hand it back to the edge now, or decode its next token in the next step
            rec.switch = not done and self._back_to_speculative(session)
        if session.mode == "centralized" and not done:
            self._enqueue(Job(session, JobKind.decode))  # continuous batching: straight back in the queue
        return rec

    def answer(self, records: list[Committed], launch_in_ms: float = 0.0) -> list[Reply]:
        """Phase 2a, once the next step has launched (so off the device's idle path) and before the loop yields:
        every answer's frame, and for a round the regime's sample, the hybrid's check and the next round's
        announcement. `launch_in_ms`: when the step after the one just launched starts (`--align`; else 0)."""
        now = time.monotonic()
        replies: list[Reply] = []
        for rec in records:
            job = rec.job
            session = job.session
            conn = session.conn
            if rec.refusals is not None:
                replies += rec.refusals
                continue
            rec.at = now
            if job.kind == JobKind.round:
                self._answer_round(rec, now, launch_in_ms, replies)
            elif conn is None:
                continue
            elif job.kind == JobKind.open:
                opened = Opened(
                    session_id=session.id,
                    committed_len=session.committed_len,
                    next_token=rec.next_token,
                    done=rec.done,
                    prefill_ms=1000.0 * job.forward_s,
                    queue_ms=1000.0 * ((job.started_at or job.enqueued_at) - job.enqueued_at),
                    wait_hint_ms=self.wait_hint_ms(session, now),
                    mode=session.mode,
                )
                replies.append(Reply(conn, opened))
            else:
                replies.append(
                    Reply(conn, pack_tokens(session.id, [rec.next_token], session.committed_len, rec.done))
                )
                if rec.switch:
                    replies.append(
                        Reply(conn, Switch(session_id=session.id, committed_len=session.committed_len))
                    )
        return replies

    def _answer_round(self, rec: Committed, now: float, launch_in_ms: float, replies: list[Reply]) -> None:
        job, done = rec.job, rec.done
        session = job.session
        d = session.deadlines
        if d is not None:  # the answer goes out now: the next deadline counts from here
            # a committed sibling counts as an accepted draft token: E(k), what the regime and hints need,
            # is the tokens a round commits from the edge
            d.on_round(len(job.draft), rec.accepted + rec.sibling, now)
        self._sample(session)
        centralize = rec.switch = not done and self._centralize(session, job)
        queue_ms = 1000.0 * ((job.started_at or job.enqueued_at) - job.enqueued_at)
        verdict = pack_verdict(
            session.sid_raw,
            job.round,
            session.committed_len,
            rec.accepted,
            rec.next_token,
            done,
            queue_ms,
            1000.0 * job.forward_s,
            self.wait_hint_ms(session, now),
            self.price.price_ms,
            job.unverified,
            centralize,
            launch_in_ms,
            self.draft_cap(session),
            rec.sibling,
        )
        session.last_round = job.round
        session.last_verdict = verdict
        if centralize:
            # decoded from the step after the one just launched (the verdict says so)
            self._enqueue(Job(session, JobKind.decode))
        elif not done and session.think_s is not None:
            # its next round is expected after its measured device time: the policy may hold for it
            self.queue.announce(session.id, now + session.think_s)
        if session.conn is not None:
            replies.append(Reply(session.conn, verdict))

    def draft_cap(self, session: Session) -> int:
        """The most draft tokens the session's next round should carry (the regime's cap under load, a probe's in
        the centralized regime; 0: none)."""
        if self.forced_cap > 0:
            return self.forced_cap
        return self.regime.cap_for(session.probe) if self.regime is not None else 0

    def _sample(self, session: Session) -> None:
        """After a verdict: the session's measured speculation, for the regime (once it has `SAMPLE_ROUNDS` rounds)."""
        d = session.deadlines
        if self.regime is None or d is None or session.think_s is None or session.k_mean is None:
            return
        if d.acceptance.n_rounds >= SAMPLE_ROUNDS:
            acc = d.acceptance
            sample = SessionSample(
                acc.alpha, session.slo.tpot_ms, session.committed_len, acc.accepted, acc.tried
            )
            self.regime.observe(session.id, sample, session.k_mean, 1000.0 * session.think_s, session.probe)

    def _centralize(self, session: Session, job: Job) -> bool:
        """After a verdict: move a hybrid session to server-side decoding (sched/hybrid.py has the rule)?"""
        return self._switch(session, "centralized", len(job.draft))

    def _back_to_speculative(self, session: Session) -> bool:
        """After a decode step of a switched session: hand it back to the edge?"""
        return self._switch(session, "speculative", DEFAULT_DRAFT_LEN)

    def _decide(self, regime: Regime, now: float) -> Mode:
        """The regime's mode now. Each decision is logged with the model's view (sched/regime.py): `regime_flip`
        where it flipped, else `regime_decision` (every `every_s` at most: when and why a fleet is decoded)."""
        flips, decisions = regime.flips, regime.decisions
        active = len(self.store)
        mode = regime.decide(now, active)
        if regime.decisions != decisions and regime.last is not None:
            last, device = regime.last, regime.device()
            log_event(
                log,
                "regime_flip" if regime.flips != flips else "regime_decision",
                mode=mode,
                active=active,
                decode=last.decode,
                decode_limit=last.decode_limit,
                speculative=last.speculative,
                k=last.k,
                draft_cap=regime.draft_cap,
                fleet_speculative=regime.fleet.speculative if regime.fleet is not None else -1,
                fleet_k=regime.fleet.k if regime.fleet is not None else -1,
                step_ms=round(last.step_ms, 1),
                measured_step_ms=round(regime.measured_step_ms, 1),
                no_slack=int(regime.no_slack),
                device_fixed_ms=round(device.fixed_ms, 1),
                device_per_token_ms=round(device.per_token_ms, 2),
                rho=round(regime.prompt_per_token(), 3),
                samples=regime.sample_count,
                leaning=regime.leaning,
                ceiling=regime.decode_ceiling if regime.decode_ceiling is not None else -1,
                refits=regime.estimator.refits,
            )
        return mode

    def _switch(self, session: Session, to: Mode, default_k: int) -> bool:
        """Count one more step in the session's mode, ask the hybrid rule whether to move it `to` the other mode,
        and if so switch it (the caller sends the frame that says so)."""
        if self.hybrid is None or not session.hybrid:
            return False
        session.mode_steps += 1
        now = time.monotonic()
        regime = self.regime
        # a probe measuring its rounds, or one that started decoded and is yet to go to the edge (HybridRule.moves)
        probing = (
            session.probe
            and regime is not None
            and (session.switches == 0 if to == "speculative" else session.mode_steps < regime.probe_rounds)
        )
        if (
            to == "speculative"
            and not probing
            and regime is not None
            and regime.mode == "centralized"
            and not regime.due(now)
        ):
            # none goes back to the edge in the centralized regime, and until its next decision is due that is
            # the answer: the full check ran after every decoded token (≈ 3.6 µs each under cProfile, dev VM)
            return False
        decode_all = regime is not None and self._decide(regime, now) == "centralized"

        def inputs() -> SwitchInputs:
            d = session.deadlines
            alpha = d.acceptance.measured_alpha if d is not None else None
            k = round(session.k_mean) if session.k_mean is not None else default_k
            round_ms, decode_ms = round_and_decode_ms(
                session.think_s, lambda item: self.queue.wait_hint(item, now), k, session.committed_len
            )
            price = self.price
            return SwitchInputs(
                k, alpha, price.price_ms, session.slo.tpot_ms, round_ms, decode_ms, price.item_ratio
            )

        trips = session.switches // 2  # session.switches counts both directions: a round trip is two
        why = self.hybrid.moves(to == "speculative", session.mode_steps, trips, decode_all, probing, inputs)
        if why is None:
            return False
        session.mode, session.mode_steps = to, 0
        session.catching_up = to == "speculative"
        session.switches += 1
        self.switch_counts[to] += 1
        self.switch_reasons[why.value] += 1
        self.metrics.switches.labels(to).inc()
        log_event(
            log,
            "session_switch",
            session=session.id[:8],
            mode=to,
            why=why.value,
            price_ms=self.price.price_ms,
        )
        return True

    def finish(self, records: list[Committed]) -> None:
        """Phase 2b, while the next forward runs: SLO bookkeeping and metrics for the answers just sent."""
        committed = rounds = drafted = accepted = siblings = 0
        for rec in records:
            if rec.refusals is not None:
                continue
            job, session = rec.job, rec.job.session
            committed += rec.take
            if job.kind == JobKind.round:
                rounds += 1
                drafted += len(job.draft)
                accepted += rec.accepted
                siblings += rec.sibling
            self._answered(rec)
            if rec.done and session.generated > 0:
                log_event(log, "session_done", session=session.id[:8], generated=session.generated)
        m = self.metrics
        m.committed_tokens.inc(committed)
        m.rounds.inc(rounds)
        m.draft_tokens.inc(drafted)
        m.accepted_tokens.inc(accepted)
        m.sibling_tokens.inc(siblings)

    def _answered(self, rec: Committed) -> None:
        """An Opened / Verdict / Tokens frame went out: SLO metrics."""
        job, sent_at = rec.job, rec.at
        session = job.session
        self.slo.tokens(session.id, rec.take, sent_at)
        if job.kind != JobKind.open:
            req = job.request
            if req is not None and req.solo_s is not None:
                solo = req.solo_s  # the policy priced it when it selected the request
            elif req is not None:
                solo = self._solo(req.new_tokens, req.context_len, req.cache_miss)
            else:
                drafted = len(job.draft) if job.kind == JobKind.round else 0
                solo = self._solo(max(1, drafted + 1), session.committed_len - rec.take, False)
            met = job.deadline is None or sent_at <= job.deadline + 1e-9
            self.slo.round(session.id, sent_at - job.enqueued_at, solo, met)
        job.request = None
        if rec.done:
            self.session_ended(session, sent_at)

    def _solo(self, new: int, context: int, miss: bool) -> float:
        """Predicted solo time of an item, for the interference metric: memoised by (new tokens, context to 32
        tokens, miss) until the estimator changes, since centralized decode steps ask for it per session per step."""
        est = self.estimator
        if est.version != self._solo_version:  # raw times change only with a refit
            self._solo_memo.clear()
            self._solo_version = est.version
        key = (new, context >> 5, miss)
        raw = self._solo_memo.get(key)
        if raw is None:
            raw = self._solo_memo[key] = est.predict_raw(_EMPTY.plus(ItemShape(new, context, miss)))
        return raw * est.correction

    def fail(self, job: Job, message: str) -> list[Reply]:
        session = job.session
        self.queue.cancel(session.id)
        if session.pending is job:
            session.pending = None
        if job.kind == JobKind.open:
            # A failed open leaves nothing to resume: free its slot and KV now, not at the TTL.
            self.store.remove(session.id, release=False)
            self.session_ended(session)
            self.kv_ops.append((session.id, None))
            self.metrics.sessions.set(len(self.store))
        else:
            self.kv_ops.append((session.id, session.committed_len - 1))
        if session.conn is None:
            return []
        rnd = job.round if job.kind == JobKind.round else None
        ref = Refusal(
            ErrorCode.internal, f"verification failed ({message}); resend", session_id=session.id, round=rnd
        )
        return [Reply(session.conn, ref)]  # the gateway turns a Refusal into an Error frame

    def session_ended(self, session: Session, now: float | None = None) -> None:
        """Judge the session's SLO once (done, closed or expired)."""
        self.slo.close(session.id, time.monotonic() if now is None else now)
