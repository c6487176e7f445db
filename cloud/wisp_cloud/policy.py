"""Batch policies: which waiting jobs go into the next forward pass.

The server calls `select` once per loop iteration with every waiting job (oldest first) and runs what comes
back as one ragged batch; `observe` sees each finished batch (so an estimator can refine itself online), and
`wait_hint_ms` fills the Verdict's hint of how long the session's next round will wait. `admit` is the hook for
admission control. `SchedPolicy` plugs the scheduling module's `wisp`, `sled` and `centralized` policies
(scheduler.py) in next to the plain `fifo` here.

What a policy sees of each waiting `Job`: its session (SLO, sampling, committed length, mode), kind, draft,
arrival (`enqueued_at`), `started_at`, `cached_len` (refreshed before every `select`), `pending_tokens` and
`cache_miss`. It may set `job.max_tokens` to size a job's next piece (a prefill chunk; the final piece, which
carries the draft, always goes whole), and `job.deadline` / `job.annotations` for its own bookkeeping. The
server then plans each selected job (`WispServer._plan`), trims the batch to the KV budget, runs it, and calls
`observe` with the `BatchStats` (the estimator's training data).

Optional hooks the server calls when a policy has them (FifoPolicy has none):
  `wakeup(now) -> float | None`   after an empty selection: when to select again (None: on the next arrival);
  `admit_open(open_msg, sessions, now) -> str | None`   a refusal reason (-> `overloaded`), or None to admit;
  `answered(job, drafted, accepted, sent_at)`   after an Opened / Verdict / Tokens frame went out;
  `closed(session)`   the session ended (done, closed or expired).
The server itself owns the verify-time estimator (refined online from every batch, with the exact item
shapes) and the SLO bookkeeping (`Session.deadlines`, `job.deadline`, `slo_metrics.SLOMetrics`), for every
policy; a `SchedPolicy` shares that estimator.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # keep `wisp serve --help`-time imports free of torch
    from wisp_cloud.backends.base import BatchStats
    from wisp_cloud.estimator import VerifyTimeEstimator
    from wisp_cloud.jobs import Job
    from wisp_cloud.sessions import Session


class Policy(Protocol):
    name: str

    def select(self, waiting: list[Job], max_batch: int, now: float) -> list[Job]:
        """The jobs for the next batch (a non-empty subset of `waiting` when it is non-empty)."""
        ...

    def observe(self, stats: BatchStats, jobs: list[Job]) -> None:
        """A batch ran: its shape and timing, and the jobs it served."""
        ...

    def wait_hint_ms(self, session: Session, queued: int) -> float:
        """Expected wait (queue + model time) for this session's next round."""
        ...

    def admit(self, session_count: int, queued: int) -> bool:
        """Whether a new session may open now (False -> `overloaded`)."""
        ...


class FifoPolicy:
    """Everything waiting, oldest first, up to `max_batch`. No SLO awareness."""

    name = "fifo"

    def __init__(self, ema: float = 0.2) -> None:
        self._ema = ema
        self.batch_s = 0.0  # running mean forward time of a batch

    def select(self, waiting: list[Job], max_batch: int, now: float) -> list[Job]:
        return sorted(waiting, key=lambda j: j.enqueued_at)[:max_batch]

    def observe(self, stats: BatchStats, jobs: list[Job]) -> None:
        self.batch_s = (
            stats.forward_s
            if self.batch_s == 0
            else (1 - self._ema) * self.batch_s + self._ema * stats.forward_s
        )

    def wait_hint_ms(self, session: Session, queued: int) -> float:
        return 1000.0 * self.batch_s

    def admit(self, session_count: int, queued: int) -> bool:
        return True


DEFAULT_DRAFT_LEN = 4  # what a session that has not sent a round yet is assumed to draft


