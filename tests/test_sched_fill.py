"""Filling the weight read (sched/fill.py, WispPolicy.fill; docs/scheduling.md §10), on a fake clock.

The GPU is a 32B-like cost: a 19 ms fixed cost per step, 0.1 ms per item and 0.07 ms per token, so a k=4 round
adds 0.45 ms to a step and a decode 0.17 ms. The hold tests set `hold_s=0` (the blind 10 ms hold of relaxed
batches, which fill keeps) to see the announced-arrival rule alone.
"""

from __future__ import annotations

import pytest
from test_sched_sim import linear_estimator, verify
from wisp_cloud.estimator import BatchShape, ItemShape
from wisp_cloud.sched import Request, Scheduler, WispPolicy
from wisp_cloud.sched.fill import fill_hold, fixed_cost

GPU = linear_estimator(const=0.019, per_item=0.0001, per_token=0.00007)
W = fixed_cost(GPU)


def decode(sid: str, arrival: float, deadline_in: float) -> Request:
    return Request(sid, "decode", 1, 300, deadline=arrival + deadline_in, arrival=arrival)


def test_fixed_cost_is_one_short_step():
    assert pytest.approx(0.019 + 0.0001 + 0.00007) == W


def test_decode_items_ride_one_batch_together():
    """Relaxed rounds (denser: 3 tokens for 0.45 ms) fill a small max_batch ahead of server-decoded sessions'
    decodes; with fill every decode goes in the same step (one token each on a step that reads the weights
    anyway), the rounds after them."""
    waiting = [verify(f"v{i}", 0.0, 0.3) for i in range(6)] + [decode(f"d{i}", 0.0, 0.3) for i in range(3)]
    old = WispPolicy(GPU, max_batch=6, fill=False, hold_s=0.0).select(waiting, 0.0)
    assert sum(r.kind == "decode" for r in old.requests) == 0  # today's density order leaves them all out
    new = WispPolicy(GPU, max_batch=6, hold_s=0.0).select(waiting, 0.0)
    assert sum(r.kind == "decode" for r in new.requests) == 3
    assert len(new) == 6


def test_urgent_rounds_keep_their_place_ahead_of_the_decode_gang():
    """Urgent rounds are checked first: the gang never pushes one out of its step."""
    waiting = [verify(f"u{i}", 0.0, 0.03) for i in range(4)] + [decode(f"d{i}", 0.0, 0.3) for i in range(3)]
    batch = WispPolicy(GPU, max_batch=6, hold_s=0.0).select(waiting, 0.0)
    assert [r.session_id for r in batch.requests[:4]] == ["u0", "u1", "u2", "u3"]
    assert sum(r.kind == "decode" for r in batch.requests) == 2
    assert all(batch.predicted_s <= r.deadline for r in batch.requests)


def test_small_batch_waits_for_announced_rounds():
    """Three rounds wait; three more are announced within one fixed cost: one step for six serves more rounds
    per GPU second than a step now and another later, and nobody's deadline is near."""
    pol = WispPolicy(GPU, max_batch=64, hold_s=0.0)
    sched = Scheduler(pol, learn=False)
    for i in range(3):
        sched.submit(verify(f"s{i}", 0.0, 0.2))
    for i, at in enumerate((0.004, 0.005, 0.006)):
        sched.announce(f"a{i}", at)
    assert sched.next_batch(0.001) is None
    assert sched.wakeup(0.001) == pytest.approx(0.006)
    assert pol.counters["fill_hold"] == 1
    for i, at in enumerate((0.004, 0.005, 0.006)):
        sched.submit(verify(f"a{i}", at, 0.2))
    assert not sched.announced  # an announced round that arrived is no longer expected
    batch = sched.next_batch(0.006)
    assert batch is not None and len(batch) == 6


def test_no_hold_without_announcements():
    """Nothing announced: the batch goes at once."""
    pol = WispPolicy(GPU, max_batch=64, hold_s=0.0)
    sched = Scheduler(pol, learn=False)
    for i in range(3):
        sched.submit(verify(f"s{i}", 0.0, 0.2))
    batch = sched.next_batch(0.001)
    assert batch is not None and len(batch) == 3


