"""The verify price, the truncated-verify length and the hybrid's switch rule (pure, no model)."""

from __future__ import annotations

import pytest
from wisp_cloud.estimator import BatchShape, ItemShape, VerifyTimeEstimator
from wisp_cloud.sched.hybrid import HybridRule, Why
from wisp_cloud.sched.pricing import VerifyPrice, verify_len


def shape(n_sessions: int, k: int = 4, ctx: int = 500) -> BatchShape:
    return BatchShape.of([ItemShape(k + 1, ctx)] * n_sessions)


def test_price_is_zero_when_idle_and_rises_with_load():
    price = VerifyPrice(VerifyTimeEstimator.default())
    assert price.update(shape(1), waiting=0) == 0.0  # an extra token delays nobody
    prices = [price.update(shape(n), waiting=w) for n, w in [(2, 0), (8, 0), (32, 0), (32, 16)]]
    assert all(p > 0 for p in prices) and prices == sorted(prices)
    # the marginal cost of a token times the sessions it delays
    f = price.per_token_ms(shape(32))
    assert prices[2] == pytest.approx(f * 31) and prices[3] == pytest.approx(f * 47)
    assert f > 0


def test_price_after_a_decode_only_step_is_one_tokens_compute_not_the_kernel_switch():
    """H200 run 38's online estimator (7B, varlen features): a step of decodes only runs the one-row attention
    kernel, any round the tiled one (`pad_verify` = batch × longest context). The price of a verified token must
    not hold that switch: it was 5-13 s after decode-only steps, and moved sessions to the server by hundreds."""
    est = VerifyTimeEstimator(
        features=("groups", "batch", "new", "ctx", "miss", "attn", "pad_verify", "new_over"),
        coef=[5.54e-3, 7.89e-5, 2.75e-6, 0.0, 0.0, 0.0, 2.71e-8, 2.85e-5],
        knee=128,
    )
    price = VerifyPrice(est)
    decodes = BatchShape.of([ItemShape(1, 900)] * 400)
    rounds = BatchShape.of([ItemShape(4, 900)] * 100)
    f_decodes, f_rounds = price.per_token_ms(decodes), price.per_token_ms(rounds)
    # ≈ 31 µs a token past the knee, whatever kernel the last step ran
    assert f_decodes == pytest.approx(f_rounds, rel=0.05) and 0.02 < f_decodes < 0.05
    assert price.update(decodes, waiting=100) < 20.0


def test_verify_len_keeps_the_prefix_that_pays():
    assert verify_len(6, None, 10.0, 50.0) == 6  # no acceptance measured yet: verify all
    assert verify_len(6, 0.8, 0.0, 50.0) == 6  # free: verify all
    # slot i is kept while 0.5**i * 50 >= price
    assert verify_len(6, 0.5, 10.0, 50.0) == 2  # 25, 12.5 pay; 6.25 does not
    assert verify_len(6, 0.5, 60.0, 50.0) == 0  # not even the first: a plain decode step
    lens = [verify_len(8, 0.7, p, 50.0) for p in (1.0, 5.0, 20.0, 40.0)]
    assert lens == sorted(lens, reverse=True) and lens[0] > lens[-1]


def test_hybrid_rule_switches_with_hysteresis():
    rule = HybridRule()
    # low acceptance and a high price: speculation wastes the GPU, switch out (once alpha is measured)
    assert not rule.to_centralized(rounds=2, k=4, alpha=0.2, price_ms=40.0, tpot_ms=50.0)
    assert rule.to_centralized(rounds=8, k=4, alpha=0.2, price_ms=40.0, tpot_ms=50.0)
    # the same session on an idle server, or with a draft that is nearly always right, stays on the edge
    assert not rule.to_centralized(rounds=8, k=4, alpha=0.2, price_ms=0.0, tpot_ms=50.0)
    assert not rule.to_centralized(rounds=8, k=4, alpha=0.98, price_ms=40.0, tpot_ms=50.0)
    # back only after the dwell, and only once the cost is under `leave` (below `enter`: no flapping)
    assert not rule.to_speculative(decoded=4, k=4, alpha=0.2, price_ms=0.0, tpot_ms=50.0)
    assert rule.to_speculative(decoded=32, k=4, alpha=0.2, price_ms=0.0, tpot_ms=50.0)
    mid = HybridRule.cost(4, 0.2, 8.0, 50.0)
    assert rule.leave < mid < rule.enter  # in the band: neither switch happens
    assert not rule.to_centralized(rounds=8, k=4, alpha=0.2, price_ms=8.0, tpot_ms=50.0)
    assert not rule.to_speculative(decoded=32, k=4, alpha=0.2, price_ms=8.0, tpot_ms=50.0)


