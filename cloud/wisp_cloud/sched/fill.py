"""Filling the weight read: how long a small batch waits for rounds the server knows are on their way.

Cost model, all from the verify-time estimator (docs/scheduling.md §10). A step of items S costs

    t(S) = w + Σ_i m_i,   w = t(one one-token item)   (the fixed cost: the weight read and the launches)
                          m_i = t(S + i) − t(S)         (what item i adds: its tokens, context, bookkeeping)

On a 32B model on an H200 w ≈ 19 ms and a k=4 verify adds ≈ 0.4 ms, so a step of 5 rounds and one of 50 take
nearly the same time: back-to-back small steps spend the GPU on weight reads.

**Hold.** Given the batch B the policy would run now (n items, t(B)) and the times a_1 ≤ a_2 ≤ … at which
announced rounds are expected (a verdict went out; the session's measured device time says when its next round
arrives), waiting until a_j to run B with the j rounds announced in (now, a_j] serves

    rate_j = (n + j) / ((a_j − now) + t(B + j rounds))     items per GPU second (the idle wait counted)

against rate_0 = n / t(B) for running B now. The policy holds until the a_j with the best rate when it beats
rate_0 (to first order: when a_j − now < w · j / n, i.e. the arrivals come faster than B's own rate), subject to

- a_j − now ≤ w and a_j − (B's oldest arrival) ≤ w: no request waits more than one fixed cost for company;
- a_j + t(B + j rounds) ≤ the earliest due of B's members: nobody misses its deadline by waiting.

An announced round is priced as B's largest item (its deadline check errs on the safe side). A round that does
not come on time is dropped from the announcements once its time has passed, so a silent device holds nobody
for longer than w.

Pure (no clock, no asyncio): `WispPolicy` calls it with the estimator and the announcements `Scheduler` keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from wisp_cloud.estimator import BatchShape, ItemShape, VerifyTimeEstimator

_ONE = BatchShape().plus(ItemShape(1))


@dataclass(frozen=True)
class FillHold:
    """Hold the batch until `until`, when `joins` announced rounds are expected to have arrived."""

    until: float
    joins: int
    rate_gain: float  # rate_j / rate_0 (> 1)


def fixed_cost(est: VerifyTimeEstimator) -> float:
    """w: the predicted time of a step holding one one-token item (weight read, launches, per-step host work)."""
    return est.predict_shape(_ONE)


def fill_hold(
    est: VerifyTimeEstimator,
    shape: BatchShape,
    item: ItemShape,
    now: float,
    arrivals: Sequence[float],
    oldest: float,
    due: float,
) -> FillHold | None:
    """The hold that serves most items per GPU second, or None to run `shape` now.

    shape: the batch the policy would run now; item: the shape an announced round is priced as; arrivals:
    announced round times, sorted; oldest: the earliest arrival in the batch; due: its members' earliest due.
    """
    n = shape.batch_size
    t_now = est.predict_shape(shape)
    if n == 0 or t_now <= 0.0:
        return None
    w = fixed_cost(est)
    limit = min(now + w, oldest + w)
    best_rate = n / t_now
    rate_0 = best_rate
    best: FillHold | None = None
    grown = shape
    joins = 0
    for a in arrivals:
        if a <= now:
            continue  # late: it may never come
        if a > limit:
            break
        grown = grown.plus(item)
        joins += 1
        t = est.predict_shape(grown)
        if a + t > due:
            break
        rate = (n + joins) / ((a - now) + t)
        if rate > best_rate:
            best_rate = rate
            best = FillHold(a, joins, rate / rate_0)
    return best
