"""Verification batch scheduling: which waiting requests go into the next forward pass.

Pure and clock-injected (no asyncio, no torch): the server's batching loop and `wisp simulate` drive the same
code. A `Policy` picks one batch from the waiting requests; a `Scheduler` owns the queue around a policy
(submit, next batch, complete), advances chunked prefills, feeds the estimator online, counts deadline misses
and answers wait hints. `AdmissionController` decides whether a new session may open.

Policies (docs/scheduling.md):
  fifo         arrival order up to max_batch (prefill in one piece), work-conserving.
  sled         static batching: waits until max_batch requests are queued or the oldest waited max_wait_s,
               then FIFO; no SLO awareness, no chunking.
  centralized  continuous batching of decode steps (the server queues one decode item per active session per
               step): FIFO over items, long prompts prefilled in chunks under a token budget.
  wisp         SLO-aware: urgent requests (least slack) first, then late ones (best-effort), then the rest by
               throughput density; a piece is added only while the predicted batch time keeps every member
               (and every request left waiting) within its deadline; cheap pieces may push members by a small
               tolerance; long prompts paced and in adaptive chunks; aging against starvation.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from wisp_cloud.deadlines import expected_committed
from wisp_cloud.estimator import BatchShape, ItemShape, VerifyTimeEstimator

Kind = Literal["prefill", "verify", "decode"]
_EMPTY = BatchShape()
_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One unit of model work a session waits for. `payload` is the caller's own object (untouched)."""

    session_id: str
    kind: Kind
    new_tokens: int  # tokens after the cached prefix: prompt (prefill), pending+draft (verify), 1 (decode)
    context_len: int  # cached prefix length when the request arrived
    deadline: float  # time the answer must reach the device (deadlines.py)
    arrival: float
    expected_tokens: float = 1.0  # tokens the answer is expected to commit (density's numerator)
    cache_miss: bool = False  # the cached prefix must be rebuilt first
    downlink_s: float = 0.0
    payload: Any = None
    done: int = 0  # tokens of new_tokens already processed (chunked prefill)
    first_scheduled: float | None = None
    rid: int = field(default_factory=lambda: next(_ids))
    _memo: dict = field(default_factory=dict, repr=False)  # policies' per-request cache

    @property
    def remaining(self) -> int:
        return self.new_tokens - self.done

    def shape(self, n: int | None = None) -> ItemShape:
        """Shape of the next piece of n tokens (all remaining ones by default)."""
        return ItemShape(
            new_tokens=self.remaining if n is None else n,
            context=self.context_len + self.done,
            cache_miss=self.cache_miss and self.done == 0,
        )


@dataclass
class Slot:
    """A request's piece of a batch: tokens [start, start + n_tokens) of its new tokens."""

    request: Request
    start: int
    n_tokens: int
    best_effort: bool = False  # the policy knew it could not make its deadline

    @property
    def final(self) -> bool:
        return self.start + self.n_tokens >= self.request.new_tokens

    @property
    def shape(self) -> ItemShape:
        r = self.request
        return ItemShape(self.n_tokens, r.context_len + self.start, r.cache_miss and self.start == 0)


@dataclass
class Batch:
    slots: list[Slot]
    formed_at: float
    predicted_s: float = 0.0

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def shapes(self) -> list[ItemShape]:
        return [s.shape for s in self.slots]

    @property
    def requests(self) -> list[Request]:
        return [s.request for s in self.slots]


class Policy(Protocol):
    name: str
    max_batch: int
    estimator: VerifyTimeEstimator

    def select(self, waiting: Sequence[Request], now: float) -> Batch:
        """The next batch from `waiting` (not modified). An empty batch means: wait until `wakeup`."""
        ...

    def wakeup(self, waiting: Sequence[Request], now: float) -> float | None:
        """When `select` may return something after returning an empty batch (None: on the next arrival)."""
        ...