def test_no_cost_move_to_decoding_that_would_miss_the_slo():
    rule = HybridRule()
    # a costly session that meets its TPOT on the edge (30 ms a round for E ≈ 1.25 tokens: 24 ms a token)
    costly = dict(rounds=8, k=4, alpha=0.2, price_ms=40.0, tpot_ms=50.0, round_ms=30.0)
    assert (
        rule.to_centralized(**costly, decode_ms=70.0) is Why.cost
    )  # a decode's wait and step: 1.5 steps of 47 ms
    # steps longer than its TPOT (a loaded speculative GPU): decoded, it would miss at every token
    assert rule.to_centralized(**costly, decode_ms=80.0) is None  # 1.5 steps of 53 ms
    # a session that misses on the edge too still moves: decoded it at least costs the others less
    assert rule.to_centralized(**{**costly, "round_ms": 70.0}, decode_ms=80.0) is Why.cost


def test_hybrid_test_hook_switches_every_n():
    rule = HybridRule(every=3)
    assert [rule.to_centralized(r, 4, 0.99, 0.0, 50.0) for r in (1, 2, 3)] == [None, None, Why.hook]
    assert [rule.to_speculative(d, 4, 0.0, 1e9, 50.0) for d in (1, 2, 3)] == [False, False, True]


def test_hybrid_moves_a_session_whose_link_is_too_slow_for_its_slo():
    rule = HybridRule()
    # idle server (price 0), good drafts, but a 400 ms round for ~4 tokens against a 50 ms TPOT
    assert rule.too_slow(4, 0.8, 50.0, round_ms=400.0, decode_ms=20.0)
    assert rule.to_centralized(8, 4, 0.8, 0.0, 50.0, round_ms=400.0, decode_ms=20.0)
    # a decode near the SLO still beats ~120 ms a token (decoding is what centralized serving would do)
    assert rule.to_centralized(8, 4, 0.8, 0.0, 50.0, round_ms=400.0, decode_ms=45.0)
    # not when the server's decode would be slower than the rounds, nor on a fast link
    assert not rule.to_centralized(8, 4, 0.8, 0.0, 50.0, round_ms=400.0, decode_ms=130.0)
    assert not rule.to_centralized(8, 4, 0.8, 0.0, 50.0, round_ms=120.0, decode_ms=20.0)
    # it stays on the server while the link is still that slow, even with the GPU idle
    assert not rule.to_speculative(32, 4, 0.8, 0.0, 50.0, round_ms=400.0, decode_ms=20.0)
    assert rule.to_speculative(32, 4, 0.8, 0.0, 50.0, round_ms=120.0, decode_ms=20.0)


