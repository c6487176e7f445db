"""Deterministic scheduler tests on a fake clock with a known estimator (tests/test_sched_sim.py drives them).

The interference tests are built so that they fail if `wisp` is replaced by FIFO: each also runs FIFO/SLED on
the same arrivals and checks that the baseline *does* miss.
"""

from __future__ import annotations

import pytest
from test_sched_sim import linear_estimator, prefill, simulate, verify
from wisp_cloud.sched import (
    CentralizedPolicy,
    FifoPolicy,
    Request,
    Scheduler,
    SledPolicy,
    WispPolicy,
    make_policy,
)

GPU = linear_estimator(const=0.005, per_item=0.0005, per_token=0.0002)


def wave_workload(prompt: int = 4000, sessions: int = 8, period: float = 0.04, until: float = 1.5):
    """8 sessions each send a k=4 verify every 40 ms (deadline 100 ms); a 4000-token prompt lands at 5 ms."""
    reqs = [prefill("long", 0.005, prompt, ttft=3.0)]
    t = 0.0
    n = 0
    while t < until:
        for s in range(sessions):
            reqs.append(verify(f"v{s}-{n}", t + 0.0003 * s, 0.1))
        t += period
        n += 1
    return reqs


@pytest.mark.parametrize("name", ["wisp", "fifo", "sled"])
def test_long_prefill_vs_short_verifies(name):
    policy = make_policy(name, GPU, max_batch=16)
    trace = simulate(policy, wave_workload(), GPU)
    verifies = trace.by_session("v")
    assert len(verifies) == 8 * 38 and len(trace.by_session("long")) == 1
    if name == "wisp":
        assert trace.misses("v") == 0, "a long prefill pushed short verifications past their deadline"
        assert trace.misses("long") == 0, "the chunked prefill missed its TTFT"
        pieces = [s.n_tokens for _, b in trace.batches for s in b.slots if s.request.session_id == "long"]
        assert sum(pieces) == 4000 and max(pieces) <= 256
    else:  # the baselines run the prompt in one 0.8 s pass: the verifies behind it miss
        assert trace.misses("v") >= 8


def test_prefill_arriving_first_still_yields_to_urgent_verifies():
    """Prefill first in arrival order, tight verifies right behind it: wisp puts the verifies first and shrinks
    the prefill piece that rides along so the batch still ends in time. FIFO serves the prompt first."""
    reqs = [prefill("long", 0.0, 1000, ttft=2.0)] + [verify(f"v{i}", 0.0, 0.03) for i in range(4)]
    wisp = simulate(WispPolicy(GPU, max_batch=8), reqs, GPU)
    assert wisp.misses() == 0
    first = wisp.batches[0][1]
    assert {s.request.session_id for s in first.slots} >= {f"v{i}" for i in range(4)}
    assert GPU.predict(first.shapes) <= 0.03
    fifo = simulate(FifoPolicy(GPU, max_batch=8), [r for r in _fresh(reqs)], GPU)
    assert fifo.misses("v") == 4


def test_every_feasible_deadline_met():
    """Relaxed requests queued ahead of tight ones; max batch 4. Serving earliest deadline first
    meets everything; FIFO makes the tight ones wait behind two relaxed batches."""
    gpu = linear_estimator(const=0.010, per_item=0.001, per_token=0.0)
    reqs = [verify(f"r{i}", 0.0, 1.0) for i in range(8)] + [verify(f"t{i}", 0.0, 0.018) for i in range(4)]
    wisp = simulate(WispPolicy(gpu, max_batch=4), reqs, gpu)
    assert wisp.misses() == 0
    fifo = simulate(FifoPolicy(gpu, max_batch=4), list(_fresh(reqs)), gpu)
    assert fifo.misses("t") == 4


def test_hopeless_request_is_served_best_effort_and_counted():
    """Urgent feasible work first, then the hopeless request (as soon as possible, counted as a miss), and
    only then work whose slack lets it wait."""
    gpu = linear_estimator()  # solo verify 6.5 ms
    reqs = [verify("relaxed", 0.0, 0.5), verify("late", 0.0, 0.001), verify("tight", 0.0, 0.012)]
    trace = simulate(WispPolicy(gpu, max_batch=1), reqs, gpu)
    met = {o.request.session_id: o.met for o in trace.outcomes}
    assert met == {"late": False, "tight": True, "relaxed": True}
    assert [b.slots[0].request.session_id for _, b in trace.batches] == ["tight", "late", "relaxed"]
    late = next(o for o in trace.outcomes if o.request.session_id == "late")
    assert late.best_effort