@dataclass
class _BasePolicy:
    estimator: VerifyTimeEstimator = field(default_factory=VerifyTimeEstimator.default)
    max_batch: int = 64
    max_batch_tokens: int | None = None  # cap on Σ new tokens of a batch (memory); None = no cap
    prefill_chunk: int | None = None  # prefill piece size; None = whole prompt in one pass
    name: str = "base"

    def _piece(self, r: Request) -> int:
        if r.kind == "prefill" and self.prefill_chunk:
            return min(r.remaining, self.prefill_chunk)
        return r.remaining

    def _predict(self, shapes: Iterable[ItemShape]) -> float:
        return self.estimator.predict(shapes) if self.estimator is not None else 0.0

    def _fifo(self, ordered: Sequence[Request], now: float) -> Batch:
        slots: list[Slot] = []
        tokens = 0
        for r in ordered:
            if len(slots) >= self.max_batch:
                break
            n = self._piece(r)
            if slots and self.max_batch_tokens is not None and tokens + n > self.max_batch_tokens:
                if r.kind != "prefill":
                    continue
                n = self.max_batch_tokens - tokens
                if n <= 0:
                    continue
            slots.append(Slot(r, r.done, n))
            tokens += n
        batch = Batch(slots, now)
        batch.predicted_s = self._predict(batch.shapes)
        return batch

    def wakeup(self, waiting: Sequence[Request], now: float) -> float | None:
        return None


@dataclass
class FifoPolicy(_BasePolicy):
    """Arrival order, as many as fit, whenever the GPU is free."""

    name: str = "fifo"

    def select(self, waiting: Sequence[Request], now: float) -> Batch:
        return self._fifo(sorted(waiting, key=lambda r: (r.arrival, r.rid)), now)


@dataclass
class CentralizedPolicy(FifoPolicy):
    """Continuous batching for the no-drafting baseline: FIFO over decode items and prefill chunks."""

    name: str = "centralized"
    prefill_chunk: int | None = 512
    max_batch_tokens: int | None = 2048


@dataclass
class SledPolicy(_BasePolicy):
    """SLED-style static batching: dispatch a FIFO batch once max_batch are waiting or the oldest waited
    `max_wait_s` (0 makes it plain FIFO). No SLO awareness, no chunking."""

    name: str = "sled"
    max_wait_s: float = 0.01

    def select(self, waiting: Sequence[Request], now: float) -> Batch:
        if not waiting:
            return Batch([], now)
        ordered = sorted(waiting, key=lambda r: (r.arrival, r.rid))
        if len(ordered) < self.max_batch and now < ordered[0].arrival + self.max_wait_s:
            return Batch([], now)
        return self._fifo(ordered, now)

    def wakeup(self, waiting: Sequence[Request], now: float) -> float | None:
        if not waiting:
            return None
        return min(r.arrival for r in waiting) + self.max_wait_s


@dataclass
class _Cand:
    req: Request
    n: int
    shape: ItemShape
    solo: float
    due: float  # time this piece must finish by (deadline − downlink − rest of a chunked prefill)
    slack: float
    forced: bool
    density: float = 0.0
    urgency: float = 0.0  # slack used for ordering; a prefill's is against its pacing schedule

    @property
    def feasible(self) -> bool:
        return self.slack >= 0.0

    @property
    def latest_start(self) -> float:
        return self.due - self.solo


