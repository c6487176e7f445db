"""Batch policies: which waiting requests go into the next forward pass.

Policies (docs/scheduling.md):
  fifo         arrival order up to max_batch (prefill in one piece), work-conserving.
  sled         static batching: waits until max_batch requests are queued or the oldest waited max_wait_s,
               then FIFO; no SLO awareness, no chunking.
  centralized  continuous batching of decode steps (the server queues one decode item per active session per
               step): FIFO over items, long prompts prefilled in chunks under a token budget that leaves room
               for the decodes.
  wisp         SLO-aware: urgent requests (least slack) first, then late ones (best-effort), then the rest by
               throughput density; a piece is added only while the predicted batch time keeps every member
               (and every request left waiting) within its deadline; cheap pieces may push members by a small
               tolerance; long prompts paced and in adaptive chunks; aging against starvation. With `fill`
               (docs/scheduling.md §10, sched/fill.py): every ready decode item of a server-decoded session
               rides the batch right after the urgent work (a decode adds ~nothing to a step that pays the
               weight read anyway), and a small batch waits for rounds the server knows are on their way while
               that serves more items per GPU second and keeps every member within its deadline.

Pure and clock-injected (no asyncio, no torch): the engine and `wisp simulate` drive the same classes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from wisp_cloud.estimator import BatchShape, ItemShape, VerifyTimeEstimator
from wisp_cloud.sched.fill import fill_hold
from wisp_cloud.sched.requests import Batch, Request, Slot

if TYPE_CHECKING:
    from wisp_cloud.sched.regime import Regime

_EMPTY = BatchShape()
_ONE = _EMPTY.plus(ItemShape(1))  # a running batch's stand-in when pricing a join


def _by_arrival(waiting: Sequence[Request]) -> list[Request]:
    return sorted(waiting, key=lambda r: (r.arrival, r.rid))


@dataclass
class Policy:
    """Picks one batch from the waiting requests. The base class is FIFO-free: subclasses define `select`; every
    other hook has a no-op default, so the engine and the simulator call them unconditionally.
    """

    estimator: VerifyTimeEstimator = field(default_factory=VerifyTimeEstimator.default)
    max_batch: int = 64
    max_batch_tokens: int | None = None  # cap on Σ new tokens of a batch (memory); None = no cap
    prefill_chunk: int | None = None  # prefill piece size; None = whole prompt in one pass
    name: str = "base"
    counters: Counter[str] = field(default_factory=Counter, init=False, repr=False)

    def select(self, waiting: Sequence[Request], now: float) -> Batch:
        """The next batch from `waiting` (not modified). An empty batch means: wait until `wakeup`."""
        raise NotImplementedError

    def rank(self, waiting: Sequence[Request], now: float) -> list[Request]:
        """The policy's preference order over `waiting` (fair sharing keeps it within a tenant): arrival."""
        return _by_arrival(waiting)

    def _piece(self, r: Request) -> int:
        if r.kind == "prefill" and self.prefill_chunk:
            return min(r.remaining, self.prefill_chunk)
        return r.remaining

    def _predict(self, shapes: Iterable[ItemShape]) -> float:
        return self.estimator.predict(shapes)

    def _fifo(self, ordered: Sequence[Request], now: float, max_tokens: int | None = None) -> Batch:
        """Arrival order up to max_batch, and up to `max_tokens` new tokens (default `max_batch_tokens`).

        Under the token cap, prompt pieces leave room for the running sessions' steps (decodes, rounds) that
        hold a place in arrival order: H200 run 37 (7B, 640 devices), four 512-token prompt chunks ahead of
        younger decodes filled the 2048-token cap, and centralized left 12-260 decodes a step waiting a whole
        step (TPOT p50 50-58 ms on 33 ms steps). Places stay in arrival order: run 39 put every decode first,
        and past 512 running sessions no prompt got a place (attainment 0.12 at 720 devices, TTFT)."""
        cap = self.max_batch_tokens if max_tokens is None else max_tokens
        reserved = 0  # tokens of the running sessions' steps among the places not yet filled
        if cap is not None:
            reserved = sum(r.remaining for r in ordered[: self.max_batch] if r.kind != "prefill")
        slots: list[Slot] = []
        tokens = 0
        for i, r in enumerate(ordered):
            if len(slots) >= self.max_batch:
                break
            n = self._piece(r)
            if i < self.max_batch and r.kind != "prefill":
                reserved -= n
            if slots and cap is not None and tokens + n > cap - (reserved if r.kind == "prefill" else 0):
                if r.kind != "prefill":
                    continue
                n = cap - tokens - reserved
                if n <= 0:
                    continue
            slots.append(Slot(r, r.done, n))
            tokens += n
        batch = Batch(slots, now)
        batch.predicted_s = self._predict(batch.shapes)
        return batch

    def wakeup(self, waiting: Sequence[Request], now: float) -> float | None:
        """When `select` may return something after returning an empty batch (None: on the next arrival)."""
        return None

    def expect(self, arrivals: Sequence[float]) -> None:
        """Times (sorted) at which rounds announced to the scheduler are expected; called before `select`."""

    def follow(self, regime: Regime) -> None:
        """The server's regime (sched/regime.py), whose current mode `select` may read."""