def test_no_starvation_under_saturation():
    """A saturating stream of dense, tight verifies; one low-density relaxed request and one hopeless one.
    Aging forces both in within starve_s (+ one batch)."""
    gpu = linear_estimator(const=0.010, per_item=0.002, per_token=0.0)
    reqs = [Request("big", "verify", 9, 400, deadline=3.0, arrival=0.0, expected_tokens=0.1)]
    reqs.append(verify("doomed", 0.0, 0.0001))
    t, n = 0.0, 0
    while t < 4.0:  # 4 tight verifies every 14 ms: a batch of 4 takes 18 ms, so the queue never drains
        reqs += [verify(f"d{n}-{j}", t, 0.05) for j in range(4)]
        t += 0.014
        n += 1
    policy = WispPolicy(gpu, max_batch=4, starve_s=1.0)
    trace = simulate(policy, reqs, gpu)
    done = {o.request.session_id: o for o in trace.outcomes}
    assert "big" in done and "doomed" in done
    assert done["big"].finished <= 1.0 + 0.05
    assert done["doomed"].finished <= 1.0 + 0.05
    assert len(trace.outcomes) == len(reqs)


def test_sled_waits_for_a_full_batch_or_timeout():
    gpu = linear_estimator()
    pol = SledPolicy(gpu, max_batch=4, max_wait_s=0.02)
    sched = Scheduler(pol, learn=False)
    for i in range(3):
        sched.submit(verify(f"s{i}", 0.0, 1.0))
    assert sched.next_batch(0.005) is None
    assert sched.wakeup(0.005) == pytest.approx(0.02)
    sched.submit(verify("s3", 0.006, 1.0))
    batch = sched.next_batch(0.006)
    assert batch is not None and len(batch) == 4


def test_centralized_prompt_chunks_leave_room_for_the_decodes_under_the_token_budget():
    gpu = linear_estimator()
    pol = CentralizedPolicy(gpu, max_batch=64, prefill_chunk=512, max_batch_tokens=600)
    reqs = [prefill("p", 0.0, 1500), prefill("q", 0.0005, 1500)] + [
        Request(f"d{i}", "decode", 1, 100, deadline=1.0, arrival=0.001) for i in range(10)
    ]
    trace = simulate(pol, reqs, gpu)
    first = trace.batches[0][1]
    assert [s.request.session_id for s in first.slots] == ["p"] and first.slots[0].n_tokens == 512
    second = trace.batches[1][1]
    pieces = {s.request.session_id: s.n_tokens for s in second.slots}
    # FIFO: the older prompts keep their places, but their chunks leave room for every decode (run 37: four
    # prompt chunks filled the cap and the decodes behind them waited a whole step)
    assert [s.request.session_id for s in second.slots][:2] == ["p", "q"]
    assert all(pieces.get(f"d{i}") == 1 for i in range(10))
    assert pieces["p"] == 512 and pieces["q"] == 600 - 512 - 10
    assert len(trace.outcomes) == 12


def test_centralized_keeps_arrival_order_for_places_so_prompts_do_not_starve():
    """Run 39 put every decode first: past max_batch running sessions no prompt got a place (TTFT, 0.12
    attainment at 720 devices). Places go by arrival."""
    gpu = linear_estimator()
    pol = CentralizedPolicy(gpu, max_batch=4, prefill_chunk=512, max_batch_tokens=2048)
    waiting = [Request(f"d{i}", "decode", 1, 100, deadline=1.0, arrival=0.002 + i * 1e-4) for i in range(6)]
    waiting.append(prefill("p", 0.001, 300))
    ids = [s.request.session_id for s in pol.select(waiting, 0.01).slots]
    assert ids == ["p", "d0", "d1", "d2"]


def test_chunked_prefill_advances_context():
    gpu = linear_estimator()
    sched = Scheduler(WispPolicy(gpu, prefill_chunk=100, min_chunk=100), learn=False)
    r = prefill("p", 0.0, 250, ttft=10.0)
    sched.submit(r)
    seen = []
    now = 0.0
    while True:
        b = sched.next_batch(now)
        if b is None:
            break
        s = b.slots[0]
        seen.append((s.start, s.n_tokens, s.shape.context))
        now += 0.01
        out = sched.complete(b, 0.01, now)
        if out:
            assert out[0].request is r and out[0].met
    assert seen == [(0, 100, 0), (100, 100, 100), (200, 50, 200)]


def test_wait_hint_tracks_queueing_and_batch_time():
    gpu = linear_estimator()
    sched = Scheduler(WispPolicy(gpu), learn=False)
    from wisp_cloud.estimator import ItemShape

    solo = gpu.predict([ItemShape(5, 200)])
    assert sched.wait_hint(ItemShape(5, 200), 0.0) == pytest.approx(solo)
    for i in range(8):
        sched.submit(verify(f"s{i}", 0.0, 1.0))
    b = sched.next_batch(0.05)
    # while a batch runs, the hint includes the rest of it
    assert sched.wait_hint(ItemShape(5, 200), 0.05) > solo
    sched.complete(b, b.predicted_s, 0.05 + b.predicted_s)
    hint = sched.wait_hint(ItemShape(5, 200), 1.0)
    assert hint > gpu.predict([ItemShape(5, 200)] * 8)  # queued 50 ms, batch of 9