@dataclass
class WispPolicy(_BasePolicy):
    """The WISP scheduler: urgency first, then throughput density, deadline-safe greedy batch growth.

    Order: forced (waited ≥ `starve_s`: nothing starves) → urgent (slack < `urgency_factor` × predicted time of
    a full FIFO batch, least slack first) → hopeless (oldest first, best-effort) → relaxed (by density).
    A piece joins only if the batch still ends by its own due and by every feasible member's due; a cheap
    piece (marginal ≤ `cheap_frac` × solo) may exceed members' dues by `slip_frac` × their budget. Prompts are
    planned `prefill_margin` of their TTFT early and paced. Growth stops after `max_rejects` refusals in a row.
    `counters` tallies refusals by reason and kind. docs/scheduling.md has the exact rules.
    """

    name: str = "wisp"
    prefill_chunk: int | None = 256
    min_chunk: int = 16
    urgency_factor: float = 2.0
    starve_s: float = 2.0
    max_rejects: int = 64  # stop growing after this many candidates in a row did not fit
    prefill_margin: float = 0.1  # plan a prompt's first token this fraction of its TTFT budget early
    cheap_frac: float = 0.25  # an addition is cheap when its marginal time ≤ this × its solo time
    slip_frac: float = 0.2  # cheap additions may push a member this fraction of its budget past its due
    # Hold a small batch up to this long after its oldest arrival while every request has slack to spare:
    # each pass pays the full weight read, so back-to-back passes of a few rounds waste the GPU (and the
    # server's per-pass work) under load. Prompts, urgent or forced work, or a full batch go at once. 0: never.
    hold_s: float = 0.01

    def __post_init__(self) -> None:
        if self.estimator is None:
            self.estimator = VerifyTimeEstimator.default()
        self.counters: Counter[str] = Counter()
        self._hold_until: float | None = None

    # -- per-request figures --
    def _rest_s(self, r: Request, after: int) -> float:
        """Solo time of the prefill pieces still needed after `after` more tokens are done."""
        left = r.remaining - after
        ctx = r.context_len + r.done + after
        total = 0.0
        step = self.prefill_chunk or left
        while left > 0:
            n = min(step, left)
            total += self.estimator.predict_shape(_EMPTY.plus(ItemShape(n, ctx)))
            left -= n
            ctx += n
        return total

    def _cand(self, r: Request, n: int, now: float) -> _Cand:
        est = self.estimator
        key = (r.done, n, est.version)
        memo = r._memo.get("wisp")
        if memo is None or memo[0] != key:  # raw (uncorrected) times only change with the piece or a refit
            shape = r.shape(n)
            raw_solo = est.predict_raw(_EMPTY.plus(shape))
            raw_rest = self._rest_s(r, n) / est.correction if n < r.remaining else 0.0
            memo = (key, shape, raw_solo, raw_rest)
            r._memo["wisp"] = memo
        _, shape, raw_solo, raw_rest = memo
        corr = est.correction
        solo = raw_solo * corr
        due = r.deadline - r.downlink_s - raw_rest * corr
        slack = due - now - solo
        urgency = slack
        if r.kind == "prefill":
            # Plan the first token a margin early (TTFT has slack, estimates have errors), and pace the prompt:
            # piece j of its tokens is *ordered* as if due at the same fraction of the TTFT window, so a long
            # prompt advances steadily instead of being crammed in (and shrunk) at the last moment.
            budget = max(0.0, r.deadline - r.downlink_s - r.arrival)
            due -= self.prefill_margin * budget
            slack = due - now - solo
            pace = r.arrival + (1.0 - self.prefill_margin) * budget * (r.done + n) / max(r.new_tokens, 1)
            urgency = min(slack, pace - now - solo)
        return _Cand(r, n, shape, solo, due, slack, forced=now - r.arrival >= self.starve_s, urgency=urgency)

    def select(self, waiting: Sequence[Request], now: float) -> Batch:
        if not waiting:
            return Batch([], now)
        est = self.estimator
        cands = [self._cand(r, self._piece(r), now) for r in waiting]
        by_arrival = sorted(cands, key=lambda c: (c.req.arrival, c.req.rid))
        horizon = self.urgency_factor * est.predict([c.shape for c in by_arrival[: self.max_batch]])

        forced = [c for c in by_arrival if c.forced]
        rest = [c for c in cands if not c.forced]
        urgent = sorted(
            (c for c in rest if c.feasible and c.urgency < horizon), key=lambda c: (c.urgency, c.req.rid)
        )
        relaxed = [c for c in rest if c.feasible and c.urgency >= horizon]
        hopeless = sorted((c for c in rest if not c.feasible), key=lambda c: (c.req.arrival, c.req.rid))
        # marginal time of joining a running batch (a one-token item stands for it, so this stays O(1))
        base = _EMPTY.plus(ItemShape(1))
        for c in relaxed:
            c.density = (
                c.req.expected_tokens / max(est.predict_marginal(base, c.shape), 1e-9)
                if c.n == c.req.remaining
                else 0.0
            )
        relaxed.sort(key=lambda c: (-c.density, c.slack, c.req.rid))
        order = forced + urgent + hopeless + relaxed
        n_protected = len(forced) + len(urgent)
        self._hold_until = None
        holdable = not forced and not urgent and not hopeless and len(cands) < self.max_batch
        if self.hold_s > 0 and holdable and all(c.req.kind != "prefill" for c in cands):
            # release before anyone's latest start comes within one full pass of now
            until = min(
                by_arrival[0].req.arrival + self.hold_s,
                min(c.latest_start for c in relaxed) - horizon / self.urgency_factor,
            )
            if now < until:
                self._hold_until = until
                self.counters["hold"] += 1
                return Batch([], now)

        # latest start of every feasible request from position i on: what a long batch must not push back
        suffix = [math.inf] * (len(order) + 1)
        for i in range(len(order) - 1, -1, -1):
            c = order[i]
            suffix[i] = min(suffix[i + 1], c.latest_start if c.feasible and not c.forced else math.inf)

        shape = _EMPTY
        slots: list[Slot] = []
        tokens = 0
        member_due = math.inf  # earliest finish deadline among feasible members
        soft_due = math.inf  # earliest (due + tolerance) among them: the limit for cheap additions
        rejects = 0
        for i, c in enumerate(order):
            if len(slots) >= self.max_batch or rejects >= self.max_rejects:
                break
            rejects += 1
            for n in self._sizes(c):
                if slots and self.max_batch_tokens is not None and tokens + n > self.max_batch_tokens:
                    continue
                cc = c if n == c.n else self._cand(c.req, n, now)
                new_shape = shape.plus(cc.shape)
                end = now + est.predict_shape(new_shape)
                if not cc.forced:
                    if cc.feasible and end > cc.due:
                        self.counters["reject_own_" + c.req.kind] += 1
                        continue
                    # A cheap addition (it mostly shares the pass's fixed cost) may push members up to their
                    # tolerance past their due: deferring it would cost it a whole extra pass and the GPU
                    # throughput. An expensive one (prefill chunk, cache miss, long context) must keep every
                    # member on time: that is the interference WISP prevents.
                    prev = now + est.predict_shape(shape)
                    cheap = end - prev <= self.cheap_frac * cc.solo
                    if end > (soft_due if cheap else member_due):
                        self.counters["reject_member_" + c.req.kind] += 1
                        continue
                    if i >= n_protected and end > suffix[i + 1]:
                        self.counters["reject_suffix"] += 1
                        continue
                slots.append(Slot(c.req, c.req.done, n, best_effort=not cc.feasible))
                shape = new_shape
                tokens += n
                rejects = 0
                if cc.feasible and not cc.forced:
                    member_due = min(member_due, cc.due)
                    tol = self.slip_frac * max(0.0, c.req.deadline - c.req.arrival)
                    soft_due = min(soft_due, cc.due + tol)
                break
        if not slots:  # nothing fits its own deadline: serve the head of the order best-effort
            c = order[0]
            slots.append(Slot(c.req, c.req.done, c.n, best_effort=not c.feasible))
            shape = _EMPTY.plus(c.shape)
        return Batch(slots, now, est.predict_shape(shape))

    def wakeup(self, waiting: Sequence[Request], now: float) -> float | None:
        return self._hold_until if waiting else None

    def _sizes(self, c: _Cand) -> list[int]:
        if c.req.kind != "prefill" or not self.prefill_chunk:
            return [c.n]
        sizes: list[int] = []
        n = c.n
        while n >= self.min_chunk or not sizes:
            sizes.append(n)
            n //= 2
        return sizes


