"""The postprocess half of a step: commit verified tokens and build the answers (the engine hands them over).

Runs on the event loop, possibly while the next forward runs: it never touches the backend, and queues its KV
changes (truncate a rejected tail, release a finished session) in `kv_ops` for the engine to apply between
forwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from wisp_sdk.protocol import ErrorCode, Opened, Tokens, pack_verdict

from wisp_cloud.backends.base import BatchStats
from wisp_cloud.estimator import BatchShape, ItemShape, VerifyTimeEstimator
from wisp_cloud.jobs import Job, JobKind
from wisp_cloud.metrics import Metrics, log_event
from wisp_cloud.planner import Outcome, cut
from wisp_cloud.replies import Refusal, Reply
from wisp_cloud.sched import Scheduler
from wisp_cloud.sessions import Session, SessionStore
from wisp_cloud.slo_metrics import SLOMetrics

log = logging.getLogger("wisp.engine")

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
    ) -> None:
        self.store, self.queue, self.estimator = store, queue, estimator
        self.metrics, self.slo = metrics, slo
        self._eos, self.max_context_len = eos, max_context_len
        self._enqueue = enqueue  # a centralized session's next decode step goes straight back in the queue
        # KV changes for the engine to apply between forwards: (session, truncate length; None = release)
        self.kv_ops: list[tuple[str, int | None]] = []

    def wait_hint_ms(self, session: Session, now: float) -> float:
        """Expected wait (queue + model time) for this session's next round."""
        k = session.draft_len
        if k is None:
            k = DEFAULT_DRAFT_LEN if session.mode == "speculative" else 0
        return 1000.0 * self.queue.hints.hint(ItemShape(k + 1, session.committed_len), now)

    def postprocess(self, outcomes: list[Outcome], stats: BatchStats) -> list[Reply]:
        now = time.monotonic()
        self.metrics.observe_batch(stats.batch_size, stats.forward_s)
        hints = self.queue.hints
        hints.finished(
            [p.planned.job.ran_shape for p in outcomes if p.planned.job.ran_shape is not None], now
        )
        replies: list[Reply] = []
        tally = [0, 0, 0, 0]  # committed, rounds, drafted, accepted: counted once per step, not per job
        for out in outcomes:
            self._apply(out, stats, now, replies, tally)
        m = self.metrics
        m.committed_tokens.inc(tally[0])
        m.rounds.inc(tally[1])
        m.draft_tokens.inc(tally[2])
        m.accepted_tokens.inc(tally[3])
        return replies

    def _apply(
        self, out: Outcome, stats: BatchStats, sent_at: float, replies: list[Reply], tally: list[int]
    ) -> None:
        job = out.planned.job
        session = job.session
        job.forward_s += stats.forward_s
        job.batches += 1
        if self.store.get(session.id) is not session:
            self.kv_ops.append((session.id, None))  # closed while in the batch: the forward stored KV again
            return
        if session.pending is not job:
            return
        if out.error is not None:
            replies += self.fail(job, out.error)
            return
        if not out.planned.final:
            return  # more prefill chunks to go: requeued as soon as the forward ended (`_requeue_chunks`)
        session.pending = None
        session.touch()
        if job.kind != JobKind.open and job.started_at is not None:
            self.queue.hints.queued(job.started_at - job.enqueued_at)
        proposed = job.draft[: out.accepted] + [out.next_token]
        before = session.committed_len
        take, done = cut(session, proposed, self._eos, self.max_context_len)
        session.tokens += proposed[:take]
        accepted, next_token = take - 1, proposed[take - 1]
        if done:
            session.done = True
            self.kv_ops.append(
                (session.id, None)
            )  # no more rounds: free the KV (re-sent rounds use the cache)
        else:
            self.kv_ops.append((session.id, session.committed_len - 1))
        queue_ms = 1000.0 * ((job.started_at or job.enqueued_at) - job.enqueued_at)
        hint = self.wait_hint_ms(session, sent_at)
        tally[0] += take
        conn = session.conn
        if job.kind == JobKind.round:
            verdict = pack_verdict(
                session.sid_raw,
                job.round,
                session.committed_len,
                accepted,
                next_token,
                done,
                queue_ms,
                1000.0 * job.forward_s,
                hint,
            )
            session.last_round = job.round
            session.last_verdict = verdict
            tally[1] += 1
            tally[2] += len(job.draft)
            tally[3] += accepted
            if conn is not None:
                replies.append(Reply(conn, verdict))
        elif job.kind == JobKind.open:
            session.opened = True
            if conn is not None:
                opened = Opened(
                    session_id=session.id,
                    committed_len=session.committed_len,
                    next_token=next_token,
                    done=done,
                    prefill_ms=1000.0 * job.forward_s,
                    queue_ms=queue_ms,
                    wait_hint_ms=hint,
                )
                replies.append(Reply(conn, opened))
        elif conn is not None:  # centralized decode step
            tokens = Tokens(
                session_id=session.id, tokens=[next_token], committed_len=session.committed_len, done=done
            )
            replies.append(Reply(conn, tokens))
        self._answered(job, take, accepted, sent_at, done)
        if session.mode == "centralized" and not done:
            self._enqueue(Job(session, JobKind.decode))  # continuous batching: straight back in the queue
        elif before and done:
            log_event(log, "session_done", session=session.id[:8], generated=session.generated)

    def _answered(self, job: Job, take: int, accepted: int, sent_at: float, done: bool) -> None:
        """An Opened / Verdict / Tokens frame went out: deadlines and SLO metrics."""
        session = job.session
        drafted = len(job.draft) if job.kind == JobKind.round else 0
        d = session.deadlines
        if d is not None:
            if job.kind == JobKind.open:
                d.on_first_token(sent_at)
            else:
                d.on_round(drafted, accepted, sent_at)
        self.slo.tokens(session.id, take, sent_at)
        if job.kind != JobKind.open:
            req = job.request
            if req is not None and req.solo_s is not None:
                solo = req.solo_s  # the policy priced it when it selected the request
            else:
                if req is not None:
                    solo_shape = ItemShape(req.new_tokens, req.context_len, req.cache_miss)
                else:
                    solo_shape = ItemShape(max(1, drafted + 1), session.committed_len - take)
                solo = self.estimator.predict_shape(_EMPTY.plus(solo_shape))
            met = job.deadline is None or sent_at <= job.deadline + 1e-9
            self.slo.round(session.id, sent_at - job.enqueued_at, solo, met)
        job.request = None
        if done:
            self.session_ended(session, sent_at)

    def fail(self, job: Job, message: str) -> list[Reply]:
        session = job.session
        self.queue.cancel(session.id)
        if session.pending is job:
            session.pending = None
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