def test_make_policy_rejects_unknown():
    from wisp_sdk.errors import WispError

    with pytest.raises(WispError):
        make_policy("nope")


def _fresh(reqs: list[Request]):
    """Copies with fresh progress, so one workload can run under two policies."""
    for r in reqs:
        yield Request(
            r.session_id,
            r.kind,
            r.new_tokens,
            r.context_len,
            deadline=r.deadline,
            arrival=r.arrival,
            expected_tokens=r.expected_tokens,
            cache_miss=r.cache_miss,
            downlink_s=r.downlink_s,
        )


def test_closed_loop_mixed_slos_wisp_beats_fifo_and_sled():
    """80 sessions, half with a tight TPOT SLO (35 ms) and half loose (150 ms), every fifth with a 2500-token
    prompt, on a GPU with a 12 ms fixed cost per pass. WISP keeps ≥ 95 % of sessions within SLO; FIFO and SLED
    let long prompts and loose sessions crowd out the tight ones."""
    from test_sched_sim import closed_loop

    gpu = linear_estimator(const=0.012, per_item=0.0002, per_token=0.00004, attn=2e-9)
    res = {}
    for name, kw in (("wisp", {}), ("fifo", {}), ("sled", {"max_wait_s": 0.005})):
        res[name] = closed_loop(make_policy(name, gpu, max_batch=64, **kw), gpu, n_sessions=80)
    assert res["wisp"]["attainment"] >= 0.95
    assert res["fifo"]["attainment"] <= 0.85 and res["sled"]["attainment"] <= 0.9
    assert res["wisp"]["goodput_tok_s"] > 1.1 * max(
        res["fifo"]["goodput_tok_s"], res["sled"]["goodput_tok_s"]
    )


def test_wisp_never_holds_server_decoded_sessions():
    """A decode of a server-decoded (hybrid) session is due every step, as under the centralized policy: no hold
    (hold_s or fill) may wait with one, or every token of that session pays the hold (simulated: TPOT p50 34 ->
    46 ms for phone-class devices moved to server decoding)."""
    for fill in (False, True):
        pol = WispPolicy(linear_estimator(), max_batch=64, hold_s=0.01, fill=fill)
        decodes = [Request(f"d{i}", "decode", 1, 100, deadline=0.5, arrival=0.0) for i in range(3)]
        assert len(pol.select(decodes, 0.001).slots) == 3
        mixed = [*decodes, verify("v", 0.0, 0.5)]
        assert len(pol.select(mixed, 0.001).slots) == 4


def test_wisp_holds_a_small_relaxed_batch_but_not_urgent_work():
    """Without `fill` (sched/fill.py replaces it): rounds with slack wait up to hold_s for company (one pass
    reads all weights); urgent ones go at once."""
    pol = WispPolicy(linear_estimator(), max_batch=64, hold_s=0.01, fill=False)
    relaxed = [verify(f"s{i}", 0.0, 0.5) for i in range(3)]
    assert not pol.select(relaxed, 0.001).slots
    assert pol.wakeup(relaxed, 0.001) == pytest.approx(0.01)
    assert len(pol.select(relaxed, 0.0105).slots) == 3  # the hold is over: everyone in one pass
    urgent = [*relaxed, verify("u", 0.0, 0.02)]  # 20 ms of slack: within the urgency horizon
    assert len(pol.select(urgent, 0.001).slots) == 4
    assert len(WispPolicy(linear_estimator(), hold_s=0.0, fill=False).select(relaxed, 0.001).slots) == 3


def test_every_round_joins_unless_refuse_but_prompt_pieces_are_checked():
    """A member whose deadline the next round would break: with refuse=True the round is left out (it waits a
    step); by default it joins anyway, while a prompt piece that would break it is still held back."""
    gpu = linear_estimator(const=0.010, per_item=0.004, per_token=0.0)
    tight = verify("tight", 0.0, 0.0145)  # alone: 14 ms of 14.5; with any other item: 18 ms
    late = verify("other", 0.0, 1.0)
    chunk = prefill("p", 0.0, 64, ttft=5.0)
    guarded = WispPolicy(gpu, max_batch=8, hold_s=0.0, fill=False, refuse=True).select([tight, late], 0.0)
    assert [s.request.session_id for s in guarded.slots] == ["tight"]
    open_ = WispPolicy(gpu, max_batch=8, hold_s=0.0, fill=False)  # the default
    assert {s.request.session_id for s in open_.select([tight, late], 0.0).slots} == {"tight", "other"}
    assert [s.request.session_id for s in open_.select([tight, chunk], 0.0).slots] == ["tight"]