@dataclass
class FifoPolicy(Policy):
    """Arrival order, as many as fit, whenever the GPU is free."""

    name: str = "fifo"

    def select(self, waiting: Sequence[Request], now: float) -> Batch:
        return self._fifo(_by_arrival(waiting), now)


CENTRALIZED_BATCH_TOKENS = 2048  # the centralized policy's cap on Σ new tokens per step


@dataclass
class CentralizedPolicy(FifoPolicy):
    """Continuous batching for the no-drafting baseline: decode items and prefill chunks in arrival order under
    the token cap, the chunks leaving room for the decodes (`Policy._fifo`)."""

    name: str = "centralized"
    prefill_chunk: int | None = 512
    max_batch_tokens: int | None = CENTRALIZED_BATCH_TOKENS


@dataclass
class SledPolicy(Policy):
    """SLED-style static batching: dispatch a FIFO batch once max_batch are waiting or the oldest waited
    `max_wait_s` (0 makes it plain FIFO). No SLO awareness, no chunking."""

    name: str = "sled"
    max_wait_s: float = 0.01

    def select(self, waiting: Sequence[Request], now: float) -> Batch:
        if not waiting:
            return Batch([], now)
        ordered = _by_arrival(waiting)
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
    urgency: float = 0.0
    marginal: float = 0.0  # predicted extra time of joining a running batch  # slack used for ordering; a prefill's is against its pacing schedule

    @property
    def feasible(self) -> bool:
        return self.slack >= 0.0

    @property
    def latest_start(self) -> float:
        return self.due - self.solo


@dataclass
class _Order:
    order: list[_Cand]
    n_protected: int  # forced + urgent at the head of `order`
    horizon: float
    by_arrival: list[_Cand]
    relaxed: list[_Cand]