POLICIES: dict[str, type] = {
    "fifo": FifoPolicy,
    "sled": SledPolicy,
    "centralized": CentralizedPolicy,
    "wisp": WispPolicy,
}


def make_policy(name: str, estimator: VerifyTimeEstimator | None = None, **kw: Any) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        from wisp_sdk.errors import WispError

        raise WispError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    if estimator is not None:
        kw["estimator"] = estimator
    return cls(**kw)


# ---------------------------------------------------------------- the queue around a policy


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
    """

    def __init__(
        self,
        policy: Policy,
        estimator: VerifyTimeEstimator | None = None,
        learn: bool = True,
        hint_ewma: float = 0.1,
    ) -> None:
        self.policy = policy
        self.estimator = estimator or policy.estimator
        self.learn = learn
        self.waiting: list[Request] = []
        self.stats = SchedulerStats()
        self.hints = WaitHints(self.estimator, hint_ewma)

    def __len__(self) -> int:
        return len(self.waiting)

    def submit(self, req: Request) -> None:
        self.waiting.append(req)

    def cancel(self, session_id: str) -> list[Request]:
        gone = [r for r in self.waiting if r.session_id == session_id]
        self.waiting = [r for r in self.waiting if r.session_id != session_id]
        return gone

    def next_batch(self, now: float) -> Batch | None:
        if not self.waiting:
            return None
        batch = self.policy.select(self.waiting, now)
        if not batch.slots:
            return None
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


class WaitHints:
    """The verdict's `wait_hint_ms`: how long the session's next round is predicted to take at the server.

    hint = max(rest of the running batch, EWMA of verify queue waits) + predicted time of the last batch's
    shape with this item added. Usable on its own by a server that keeps its own queue.
    """

    def __init__(self, estimator: VerifyTimeEstimator, ewma: float = 0.1) -> None:
        self.estimator = estimator
        self.ewma = ewma
        self.queue_s = 0.0
        self.last_shape = _EMPTY
        self.busy_until = 0.0

    def started(self, predicted_s: float, now: float) -> None:
        self.busy_until = now + predicted_s

    def finished(self, shapes: Iterable[ItemShape], now: float) -> None:
        self.last_shape = BatchShape.of(shapes)
        self.busy_until = now

    def queued(self, queue_s: float) -> None:
        """A verify/decode request waited `queue_s` from arrival to its batch."""
        self.queue_s += self.ewma * (queue_s - self.queue_s)

    def hint(self, item: ItemShape, now: float) -> float:
        busy = max(0.0, self.busy_until - now)
        return max(busy, self.queue_s) + self.estimator.predict_shape(self.last_shape.plus(item))


# ---------------------------------------------------------------- admission control


@dataclass
class SessionLoad:
    """What admission needs to know about a session's steady-state demand."""

    session_id: str
    tpot_s: float
    draft_len: int = 4
    context_len: int = 256
    alpha: float | None = None  # per-token acceptance (None: like the others)
    think_s: float | None = None  # device time per round: draft + network (None: like the others)
    ttft_s: float = math.inf
    prompt_len: int = 0