def test_an_urgent_prompt_piece_joins_though_it_pushes_members():
    """A prompt whose TTFT is at stake is not held behind rounds until aging forces it in (run 26 on an H200:
    7B, TPOT 60, 544 devices, prompts held to the 2 s starvation limit, 28 % of sessions missed TTFT). A relaxed
    prompt is still held back; `refuse` keeps members' deadlines strictly."""
    gpu = linear_estimator(const=0.010, per_item=0.004, per_token=0.0001)
    tight = [verify(f"t{i}", 0.0, 0.035) for i in range(3)]  # alone 23.5 ms of 35; + a 256-token piece: 53 ms

    def prompt_tokens(pol: WispPolicy, p: Request) -> int:
        return sum(
            s.n_tokens for s in pol.select([*tight, p], 0.0).slots if s.request.session_id == p.session_id
        )

    relaxed = prefill("relaxed", 0.0, 256, ttft=5.0)
    urgent = prefill("urgent", -1.7, 256, ttft=2.0)  # 300 ms of its TTFT left: urgent
    late = prefill(
        "late", -1.9, 256, ttft=2.0
    )  # 100 ms left: past the due it was planned for (prefill_margin)
    pol = WispPolicy(gpu, max_batch=8, hold_s=0.0, fill=False)
    assert 0 < prompt_tokens(pol, relaxed) < 128  # shrunk to what keeps the members on time
    assert prompt_tokens(pol, urgent) == 256 and prompt_tokens(pol, late) == 256
    strict = WispPolicy(gpu, max_batch=8, hold_s=0.0, fill=False, refuse=True)
    assert prompt_tokens(strict, urgent) < 128 and prompt_tokens(strict, late) < 128
    # a burst of late prompts: they skip the members' checks only up to the centralized token cap of a step
    burst = [prefill(f"late{i}", -1.9, 256, ttft=2.0) for i in range(12)]
    batch = WispPolicy(gpu, max_batch=64, hold_s=0.0, fill=False).select([*tight, *burst], 0.0)
    assert 2048 - 256 < sum(s.n_tokens for s in batch.slots if s.request.kind == "prefill") <= 2048 + 128


def test_a_short_prompt_is_paced_to_start_soon_not_at_the_end_of_its_ttft():
    """A prompt is paced no slower than `pace_tokens` per TTFT window (H200 run 27, 7B, TPOT 60: pacing every
    prompt over its whole window put WISP's TTFT p50 at 0.6-1.4 s against centralized's 0.1-0.3 s). A 128-token
    prompt 0.3 s old is behind that pace and joins though it pushes tight rounds; the old pacing (pace_tokens 1,
    i.e. the prompt's own length) still held it back, and a fresh prompt is held back under both."""
    gpu = linear_estimator(const=0.010, per_item=0.004, per_token=0.0001)
    tight = [verify(f"t{i}", 0.0, 0.035) for i in range(3)]  # alone 23.5 ms of 35; with the prompt: over

    def prompt_tokens(pol: WispPolicy, p: Request) -> int:
        return sum(
            s.n_tokens for s in pol.select([*tight, p], 0.0).slots if s.request.session_id == p.session_id
        )

    paced = WispPolicy(gpu, max_batch=8, hold_s=0.0, fill=False)
    old = WispPolicy(gpu, max_batch=8, hold_s=0.0, fill=False, pace_tokens=1)
    assert prompt_tokens(paced, prefill("p", -0.3, 128, ttft=2.0)) == 128
    assert prompt_tokens(old, prefill("p", -0.3, 128, ttft=2.0)) < 128
    assert prompt_tokens(paced, prefill("p", 0.0, 128, ttft=2.0)) < 128


def test_late_prompts_are_capped_by_their_own_tokens_not_the_rounds():
    """The cap on late prompts a step counts prompt tokens only: behind 600 rounds (3000 tokens) a late prompt
    still joins (H200 run 29: counting the rounds' tokens left no room, and prompts waited to be forced at 2 s)."""
    gpu = linear_estimator(const=0.010, per_item=0.00001, per_token=0.00001)
    rounds = [verify(f"r{i}", 0.0, 0.02) for i in range(600)]
    late = prefill("late", -1.9, 256, ttft=2.0)
    batch = WispPolicy(gpu, max_batch=1024, hold_s=0.0, fill=False).select([*rounds, late], 0.0)
    assert sum(s.n_tokens for s in batch.slots if s.request.kind == "verify") == 3000
    assert sum(s.n_tokens for s in batch.slots if s.request.session_id == "late") == 256