def test_no_hold_when_a_deadline_is_at_risk():
    """The same announcements, but one member is due 22 ms from now: waiting even for the first arrival would
    end its step at 24.8 ms. It runs now."""
    pol = WispPolicy(GPU, max_batch=64, hold_s=0.0)
    sched = Scheduler(pol, learn=False)
    sched.submit(verify("tight", 0.0, 0.022))
    for i in range(2):
        sched.submit(verify(f"s{i}", 0.0, 0.2))
    for i, at in enumerate((0.004, 0.005, 0.006)):
        sched.announce(f"a{i}", at)
    batch = sched.next_batch(0.001)
    assert batch is not None and len(batch) == 3
    assert batch.predicted_s + 0.001 <= 0.022


def test_hold_only_when_it_serves_more_per_gpu_second():
    """Ten rounds wait and one is announced 17 ms out: (10 + 1) rounds over 17 ms idle + a step is a worse rate
    than ten now, so the batch goes."""
    pol = WispPolicy(GPU, max_batch=64, hold_s=0.0)
    sched = Scheduler(pol, learn=False)
    for i in range(10):
        sched.submit(verify(f"s{i}", 0.0, 0.2))
    sched.announce("late", 0.017)
    batch = sched.next_batch(0.0)
    assert batch is not None and len(batch) == 10


def test_urgent_work_waits_for_announced_company_when_its_deadline_allows():
    """A round 45 ms from its deadline is urgent (hold_s never holds it), but three rounds announced within 5 ms
    fit before its deadline: fill holds; without fill it runs alone."""
    waiting = [verify("u", 0.0, 0.045), verify("s", 0.0, 0.2)]
    arrivals = [0.004, 0.005, 0.006]
    pol = WispPolicy(GPU, max_batch=64)
    pol.expect(arrivals)
    assert not pol.select(waiting, 0.001).slots
    assert pol.wakeup(waiting, 0.001) == pytest.approx(0.006)
    old = WispPolicy(GPU, max_batch=64, fill=False)
    old.expect(arrivals)
    assert len(old.select(waiting, 0.001)) == 2


def test_overdue_announcements_are_forgotten():
    """A device that does not send its announced round holds nobody once the announced time has passed."""
    pol = WispPolicy(GPU, max_batch=64, hold_s=0.0)
    sched = Scheduler(pol, learn=False)
    sched.submit(verify("s0", 0.0, 0.2))
    sched.announce("silent", 0.003)
    assert sched.next_batch(0.001) is None  # one arrival doubles a one-round step: worth 2 ms of waiting
    batch = sched.next_batch(0.0031)
    assert batch is not None and len(batch) == 1
    assert not sched.announced


def test_hold_is_bounded_by_one_fixed_cost():
    """Arrivals announced further than w from the oldest waiting round are not waited for."""
    shape = BatchShape.of([ItemShape(5, 200)])
    assert fill_hold(GPU, shape, ItemShape(5, 200), 0.0, [W * 1.01], oldest=0.0, due=1.0) is None
    hold = fill_hold(GPU, shape, ItemShape(5, 200), 0.0, [W * 0.5], oldest=0.0, due=1.0)
    assert hold is not None and hold.joins == 1 and hold.rate_gain > 1.0
    # the same arrival, but the round has already waited most of w
    assert fill_hold(GPU, shape, ItemShape(5, 200), 0.015, [0.015 + W * 0.5], oldest=0.0, due=1.0) is None


def test_prompts_and_late_work_are_never_held():
    pol = WispPolicy(GPU, max_batch=64, hold_s=0.0)
    sched = Scheduler(pol, learn=False)
    sched.submit(verify("late", 0.0, 0.01))  # cannot make its deadline any more
    sched.submit(verify("s0", 0.0, 0.2))
    sched.announce("a", 0.004)
    batch = sched.next_batch(0.001)
    assert batch is not None and len(batch) == 2
    sched.submit(Request("p", "prefill", 64, 0, deadline=2.0, arrival=0.01))
    sched.announce("b", 0.014)
    batch = sched.next_batch(0.011)
    assert batch is not None and batch.requests[0].session_id == "p"