@dataclass
class WispPolicy(Policy):
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
    # Pace a prompt no slower than this many tokens per TTFT window: a short prompt is due soon after it
    # arrives, not at the end of its window. Measured on an H200 (7B, TPOT 60, ShareGPT, 544-640 devices,
    # session 9): pacing every prompt over the whole window gave WISP a TTFT p50 of 0.6-1.4 s (centralized and
    # SLED 0.1-0.3 s), so each device ran fewer sessions and, at 640, 16 % of them missed the 2 s TTFT.
    pace_tokens: int = CENTRALIZED_BATCH_TOKENS
    cheap_frac: float = 0.25  # an addition is cheap when its marginal time ≤ this × its solo time
    slip_frac: float = 0.2  # cheap additions may push a member this fraction of its budget past its due
    # Hold a small batch up to this long after its oldest arrival while every request has slack to spare:
    # each pass pays the full weight read, so back-to-back passes of a few rounds waste the GPU (and the
    # server's per-pass work) under load. Prompts, urgent or forced work, or a full batch go at once. 0: never.
    hold_s: float = 0.01
    # Fill the weight read (docs/scheduling.md §10): decode items ride every batch together, and a small batch
    # waits (beyond hold_s, or with urgent work that hold_s never holds) for announced rounds when the estimator
    # says that serves more rounds per GPU second and no member misses its deadline.
    fill: bool = True
    # True (`--refuse`): a round or decode is left out when joining would push a member past its deadline. Off by
    # default: rounds and decodes always join (up to max_batch and max_batch_tokens), only prompt pieces are
    # checked. A round left out waits a whole step (at 32B ≈ 19 ms of weight read), far more than the ≈ 0.5 ms it
    # would add to the members' step (ServerConfig.refuse has the measurement).
    refuse: bool = False
    # False (the regime, sched/regime.py): prompt pieces need not keep decodes on time, as under centralized
    # serving. Simulated (32B, TPOT 30, 48-96 devices, every session decoded): protecting decodes held prompts
    # back to a 0.5-2 s TTFT.
    protect_decodes: bool = True

    def __post_init__(self) -> None:
        self._hold_until: float | None = None
        self._arrivals: Sequence[float] = ()
        self._regime: Regime | None = None
        self._raw_memo: dict[tuple[int, int, bool], tuple[float, float]] = {}
        self._raw_version = -1
        self._raw_one = 0.0

    def expect(self, arrivals: Sequence[float]) -> None:
        self._arrivals = arrivals

    def follow(self, regime: Regime) -> None:
        self._regime = regime

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

    def _raw_times(self, shape: ItemShape) -> tuple[float, float]:
        """Raw (uncorrected) solo time of an item, and its marginal time of joining a running batch (a one-token
        item stands for the batch): density's divisor. Shared by items of one size whose contexts differ by less
        than `CONTEXT_BUCKET` tokens, until the next refit: a round is a new request every step, so a per-request
        memo never hits, and three predictions per waiting round were most of `select`'s host time."""
        est = self.estimator
        if est.version != self._raw_version:
            self._raw_memo.clear()
            self._raw_version = est.version
            self._raw_one = est.predict_raw(_ONE)
        key = shape.bucket()
        times = self._raw_memo.get(key)
        if times is None:
            times = (est.predict_raw(_EMPTY.plus(shape)), est.predict_raw(_ONE.plus(shape)) - self._raw_one)
            self._raw_memo[key] = times
        return times

    def _cand(self, r: Request, n: int, now: float) -> _Cand:
        est = self.estimator
        key = (r.done, n, est.version)
        memo = r.wisp_memo
        if memo is None or memo[0] != key:  # raw (uncorrected) times only change with the piece or a refit
            shape = r.shape(n)
            raw_solo, raw_marginal = self._raw_times(shape)
            raw_rest = self._rest_s(r, n) / est.correction if n < r.remaining else 0.0
            memo = (key, shape, raw_solo, raw_rest, raw_marginal)
            r.wisp_memo = memo
        _, shape, raw_solo, raw_rest, raw_marginal = memo
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
            pace = r.arrival + (1.0 - self.prefill_margin) * budget * (r.done + n) / max(
                r.new_tokens, self.pace_tokens
            )
            urgency = min(slack, pace - now - solo)
        forced = now - r.arrival >= self.starve_s
        r.solo_s, r.marginal_s = solo, raw_marginal * corr
        return _Cand(r, n, shape, solo, due, slack, forced, urgency=urgency, marginal=raw_marginal * corr)

    def _order(self, cands: list[_Cand], now: float) -> _Order:
        """forced → urgent → hopeless → relaxed (docs/scheduling.md)."""
        by_arrival = sorted(cands, key=lambda c: (c.req.arrival, c.req.rid))
        horizon = self.urgency_factor * self.estimator.predict(
            [c.shape for c in by_arrival[: self.max_batch]]
        )
        forced = [c for c in by_arrival if c.forced]
        rest = [c for c in cands if not c.forced]
        # A prompt behind its pace is urgent, but ordered by its real slack: behind pace is not behind its TTFT,
        # and a round due sooner goes first.
        urgent = sorted(
            (c for c in rest if c.feasible and c.urgency < horizon), key=lambda c: (c.slack, c.req.rid)
        )
        relaxed = [c for c in rest if c.feasible and c.urgency >= horizon]
        hopeless = sorted((c for c in rest if not c.feasible), key=lambda c: (c.req.arrival, c.req.rid))
        for c in relaxed:
            c.density = c.req.expected_tokens / max(c.marginal, 1e-9) if c.n == c.req.remaining else 0.0
        relaxed.sort(key=lambda c: (-c.density, c.slack, c.req.rid))
        return _Order(
            forced + urgent + hopeless + relaxed, len(forced) + len(urgent), horizon, by_arrival, relaxed
        )

    def rank(self, waiting: Sequence[Request], now: float) -> list[Request]:
        return [c.req for c in self._order([self._cand(r, self._piece(r), now) for r in waiting], now).order]

    def select(self, waiting: Sequence[Request], now: float) -> Batch:
        if not waiting:
            return Batch([], now)
        regime = self._regime
        if (regime is not None and regime.mode == "centralized") or (
            not self.protect_decodes and all(r.kind != "verify" for r in waiting)
        ):
            # The centralized regime (sched/regime.py), or no round waiting under it: batch exactly as the
            # centralized policy does, FIFO (the probes' rounds too) under its token cap. Measured on an H200:
            # WISP's priced path cost 1.6-1.9x centralized's host time per step at 130-250 decodes (run 21), and
            # without the cap new sessions' prompt pieces stretched the decodes' steps (run 24, 7B, TPOT 30:
            # 512 new tokens a step against centralized's 364, step p50 27 against 22 ms, 0.79x its capacity).
            self.counters["fifo"] += 1
            return self._fifo(_by_arrival(waiting), now, CENTRALIZED_BATCH_TOKENS)
        est = self.estimator
        cands = [self._cand(r, self._piece(r), now) for r in waiting]
        plan = self._order(cands, now)
        order, n_protected, horizon, by_arrival, relaxed = (
            plan.order,
            plan.n_protected,
            plan.horizon,
            plan.by_arrival,
            plan.relaxed,
        )
        self._hold_until = None
        if self.fill:
            order, n_protected = self._gang(order, n_protected)
        # Only rounds wait for company: a decode of a server-decoded session is due every step (as under the
        # centralized policy), and every hold would add to each of its tokens' time (simulated: TPOT p50 34 -> 46 ms)
        decoding = any(c.req.kind == "decode" for c in cands)
        holdable = len(relaxed) == len(cands) < self.max_batch and not decoding
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
        if self.fill and not decoding and self._fill_hold(cands, now):
            return Batch([], now)  # past hold_s (or urgent work): announced company

        # latest start of every feasible request from position i on: what a long batch must not push back
        suffix = [math.inf] * (len(order) + 1)
        for i in range(len(order) - 1, -1, -1):
            c = order[i]
            suffix[i] = min(suffix[i + 1], c.latest_start if self._protected(c) else math.inf)

        shape = _EMPTY
        # When the batch grown so far would finish; None until a check needs it: rounds and decodes join
        # unchecked (unless `refuse`), and a prediction per joining item was most of this loop's host time.
        shape_end: float | None = now
        slots: list[Slot] = []
        tokens = 0
        # Prompt tokens only: the cap on late prompts a step. Counting the rounds' tokens too left no room for a
        # prompt behind a few hundred rounds, and it waited to be forced at starve_s (H200 run 29: 7B, TPOT 60,
        # 608 devices, 13 % of sessions over the 2 s TTFT).
        prompt_tokens = 0
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
                end: float | None = None
                # A prompt piece that is urgent (the protected head) or already past its planned due joins like a
                # forced one: a member pushed a few ms costs its session's mean TPOT little, a missed TTFT fails
                # the session. Measured on an H200 (run 26, 7B, TPOT 60, 544 devices): refused behind members,
                # prompts waited until aging forced them in at starve_s (2 s): TTFT p50 1.8 s, 28 % of sessions
                # over the 2 s TTFT. (`refuse` keeps every member's deadline strictly, prompts included.) Up to the
                # centralized policy's token cap a step: a burst of late prompts must not make one giant step.
                urgent_prompt = (
                    c.req.kind == "prefill"
                    and (i < n_protected or not cc.feasible)
                    and not self.refuse
                    and prompt_tokens + n <= CENTRALIZED_BATCH_TOKENS
                )
                if not cc.forced and not urgent_prompt and (self.refuse or c.req.kind == "prefill"):
                    if shape_end is None:
                        shape_end = now + est.predict_shape(shape)
                    end = now + est.predict_shape(new_shape)
                    if cc.feasible and end > cc.due:
                        self.counters["reject_own_" + c.req.kind] += 1
                        continue
                    # A cheap addition (it mostly shares the pass's fixed cost) may push members up to their
                    # tolerance past their due: deferring it would cost it a whole extra pass and the GPU
                    # throughput. An expensive one (prefill chunk, cache miss, long context) must keep every
                    # member on time: that is the interference WISP prevents.
                    cheap = end - shape_end <= self.cheap_frac * cc.solo
                    if end > (soft_due if cheap else member_due):
                        self.counters["reject_member_" + c.req.kind] += 1
                        continue
                    if i >= n_protected and end > suffix[i + 1]:
                        self.counters["reject_suffix"] += 1
                        continue
                slots.append(Slot(c.req, c.req.done, n, best_effort=not cc.feasible))
                shape, shape_end = new_shape, end
                tokens += n
                if c.req.kind == "prefill":
                    prompt_tokens += n
                rejects = 0
                if self._protected(cc):
                    member_due = min(member_due, cc.due)
                    tol = self.slip_frac * max(0.0, c.req.deadline - c.req.arrival)
                    soft_due = min(soft_due, cc.due + tol)
                break
        if not slots:  # nothing fits its own deadline: serve the head of the order best-effort
            c = order[0]
            slots.append(Slot(c.req, c.req.done, c.n, best_effort=not c.feasible))
            shape = _EMPTY.plus(c.shape)
        return Batch(slots, now, est.predict_shape(shape))

    def _protected(self, c: _Cand) -> bool:
        """Must a batch keep this member's due? Not a forced or hopeless one, nor a decode in the regime."""
        return c.feasible and not c.forced and (self.protect_decodes or c.req.kind != "decode")

    def wakeup(self, waiting: Sequence[Request], now: float) -> float | None:
        return self._hold_until if waiting else None

    def _fill_hold(self, cands: list[_Cand], now: float) -> bool:
        """Hold the whole queue for announced rounds (sched/fill.py) when all of it fits one batch, nothing is
        a prompt piece, starved or already late, and waiting serves more rounds per GPU second."""
        if not self._arrivals or len(cands) >= self.max_batch:
            return False
        if any(c.req.kind == "prefill" or c.forced or not c.feasible for c in cands):
            return False
        shape = BatchShape.of(c.shape for c in cands)
        if self.max_batch_tokens is not None and shape.new_tokens >= self.max_batch_tokens:
            return False
        item = max((c for c in cands), key=lambda c: c.marginal).shape
        hold = fill_hold(
            self.estimator,
            shape,
            item,
            now,
            self._arrivals,
            oldest=min(c.req.arrival for c in cands),
            due=min(c.due for c in cands),
        )
        if hold is None:
            return False
        self._hold_until = hold.until
        self.counters["fill_hold"] += 1
        return True

    @staticmethod
    def _gang(order: list[_Cand], n_protected: int) -> tuple[list[_Cand], int]:
        """Every waiting decode item right after the forced and urgent work, in one gang (as the centralized
        policy steps them), ahead of late and relaxed rounds: one token on a step that pays the weight read
        anyway costs next to nothing, while a decode left out waits a whole step. Urgent decodes keep their
        place; the gang counts as protected (no check against later requests' latest starts)."""
        gang = [c for c in order[n_protected:] if c.req.kind == "decode"]
        if not gang:
            return order, n_protected
        rest = [c for c in order[n_protected:] if c.req.kind != "decode"]
        return order[:n_protected] + gang + rest, n_protected + len(gang)

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