class SchedPolicy:
    """Server policy backed by a scheduler.py policy (`wisp`, `sled`, `centralized`, or its `fifo`).

    Each waiting `Job` becomes a `scheduler.Request` (kept on the job across selections, so a chunked prefill
    keeps its pacing): context_len = cached tokens, new_tokens = context not yet cached + draft, kind
    "prefill" for an open or a job with more than one uncached context token (evicted KV), else "verify"
    (round) / "decode" (centralized step); its deadline is `job.deadline` (set by the server from the
    session's `SessionDeadlines` when the job was queued), expected_tokens = E(k, α) of the session.
    The slots' piece sizes come back through `job.max_tokens` (the server's planner honours them). `wisp` alone
    does admission control (`AdmissionController`, when `admission_target` > 0).
    """

    def __init__(
        self,
        name: str,
        estimator: VerifyTimeEstimator | None = None,
        *,
        max_batch: int = 64,
        prefill_chunk: int | None = None,
        admission_target: float = 0.9,
        **kw: Any,
    ) -> None:
        from wisp_cloud import scheduler
        from wisp_cloud.estimator import VerifyTimeEstimator

        self.name = name
        self.est = estimator or VerifyTimeEstimator.default()
        if prefill_chunk and name in ("wisp", "centralized"):  # sled/fifo: whole prompts, as in scheduler.py
            kw.setdefault("prefill_chunk", prefill_chunk)
        self.policy = scheduler.make_policy(name, self.est, max_batch=max_batch, **kw)
        self.hints = scheduler.WaitHints(self.est)
        self.admission = (
            scheduler.AdmissionController(self.est, target=admission_target, max_batch=max_batch)
            if name == "wisp" and admission_target > 0
            else None
        )
        self._waiting: list[scheduler.Request] = []
        self._draft_len: dict[str, int] = {}  # session -> draft tokens of its last round
        self._think: dict[str, float] = {}  # session -> EWMA of device time between answer and next round
        self._k_mean: dict[str, float] = {}  # session -> EWMA of its draft length
        self.refused = 0
        self.batches = 0
        self.select_s = 0.0

    @property
    def counters(self) -> dict[str, int]:
        return dict(getattr(self.policy, "counters", {}))

    # ---- jobs -> requests ----
    def _request(self, job: Job) -> Any:
        from wisp_cloud.scheduler import Request

        pending = max(1, job.pending_tokens)
        req = job.annotations.get("req")
        if req is not None and pending <= req.new_tokens:
            req.done = req.new_tokens - pending  # chunked prefill progress
            return req
        s = job.session
        d = getattr(s, "deadlines", None)
        ctx_pending = s.committed_len - job.cached_len
        kind_name = getattr(job.kind, "value", job.kind)
        if kind_name == "open" or ctx_pending > 1:
            kind = "prefill"
        else:
            kind = "verify" if kind_name == "round" else "decode"
        if kind_name == "round":
            k = len(job.draft)
            first_round = s.id not in self._draft_len
            self._draft_len[s.id] = k
            # admission pairs the mean draft length with the mean device time (a controller varies k per round)
            old_k = self._k_mean.get(s.id)
            self._k_mean[s.id] = float(k) if old_k is None else 0.8 * old_k + 0.2 * k
            # device time since our last answer: draft + network. Not the first round's: it also holds the
            # device's one-off prompt prefill, which would make the session look slow for many rounds.
            if d is not None and d.anchor is not None and not first_round:
                think = max(0.0, job.enqueued_at - d.anchor)
                old = self._think.get(s.id)
                self._think[s.id] = think if old is None else 0.8 * old + 0.2 * think
            expected = d.expected_tokens(k) if d is not None else float(k + 1)
        else:
            expected = 1.0
        deadline = job.deadline if job.deadline is not None else job.enqueued_at + s.slo.tpot_ms / 1000.0
        req = Request(
            s.id,
            kind,  # type: ignore[arg-type]
            new_tokens=pending,
            context_len=job.cached_len,
            deadline=deadline,
            arrival=job.enqueued_at,
            expected_tokens=expected,
            cache_miss=job.cache_miss and kind_name != "open" and job.cached_len == 0,
            downlink_s=0.0,  # the protocol does not carry the RTT yet
            payload=job,
        )
        job.annotations["req"] = req
        return req

    # ---- the server's Policy protocol ----
    def select(self, waiting: list[Job], max_batch: int, now: float) -> list[Job]:
        t = time.perf_counter()
        self.policy.max_batch = max_batch
        self._waiting = [self._request(j) for j in waiting]
        batch = self.policy.select(self._waiting, now)
        out = []
        for slot in batch.slots:
            job = slot.request.payload
            job.max_tokens = slot.n_tokens
            job.annotations.update(chunk=slot.n_tokens, shape=slot.shape, best_effort=slot.best_effort)
            out.append(job)
        if out:
            self.hints.started(batch.predicted_s, now)
        self.select_s += time.perf_counter() - t
        return out

    def wakeup(self, now: float) -> float | None:
        return self.policy.wakeup(self._waiting, now) if self._waiting else None

    def observe(self, stats: BatchStats, jobs: list[Job]) -> None:
        # The server refines the shared estimator (it knows the exact shapes that ran); here: the wait hints.
        now = time.monotonic()
        self.batches += 1
        self.hints.finished([j.annotations["ran_shape"] for j in jobs if "ran_shape" in j.annotations], now)
        for job in jobs:
            kind = getattr(job.kind, "value", job.kind)
            final = job.annotations.get("final", True)
            if final and kind != "open" and job.started_at is not None:
                self.hints.queued(job.started_at - job.enqueued_at)

    def wait_hint_ms(self, session: Session, queued: int) -> float:
        from wisp_cloud.estimator import ItemShape

        k = self._draft_len.get(session.id, DEFAULT_DRAFT_LEN if session.mode == "speculative" else 0)
        return 1000.0 * self.hints.hint(ItemShape(k + 1, session.committed_len), time.monotonic())

    def admit(self, session_count: int, queued: int) -> bool:
        return True  # the real decision is admit_open, which sees the session's SLO and prompt

    def admit_open(self, msg: Any, sessions: Any, now: float) -> str | None:
        """None to admit the session `msg` (an Open) asks for, else why it is refused (`overloaded`)."""
        if self.admission is None:
            return None
        from wisp_cloud.scheduler import SessionLoad

        active = [self._load(s) for s in sessions if not s.done]
        known = [load.draft_len for load in active if load.draft_len > 0]
        central = msg.mode == "centralized"
        cand = SessionLoad(
            "candidate",
            tpot_s=msg.slo.tpot_ms / 1000.0,
            draft_len=0 if central else int(statistics.median(known)) if known else DEFAULT_DRAFT_LEN,
            context_len=len(msg.prompt_ids) + len(msg.committed_ids),
            think_s=0.0 if central else None,
            ttft_s=msg.slo.ttft_ms / 1000.0,
            prompt_len=len(msg.prompt_ids) + len(msg.committed_ids),
        )
        decision = self.admission.admit(cand, active)
        if decision.admit:
            return None
        self.refused += 1
        return decision.reason

    def _load(self, s: Session) -> Any:
        from wisp_cloud.scheduler import SessionLoad

        d = getattr(s, "deadlines", None)
        central = s.mode == "centralized"
        return SessionLoad(
            s.id,
            tpot_s=s.slo.tpot_ms / 1000.0,
            draft_len=0 if central else round(self._k_mean.get(s.id, DEFAULT_DRAFT_LEN)),
            context_len=s.committed_len,
            # None until the session has a verdict: admission fills in the other sessions' median
            alpha=d.acceptance.alpha if d is not None and d.acceptance.tried > 0 else None,
            think_s=0.0 if central else self._think.get(s.id),
        )

    def answered(self, job: Job, drafted: int, accepted: int, sent_at: float) -> None:
        job.annotations.pop("req", None)

    def closed(self, session: Session) -> None:
        self._draft_len.pop(session.id, None)
        self._think.pop(session.id, None)
        self._k_mean.pop(session.id, None)


POLICIES: dict[str, type] = {
    "fifo": FifoPolicy,
    "wisp": SchedPolicy,
    "sled": SchedPolicy,
    "centralized": SchedPolicy,
}


def make_policy(
    name: str,
    estimator: VerifyTimeEstimator | None = None,
    *,
    max_batch: int = 64,
    prefill_chunk: int | None = None,
    admission_target: float = 0.9,
) -> Policy:
    """`fifo` is the server's own FifoPolicy; the others wrap scheduler.py's policies in a SchedPolicy."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r} (have: {', '.join(POLICIES)})")
    if POLICIES[name] is SchedPolicy:
        return SchedPolicy(
            name,
            estimator,
            max_batch=max_batch,
            prefill_chunk=prefill_chunk,
            admission_target=admission_target,
        )
    return POLICIES[name]()