@dataclass
class AdmissionDecision:
    admit: bool
    attainment: float  # predicted fraction of admitted sessions (with the candidate) meeting their TPOT SLO
    reason: str = ""


@dataclass
class AdmissionController:
    """Refuse a new session when the estimator predicts it pushes admitted sessions' attainment below target.

    Steady-state model (docs/scheduling.md, "Admission"): one round per session per cycle; the GPU serves all n
    rounds in ceil(n / max_batch) batches taking G seconds in all (T_b each on average). Session i's cycle is
    max(think_i + 1.5·T_b, G) (its draft and network time, half a batch of queueing on average, its own batch;
    and never faster than the GPU can rotate through everyone). It meets its SLO when
    cycle_i ≤ tpot_i · E(k_i, α_i). The candidate's first token must also fit: G + its prefill ≤ ttft.
    """

    estimator: VerifyTimeEstimator
    target: float = 0.9
    max_batch: int = 64
    default_think_s: float = 0.05
    default_alpha: float = 0.7

    def _profiles(self, loads: Sequence[SessionLoad]) -> list[SessionLoad]:
        """Each load with its think time, draft length and α filled in.

        A speculative session not measured yet (no round, or no verdict) is taken to behave like the median
        measured one, as a whole: its draft length goes with its device time (mixing one session's draft length
        with another's device time mispredicts both).
        """
        known = sorted(
            (s for s in loads if s.think_s is not None and s.alpha is not None and s.draft_len > 0),
            key=lambda s: s.think_s or 0.0,
        )
        rep = known[len(known) // 2] if known else None
        out = []
        for s in loads:
            if s.think_s is not None and (s.alpha is not None or s.draft_len == 0):
                out.append(replace(s, alpha=s.alpha if s.alpha is not None else self.default_alpha))
            elif rep is not None and s.draft_len > 0:
                out.append(replace(s, think_s=rep.think_s, draft_len=rep.draft_len, alpha=rep.alpha))
            else:
                think = s.think_s if s.think_s is not None else self.default_think_s
                out.append(
                    replace(s, think_s=think, alpha=s.alpha if s.alpha is not None else self.default_alpha)
                )
        return out

    def gpu_rotation(self, loads: Sequence[SessionLoad]) -> tuple[float, float]:
        """(G, T_b): GPU seconds to verify one round of every session, and the mean batch time."""
        if not loads:
            return 0.0, 0.0
        shapes = sorted((ItemShape(s.draft_len + 1, s.context_len) for s in loads), key=lambda x: x.context)
        groups = [shapes[i : i + self.max_batch] for i in range(0, len(shapes), self.max_batch)]
        g = sum(self.estimator.predict(grp) for grp in groups)
        return g, g / len(groups)

    def predict_attainment(self, loads: Sequence[SessionLoad]) -> float:
        if not loads:
            return 1.0
        loads = self._profiles(loads)
        g, tb = self.gpu_rotation(loads)
        ok = 0
        for s in loads:
            cycle = max((s.think_s or 0.0) + 1.5 * tb, g)
            ok += cycle <= s.tpot_s * expected_committed(s.draft_len, s.alpha or 0.0)
        return ok / len(loads)

    def admit(self, candidate: SessionLoad, active: Sequence[SessionLoad]) -> AdmissionDecision:
        loads = [*active, candidate]
        att = self.predict_attainment(loads)
        if att < self.target:
            profiles = self._profiles(loads)
            g, _ = self.gpu_rotation(profiles)
            thinks = sorted(s.think_s or 0.0 for s in profiles)
            return AdmissionDecision(
                False,
                att,
                f"predicted SLO attainment {att:.0%} < target {self.target:.0%} ({len(loads)} sessions, GPU "
                f"rotation {g * 1000:.0f} ms, median device time per round {thinks[len(thinks) // 2] * 1000:.0f} ms)",
            )
        if candidate.prompt_len:
            g, _ = self.gpu_rotation(self._profiles(active))
            prefill = self.estimator.predict([ItemShape(candidate.prompt_len, 0)])
            if g + prefill > candidate.ttft_s:
                return AdmissionDecision(
                    False, att, f"first token predicted in {g + prefill:.3f}s > TTFT SLO"
                )
        return AdmissionDecision(True, att)