def test_too_slow_has_a_margin_and_needs_a_faster_decode():
    """A phone-class device (one 60 ms draft, 20 ms RTT, 20 ms verify: ~56 ms a token at α ≈ 0.8) is at risk of a
    60 ms SLO and moves when a server decode is faster; a Jetson's ~32 ms a token does not; nor does a session whose
    decode would be slower than its rounds."""
    rule = HybridRule()
    assert rule.too_slow(1, 0.794, 60.0, 100.0, 34.0)
    assert not rule.too_slow(4, 0.794, 60.0, 110.0, 34.0)
    assert not rule.too_slow(1, 0.794, 60.0, 100.0, 58.0)
    # a Jetson under load (k 6 at α 0.78, a 195 ms round: ≈ 52 ms a token) meets 60 ms by itself; a decode of 45 ms
    # is faster but not by enough to pay for an item of its own in every step (H200 runs 42-43)
    assert not rule.too_slow(6, 0.78, 60.0, 195.0, 45.0)
    assert rule.too_slow(6, 0.78, 60.0, 195.0, 38.0)
    # before α is measured the prior is used, from the first measured round
    assert rule.to_centralized(1, 1, None, 0.0, 60.0, 100.0, 34.0)
    assert not rule.to_centralized(1, 1, None, 0.0, 60.0, None, None)


def test_the_dwell_doubles_per_round_trip():
    """A session that keeps coming back (measured on the GPU: thousands of moves each way per arm) waits twice as
    many decoded tokens after every round trip before it may return, up to 2^backoff times the dwell."""
    rule = HybridRule(dwell_tokens=16, backoff=2)
    back = [
        min(d for d in range(1, 200) if rule.to_speculative(d, 4, 0.9, 0.0, 50.0, trips=trips))
        for trips in range(5)
    ]
    assert back == [16, 32, 64, 64, 64]


def test_the_hybrid_weighs_a_decoded_tokens_own_item_against_a_rounds_waste():
    """A decoded token is an item of its own in every step; a round shares one among its E tokens. H200 run 39's
    online estimator (7B) prices an item at ≈ 2 verified tokens: a session at α 0.6 costs the GPU less on the edge,
    and the rule (which took a decoded token for free and moved 1460 sessions in three points) keeps it there."""
    est = VerifyTimeEstimator(
        features=("groups", "batch", "new", "ctx", "miss", "attn", "pad_verify", "new_over"),
        coef=[5.59e-3, 3.93e-5, 8.0e-6, 0.0, 0.0, 0.0, 2.57e-8, 2.04e-5],
        knee=128,
    )
    price = VerifyPrice(est)
    assert price.update(BatchShape.of([ItemShape(4, 900)] * 150), waiting=100) > 0
    assert 1.5 < price.item_ratio < 3.0
    rule = HybridRule()
    busy = {"price_ms": 40.0, "tpot_ms": 60.0}
    assert rule.to_centralized(rounds=8, k=4, alpha=0.6, **busy)  # as before: a decoded token taken as free
    assert not rule.to_centralized(rounds=8, k=4, alpha=0.6, item_ratio=price.item_ratio, **busy)
    assert HybridRule.cost(4, 0.6, 40.0, 60.0, price.item_ratio) < 0  # speculating is the cheaper way
    # drafts that are mostly rejected still go to the server, and a decoded one at α 0.6 comes back
    assert rule.to_centralized(rounds=8, k=4, alpha=0.2, item_ratio=price.item_ratio, **busy)
    assert rule.to_speculative(decoded=32, k=4, alpha=0.6, item_ratio=price.item_ratio, **busy)


def test_the_rule_says_why_it_moves_a_session():
    """The server logs the reason with each `session_switch` and counts them (`switch_reasons`), so a GPU run can
    put its moves down to the regime, a slow link or the cost."""
    rule = HybridRule()
    busy = {"price_ms": 40.0, "tpot_ms": 50.0}
    assert rule.to_centralized(rounds=8, k=4, alpha=0.2, **busy) is Why.cost
    assert rule.to_centralized(rounds=8, k=4, alpha=0.98, **busy) is None
    # a round of 200 ms for ≈ 2.3 tokens on a 50 ms SLO, where a decode step takes 30 ms
    assert rule.to_centralized(rounds=1, k=4, alpha=0.6, round_ms=200.0, decode_ms=30.0, **busy) is Why.slow
    assert HybridRule(every=2).to_centralized(rounds=2, k=4, alpha=0.9, **busy) is Why.hook
