"""The queue around a policy (`Scheduler`): submit, next batch, complete; chunked prefills go back by themselves."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wisp_cloud.estimator import ItemShape, VerifyTimeEstimator
from wisp_cloud.sched.fairness import FairShare
from wisp_cloud.sched.hints import WaitHints
from wisp_cloud.sched.policies import Policy
from wisp_cloud.sched.requests import Batch, Request


@dataclass
class Outcome:
    """A request whose last piece ran: when it finished and whether its answer can reach the device in time."""

    request: Request
    finished: float
    met: bool
    queue_s: float  # from arrival to its first piece being scheduled
    best_effort: bool


@dataclass
class SchedulerStats:
    batches: int = 0
    items: int = 0
    served: int = 0
    met: int = 0
    missed: int = 0
    predicted_s: float = 0.0
    forward_s: float = 0.0

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class Scheduler:
    """Owns the waiting queue around a policy. Not thread-safe: one batching loop drives it.

    Loop: `submit(req)` as requests arrive; when the backend is free, `batch = next_batch(now)`; if it is None,
    sleep until `wakeup(now)` or the next arrival; run the batch; `complete(batch, forward_s, now)` returns the
    finished requests (a non-final prefill chunk goes back to the queue by itself).

    Tenants: when the waiting requests belong to several tenants, the policy is offered only the first
    `max_batch` of their weighted fair merge (`FairShare`), each tenant's requests in the policy's own order.
    """

    def __init__(
        self,
        policy: Policy,
        estimator: VerifyTimeEstimator | None = None,
        learn: bool = True,
        hint_ewma: float = 0.1,
        tenant_weights: Mapping[str, float] | None = None,
    ) -> None:
        self.policy = policy
        self.estimator = estimator or policy.estimator
        self.learn = learn
        self.waiting: list[Request] = []
        self.stats = SchedulerStats()
        self.hints = WaitHints(self.estimator, hint_ewma)
        self.fair = FairShare(dict(tenant_weights or {}))
        # session id -> when its next round is expected (announce): the policy may hold a batch for it
        self.announced: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.waiting)

    def submit(self, req: Request) -> None:
        self.announced.pop(req.session_id, None)
        self.waiting.append(req)

    def announce(self, session_id: str, at: float) -> None:
        """The session's next round is expected at `at` (its answer went out; its device time is measured)."""
        self.announced[session_id] = at

    def cancel(self, session_id: str) -> list[Request]:
        self.announced.pop(session_id, None)
        gone = [r for r in self.waiting if r.session_id == session_id]
        self.waiting = [r for r in self.waiting if r.session_id != session_id]
        return gone

    def next_batch(self, now: float) -> Batch | None:
        if not self.waiting:
            return None
        pool = self.waiting
        first = pool[0].tenant
        if any(r.tenant != first for r in pool):
            pool = self.fair.order(self.policy.rank(pool, now))[: self.policy.max_batch]
        if self.announced:  # forget rounds that are overdue: a silent device must not hold anyone again
            self.announced = {k: t for k, t in self.announced.items() if t > now}
        self.policy.expect(sorted(self.announced.values()))
        batch = self.policy.select(pool, now)
        if not batch.slots:
            return None
        self.fair.charge(batch)
        chosen = {id(s.request) for s in batch.slots}
        self.waiting = [r for r in self.waiting if id(r) not in chosen]
        for s in batch.slots:
            if s.request.first_scheduled is None:
                s.request.first_scheduled = now
        self.hints.started(batch.predicted_s, now)
        return batch

    def wakeup(self, now: float) -> float | None:
        return self.policy.wakeup(self.waiting, now) if self.waiting else None

    def complete(self, batch: Batch, forward_s: float | Any, now: float) -> list[Outcome]:
        """Record a batch that ran (`forward_s`: seconds or a BatchStats) finishing at `now`."""
        secs = float(getattr(forward_s, "forward_s", forward_s))
        if self.learn and secs > 0:
            self.estimator.observe(secs, batch.shapes)
        self.stats.batches += 1
        self.stats.items += len(batch)
        self.stats.predicted_s += batch.predicted_s
        self.stats.forward_s += secs
        self.hints.finished(batch.shapes, now)
        done: list[Outcome] = []
        for s in batch.slots:
            r = s.request
            r.done = s.start + s.n_tokens
            if not s.final:
                self.waiting.append(r)
                continue
            queue_s = (r.first_scheduled if r.first_scheduled is not None else batch.formed_at) - r.arrival
            met = now + r.downlink_s <= r.deadline + 1e-9
            self.stats.served += 1
            self.stats.met += met
            self.stats.missed += not met
            if r.kind != "prefill":
                self.hints.queued(queue_s)
            done.append(Outcome(r, now, met, queue_s, best_effort=s.best_effort))
        return done

    def wait_hint(self, item: ItemShape, now: float) -> float:
        """Predicted seconds from a round's arrival to its verdict: typical queueing plus its batch's time."""
        return self.hints.hint(item, now)
