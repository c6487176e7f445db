"""The verify engine: the queue, the policy, the backend and acceptance. It never touches a socket.

The gateway hands it work (`open`, `round`, `resume`, `close`, each validated against the session and answered
with a `Refusal` when wrong) and gets replies back: immediate ones as return values, and the answers of every
batch step through `deliver` (a list of `Reply`), which the gateway turns into frames.

One step (`run`): schedule → run → postprocess.
  schedule     refresh each waiting job's request (KV lengths), `Scheduler.next_batch`, plan work items
               (`planner`), fit the KV budget;
  run          `Runner.run`: the forward and acceptance for every final item, on a worker thread;
  postprocess  `Committer.postprocess`: commit tokens, verdicts as bytes, wait hints, SLO bookkeeping; the
               replies go to `deliver`.
The postprocess of step n runs on the event loop while the forward of step n+1 runs on the worker thread, so the
device waits only for scheduling and planning (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from wisp_sdk.protocol import (
    ErrorCode,
    Limits,
    Open,
    Resumed,
    Round,
    Tokens,
)

from wisp_cloud.acceptance import DraftError, check_siblings, round_q
from wisp_cloud.backends.base import Backend, BatchStats
from wisp_cloud.commit import Committed, Committer
from wisp_cloud.config import ServerConfig
from wisp_cloud.deadlines import SessionDeadlines
from wisp_cloud.estimator import ItemShape, VerifyTimeEstimator
from wisp_cloud.jobs import Job, JobKind, request_of
from wisp_cloud.loads import candidate_load, session_load
from wisp_cloud.logs import log_event
from wisp_cloud.metrics import Metrics
from wisp_cloud.planner import Outcome, Planned, fit_budget, plan, ran_shape
from wisp_cloud.replies import Peer, Refusal, Reply
from wisp_cloud.runner import Runner
from wisp_cloud.sched import AdmissionController, Batch, Scheduler, make_policy
from wisp_cloud.sched.hybrid import HybridRule
from wisp_cloud.sched.pricing import verify_len
from wisp_cloud.sched.regime import MIN_REFITS, PROBE_EVERY, Regime
from wisp_cloud.sessions import Session, SessionLimitError, SessionStore
from wisp_cloud.slo_metrics import SLOMetrics
from wisp_cloud.step_stats import StepLog, StepMix

log = logging.getLogger("wisp.engine")

_HOUSEKEEPING_S = 1.0
MIN_TEMPERATURE = 1e-3  # below it (but above 0, greedy) sampling is numerically undefined in float32
_MIN_SLEEP_S = 0.0005  # shortest wait after an empty selection


@dataclass(slots=True)
class _Ran:
    """A step whose tokens are committed and answered, its bookkeeping still to do."""

    records: list[Committed]
    stats: BatchStats
    shapes: list[ItemShape]
    mix: StepMix
    t_launch: float
    host_s: float  # the device waited this long for the host before this forward
    schedule_s: float  # of that: selecting and planning this step
    commit_s: float  # committing this step's outcomes, after its forward (on the next step's host time)


class Engine:
    def __init__(
        self, backend: Backend, config: ServerConfig, estimator: VerifyTimeEstimator | None = None
    ) -> None:
        self.backend = backend
        self.cfg = config
        # Verify-time estimator: refined online from every step that runs (exact item shapes), shared with the
        # policy, the wait hints and admission, and the solo-time reference of the interference metric.
        self.estimator = estimator or VerifyTimeEstimator.default()
        # Every policy but SLED chunks long prompts (SLED is the static-batching baseline: whole prompts).
        kw: dict[str, object] = {"prefill_chunk": config.prefill_chunk} if config.policy != "sled" else {}
        if config.policy == "wisp":
            kw["fill"] = config.fill
            kw["refuse"] = config.refuse
            kw["protect_decodes"] = not config.regime
        self.policy = make_policy(config.policy, self.estimator, max_batch=config.max_batch, **kw)
        self.queue = Scheduler(self.policy, self.estimator, learn=False, tenant_weights=config.tenant_weights)
        self.admission = (
            AdmissionController(self.estimator, target=config.admission_target, max_batch=config.max_batch)
            if config.policy == "wisp" and config.admission_target > 0
            else None
        )
        # bounded: percentiles over the last 20 k sessions and 100 k rounds (counts and goodput stay exact)
        self.slo = SLOMetrics(started=time.monotonic(), max_finished=20_000)
        self.metrics = Metrics()
        limit = min(config.max_context_len, config.kv_budget_tokens)
        max_pos = backend.max_positions
        self.max_context_len = min(limit, max_pos) if max_pos else limit
        self.store = SessionStore(
            kv_budget_tokens=config.kv_budget_tokens,
            ttl_s=config.session_ttl_s,
            max_sessions=config.max_sessions,
            max_sessions_per_token=config.max_sessions_per_token,
            cached_len=backend.cached_len,
            release=backend.release,
        )
        self.limits = Limits(
            max_frame_bytes=config.max_frame_bytes,
            max_draft_len=config.max_draft_len,
            max_context_len=self.max_context_len,
            max_sessions_per_token=config.max_sessions_per_token,
            max_siblings=min(config.max_siblings, backend.max_siblings),
        )
        # KV of sessions closed by the gateway: freed by the loop between forward passes, because the backend is
        # only ever touched by the loop (a forward may be running on the worker thread right now).
        self._to_release: list[str] = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wisp-forward")
        self._last_housekeeping = 0.0
        self._eos = frozenset(backend.eos_token_ids)
        self.steps = StepLog(log, graph_stats=lambda: backend.graph_stats)
        self.deliver: Callable[[list[Reply]], None] = lambda replies: None
        self.runner = Runner(backend, config.fault_token)
        wisp = config.policy == "wisp"
        # The hybrid and the truncated verify are WISP's (docs/scheduling.md); the test hooks force them anywhere.
        self.hybrid = (
            HybridRule(every=config.hybrid_every)
            if config.hybrid_every > 0 or (wisp and config.hybrid)
            else None
        )
        self.truncate = config.verify_cap is not None or (wisp and config.truncate_drafts)
        self.align = wisp and config.align  # verdicts carry the next launch (docs/scheduling.md §11)
        self.committer = Committer(
            self.store,
            self.queue,
            self.estimator,
            self.metrics,
            self.slo,
            self._eos,
            self.max_context_len,
            self._enqueue,
            self.hybrid,
            Regime(
                self.estimator,
                min_refits=MIN_REFITS,
                cap=config.draft_cap,
                hold="centralized" if config.decode_all else None,
                probe_every=PROBE_EVERY if config.probes else 0,
            )
            if self.hybrid is not None and wisp and config.regime
            else None,
            forced_cap=config.force_draft_cap,
        )
        if self.committer.regime is not None:
            self.policy.follow(self.committer.regime)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.metrics.close()

    # ---- work from the gateway (each validates against the session; a Refusal is the gateway's to send) ----

    def open(self, owner: str, conn: Peer, msg: Open) -> Session:
        total = len(msg.prompt_ids) + len(msg.committed_ids)
        if total >= self.max_context_len:
            raise Refusal(
                ErrorCode.too_large,
                f"context of {total} tokens (limit {self.max_context_len - 1} to leave room)",
            )
        self._check_ids(msg.prompt_ids, "prompt_ids")
        self._check_ids(msg.committed_ids, "committed_ids")
        if len(msg.committed_ids) >= msg.max_new_tokens:
            raise Refusal(ErrorCode.bad_request, "committed_ids already reach max_new_tokens")
        t = msg.sampling.temperature
        if 0.0 < t < MIN_TEMPERATURE:  # logits / t overflows: every probability would be NaN
            raise Refusal(
                ErrorCode.bad_request,
                f"temperature {t:g} is too small to sample with (0 is greedy; else at least {MIN_TEMPERATURE:g})",
            )
        now = time.monotonic()
        reason = self._admit(msg)
        if reason is not None:
            self.slo.refuse()
            raise Refusal(ErrorCode.overloaded, f"{reason}; retry later")
        try:
            session = self.store.create(
                owner=owner,
                prompt_ids=msg.prompt_ids,
                committed_ids=msg.committed_ids,
                max_new_tokens=msg.max_new_tokens,
                sampling=msg.sampling,
                slo=msg.slo,
                mode=msg.mode,
                stop_ids=msg.stop_token_ids,
            )
        except SessionLimitError as exc:
            raise Refusal(ErrorCode.overloaded, str(exc)) from exc
        session.conn = conn
        session.hybrid = self.hybrid is not None and msg.mode == "speculative"
        session.start_on_server = session.hybrid and msg.start_on_server and self.cfg.start_on_server
        session.deadlines = SessionDeadlines.from_slo(
            msg.slo, now, max_new_tokens=msg.max_new_tokens - len(msg.committed_ids)
        )
        self.slo.open(session.id, msg.slo.ttft_ms, msg.slo.tpot_ms, now)
        self.metrics.sessions_opened.labels(msg.mode).inc()
        self.metrics.sessions.set(len(self.store))
        log_event(
            log,
            "session_open",
            session=session.id[:8],
            owner=session.owner,
            context=total,
            mode=msg.mode,
            greedy=msg.sampling.greedy,
            rebuild=bool(msg.committed_ids),
        )
        self._enqueue(Job(session, JobKind.open))
        return session

    def round(self, session: Session, conn: Peer, msg: Round, conn_open: bool) -> list[Reply]:
        sid, rnd = msg.session_id, msg.round
        if conn_open:  # a closed connection's late frame must not steal the session back
            session.conn = conn
        session.touch()

        def bad(code: ErrorCode, text: str) -> Refusal:
            return Refusal(code, text, session_id=sid, round=rnd)

        if rnd == session.last_round and session.last_verdict is not None:
            return [
                Reply(conn, session.last_verdict)
            ]  # idempotent re-send: the same verdict, nothing applied
        pending = session.pending
        if pending is not None and pending.kind == JobKind.round and pending.round == rnd:
            return []  # already being verified: its verdict goes to this connection when ready
        if session.mode != "speculative":
            raise bad(ErrorCode.bad_request, "a centralized session takes no rounds")
        if not session.opened or pending is not None:
            raise bad(ErrorCode.bad_request, "wait for the previous answer before sending a round")
        if session.done:
            raise bad(ErrorCode.bad_request, "session is finished (EOS, stop token or max_new_tokens)")
        if rnd != session.last_round + 1:
            raise bad(ErrorCode.bad_request, f"round {rnd} out of order (last answered {session.last_round})")
        if msg.committed_len != session.committed_len:
            raise bad(
                ErrorCode.bad_request,
                f"stale committed_len {msg.committed_len} (server has {session.committed_len})",
            )
        if len(msg.draft_ids) > self.cfg.max_draft_len:
            raise bad(
                ErrorCode.too_large, f"draft of {len(msg.draft_ids)} tokens (limit {self.cfg.max_draft_len})"
            )
        if session.committed_len + len(msg.draft_ids) + len(msg.sibling_ids) > self.max_context_len:
            raise bad(ErrorCode.too_large, f"context + draft exceeds max_context_len {self.max_context_len}")
        self._check_ids(msg.draft_ids, "draft_ids", sid, rnd)
        self._check_ids(msg.sibling_ids, "sibling_ids", sid, rnd)
        try:
            q = round_q(msg, self.backend.vocab_size, session.sampling.greedy)
            check_siblings(msg.sibling_ids, msg.draft_ids, q, self.limits.max_siblings)
        except DraftError as exc:
            raise bad(ErrorCode.bad_request, str(exc)) from exc
        draft = list(msg.draft_ids)
        m = self._verify_len(session, len(draft))
        if m < len(draft):  # verify only the prefix that pays: acceptance on it is exactly a shorter draft's
            draft, q = draft[:m], None if q is None else q[:m]
        job = Job(session, JobKind.round, rnd, draft, q, len(msg.draft_ids) - m, msg.sibling_ids[:m])
        if job.unverified:
            self.metrics.unverified_tokens.inc(job.unverified)
        self._enqueue(job)
        return []

    def _verify_len(self, session: Session, k: int) -> int:
        """How many of a round's k draft tokens to verify (sched/pricing.py, `verify_len`)."""
        # the regime's cap: a round drafted before the verdict that set it
        cap = self.committer.draft_cap(session)
        m = k if cap <= 0 else min(k, cap)
        if self.truncate:
            d = session.deadlines
            alpha = d.acceptance.measured_alpha if d is not None else None
            m = verify_len(m, alpha, self.committer.price.price_ms, session.slo.tpot_ms)
        return m if self.cfg.verify_cap is None else min(m, self.cfg.verify_cap)

    def resume(self, session: Session, conn: Peer) -> list[Reply]:
        in_flight = session.pending is not None and session.pending.kind == JobKind.round
        # A round in flight is answered to whoever re-sends it (the client re-sends any round newer than
        # last_round), so a resumed client never gets an unasked-for verdict on top of its re-send's answer.
        session.conn = conn if not in_flight or session.conn is conn else None
        session.touch()
        replies = [
            Reply(
                conn,
                Resumed(
                    session_id=session.id,
                    committed_len=session.committed_len,
                    last_round=session.last_round,
                    mode=session.mode,
                ),
            )
        ]
        if (session.mode == "centralized" or session.switches) and session.opened:
            # Streamed tokens sent to the dead connection are lost (and a switched session's verdict or Switch
            # frame with them); resend them all (committed_len lets the client keep only what it lacks).
            tokens = Tokens(
                session_id=session.id,
                tokens=session.tokens[session.prompt_len :],
                committed_len=session.committed_len,
                done=session.done,
            )
            replies.append(Reply(conn, tokens))
        log_event(log, "session_resume", session=session.id[:8], committed_len=session.committed_len)
        return replies

    def close_session(self, session: Session) -> None:
        self.queue.cancel(session.id)
        session.pending = None
        self.store.remove(session.id, release=False)
        self.committer.session_ended(session)
        self._to_release.append(session.id)
        self._wake.set()
        self.metrics.sessions.set(len(self.store))
        log_event(log, "session_close", session=session.id[:8], generated=session.generated)

    def release_closed(self) -> None:
        """Free the KV of closed sessions now; only while the loop is stopped (the backend is the loop's)."""
        while self._to_release:
            self.backend.release(self._to_release.pop())

    def busy(self) -> bool:
        """Work waiting or in flight."""
        return bool(self.queue.waiting) or any(s.pending is not None for s in self.store)

    def detach(self, conn: Peer) -> None:
        """A connection went away: its sessions live on until their TTL (the client may resume them)."""
        for session in self.store:
            if session.conn is conn:
                session.conn = None

    def _check_ids(
        self, ids: list[int], what: str, session_id: str | None = None, round: int | None = None
    ) -> None:
        vocab = self.backend.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            raise Refusal(
                ErrorCode.bad_request,
                f"{what} has token ids outside [0, {vocab})",
                session_id=session_id,
                round=round,
            )

    def _admit(self, msg: Open) -> str | None:
        """None to admit the session `msg` asks for, else why it is refused (`overloaded`)."""
        if self.admission is None:
            return None
        active = [session_load(s) for s in self.store if not s.done]
        decision = self.admission.admit(candidate_load(msg, active), active)
        return None if decision.admit else decision.reason

    def _enqueue(self, job: Job) -> None:
        session = job.session
        d = session.deadlines
        if d is not None:  # when the answer must reach the device (docs/scheduling.md, "Deadlines")
            if job.kind == JobKind.open:
                job.deadline = d.prefill_deadline()
            else:
                job.deadline = d.round_deadline(len(job.draft), job.enqueued_at)
        if job.kind == JobKind.round:
            k = len(job.draft)
            first_round = session.draft_len is None
            session.draft_len = k
            # admission pairs the mean draft length with the mean device time (a controller varies k per round)
            session.k_mean = float(k) if session.k_mean is None else 0.8 * session.k_mean + 0.2 * k
            # device time since our last answer: draft + network. Not the first round's: it also holds the
            # device's one-off prompt prefill, which would make the session look slow for many rounds. Nor the
            # first after a return from server decoding (its catch-up feed): on an H200 (run 41) that made
            # returned sessions look slow, and the hybrid's too-slow rule sent them back to the server.
            if d is not None and d.anchor is not None and not first_round and not session.catching_up:
                think = max(0.0, job.enqueued_at - d.anchor)
                session.think_s = think if session.think_s is None else 0.8 * session.think_s + 0.2 * think
            session.catching_up = False
        job.cached_len = self.backend.cached_len(session.id)
        job.request = request_of(job)
        session.pending = job
        self.queue.submit(job.request)
        self._wake.set()

    # ---- the loop: schedule -> run -> postprocess ----

    async def run(self) -> None:
        """schedule -> run -> postprocess, the postprocess split around the next forward.

        Right after the forward of step n, `Committer.commit` commits the tokens (a centralized session's next
        decode step goes straight back in the queue); then step n+1 is selected and launched, and only then are
        step n's answers built (`Committer.answer`: the verdicts, the hybrid's and regime's checks) and sent, and
        `Committer.finish` (SLO bookkeeping, metrics) and the estimator's update run, all overlapping the forward
        of step n+1. Postprocess never touches the backend while a forward runs: its KV changes are queued and
        applied before the next plan.
        """
        loop = asyncio.get_running_loop()
        prev: _Ran | None = None
        unanswered: list[Committed] = []  # the last step's commits, answered once the next step has launched
        t_free = time.perf_counter()  # when the device last became free with work waiting
        while True:
            now = time.monotonic()
            self._apply_kv_ops()  # no forward runs here: the backend is the loop's
            if now - self._last_housekeeping > _HOUSEKEEPING_S:
                self._housekeeping(now)
            planned: list[Planned] = []
            fut = None
            schedule_s = 0.0
            try:
                if self.queue.waiting:
                    t_sched = time.perf_counter()
                    planned = self._schedule(now)
                    schedule_s = time.perf_counter() - t_sched
                if planned:
                    shapes = [ran_shape(p) for p in planned]
                    mix = StepMix.of(
                        (p.job.request.kind if p.job.request else "verify" for p in planned), len(self.queue)
                    )
                    t_launch = time.perf_counter()
                    fut = loop.run_in_executor(self._executor, self.runner.run, planned)
            except Exception:  # never let the loop die: fail what was selected, keep serving
                log.exception("batch scheduling failed")
                self._fail_all(planned)
                planned = []
            if unanswered:
                # the launch just made (or none: 0) is what a new round can join next
                launch_ms = 1000.0 * self.queue.hints.launch_in(time.monotonic()) if self.align else 0.0
                try:
                    self.deliver(self.committer.answer(unanswered, launch_ms))
                except Exception:
                    # the tokens are committed: a client re-sends its round and gets its verdict
                    log.exception("answering failed")
                unanswered = []
            if prev is not None:
                self._finish(prev)  # overlaps the forward just launched
                prev = None
            if fut is None:
                self.metrics.queued.set(len(self.queue))
                if not self.queue.waiting:
                    await self._sleep(_HOUSEKEEPING_S)
                else:
                    # The policy chose to wait (e.g. SLED filling a batch): until its wakeup or an arrival.
                    at = self.queue.wakeup(now)
                    await self._sleep(
                        _HOUSEKEEPING_S if at is None else min(max(at - now, _MIN_SLEEP_S), _HOUSEKEEPING_S)
                    )
                t_free = time.perf_counter()
                continue
            try:
                outcomes, stats = await fut
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch step failed")
                self._fail_all(planned)
                t_free = time.perf_counter()
                continue
            t_done = time.perf_counter()
            self._requeue_chunks(outcomes)
            try:
                records = self.committer.commit(outcomes, stats)
            except Exception:
                log.exception("commit failed")
                self._fail_all(planned)
                t_free = time.perf_counter()
                continue
            # answered after the next launch: nothing is sent before the loop yields anyway
            unanswered = records
            commit_s = time.perf_counter() - t_done
            prev = _Ran(records, stats, shapes, mix, t_launch, t_launch - t_free, schedule_s, commit_s)
            t_free = t_done
            # no yield here: the next batch is selected and launched first, then the answers are built and
            # delivered (the gateway's writers send them, and its readers take new rounds, while it runs)

    def _finish(self, ran: _Ran) -> None:
        """Phase 2 of a step's postprocess: SLO bookkeeping, the estimator, step statistics."""
        try:
            self.committer.finish(ran.records)
        except Exception:
            log.exception("postprocess bookkeeping failed")
        answered_s = time.perf_counter() - ran.t_launch + ran.host_s
        if ran.stats.forward_s > 0:
            # The estimator learns how long a step holds its rounds (host work before the forward, the forward,
            # the answers): the next batch and every deadline wait on that, not on the forward alone.
            self.estimator.observe(answered_s, ran.shapes)
        step_s = ran.host_s + ran.stats.forward_s
        self.steps.add(ran.stats, ran.mix, step_s, ran.schedule_s, ran.commit_s)
        if self.committer.regime is not None and ran.stats.forward_s > 0:
            regime = self.committer.regime
            regime.stepped(1000.0 * step_s, ran.stats.batch_size, 1000.0 * ran.host_s, ran.mix.left)
        self.metrics.queued.set(len(self.queue))

    def _requeue_chunks(self, outcomes: list[Outcome]) -> None:
        """A prefill chunk that ran goes straight back to the queue for its next piece (no wait for postprocess)."""
        for out in outcomes:
            job = out.planned.job
            if (
                not out.planned.final
                and out.error is None
                and job.session.pending is job
                and job.request is not None
                and self.store.get(job.session.id) is job.session
            ):
                self.queue.submit(job.request)

    def _fail_all(self, planned: list[Planned]) -> None:
        self.deliver(
            [
                r
                for p in planned
                if p.job.session.pending is p.job
                for r in self.committer.fail(p.job, "batch failed")
            ]
        )

    def _apply_kv_ops(self) -> None:
        """KV changes queued while a forward ran (the backend is only touched between forwards)."""
        self.release_closed()
        ops, self.committer.kv_ops = self.committer.kv_ops, []
        for sid, length in ops:
            if length is None:
                self.backend.release(sid)
            else:
                self.backend.truncate(sid, length)

    async def _sleep(self, timeout: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=timeout)

    def _schedule(self, now: float) -> list[Planned]:
        """The next batch, planned into work items that fit the KV budget (the rest go back to the queue)."""
        fresh = []
        for r in self.queue.waiting:
            job: Job = r.payload
            job.cached_len = self.backend.cached_len(job.session.id)
            pending = max(1, job.pending_tokens)
            if pending > r.new_tokens:  # its KV was evicted: a new, larger request
                job.request = r = request_of(job)
            else:
                r.done = r.new_tokens - pending  # chunked prefill progress
            fresh.append(r)
        self.queue.waiting = fresh
        batch: Batch | None = self.queue.next_batch(now)
        if batch is None:
            return []
        planned = []
        for slot in batch.slots:
            job = slot.request.payload
            job.max_tokens = slot.n_tokens
            planned.append(plan(job, self.backend, self.cfg.prefill_chunk))
        planned, later = fit_budget(planned, self.cfg.kv_budget_tokens)
        for p in later:
            assert p.job.request is not None
            self.queue.submit(p.job.request)
        self._make_room(planned)
        for p in planned:
            if p.job.started_at is None:
                p.job.started_at = now
                self.metrics.queue_wait.observe(now - p.job.enqueued_at)
        return planned

    def _make_room(self, planned: list[Planned]) -> None:
        needed = sum(len(p.item.new_tokens) for p in planned)
        for session in self.store.make_room(needed, protect={p.job.session.id for p in planned}):
            self.metrics.sessions_evicted.inc()
            log_event(log, "session_evict", session=session.id[:8], committed_len=session.committed_len)

    def _housekeeping(self, now: float) -> None:
        self._last_housekeeping = now
        for session in self.store.expire(now):
            self.committer.session_ended(session, now)
            self.metrics.sessions_expired.inc()
            log_event(log, "session_expire", session=session.id[:8], committed_len=session.committed_len)
        self.metrics.sessions.set(len(self.store))
        self.metrics.kv_tokens.set(self.store.kv_tokens())
        self.metrics.kv_bytes.set(self.backend.kv_bytes())
        self.slo_summary(now)

    def slo_summary(self, now: float) -> dict[str, float]:
        summary = self.slo.summary(now, include_live=True)
        self.metrics.set_slo(summary)
        return summary
