"""The regime (sched/regime.py): the physics model picks server-side decoding where speculation cannot beat it on
the GPU's own estimator, speculation where it can, with hysteresis and a sample floor."""

from __future__ import annotations

import json

import pytest
from sim_inputs import EST_32B
from wisp_cloud.estimator import VerifyTimeEstimator
from wisp_cloud.sched.regime import Regime, SessionSample, capacities, step_ms


@pytest.fixture(scope="module")
def est32() -> VerifyTimeEstimator:
    return VerifyTimeEstimator.from_dict(json.loads(EST_32B.read_text()))


def _fleet(think_ms: float, k: float, e: float, tpot_ms: float, n: int = 40) -> list[SessionSample]:
    return [SessionSample(think_ms, k, e, tpot_ms, 500) for _ in range(n)]


def test_decode_capacity_is_the_largest_batch_whose_step_fits_the_slo(est32):
    cap = capacities(est32, _fleet(20.0, 3, 2.5, 30.0), quantile=0.1, margin=0.9)
    assert step_ms(est32, cap.decode, 1, 500) <= 27.0 < step_ms(est32, cap.decode + 1, 1, 500)


def test_slow_drafts_or_low_acceptance_favour_decoding_at_32b(est32):
    # Mac-mini-class drafts (3 × 5.2 ms + a 5 ms link) at ShareGPT's tail acceptance, TPOT 30
    cap = capacities(est32, _fleet(22.0, 3, 2.2, 30.0))
    assert cap.decode > 1.1 * cap.speculative, cap
    # a Jetson-class device (18.5 ms per token, 20 ms link) cannot make a 30 ms TPOT by speculation at all
    assert capacities(est32, _fleet(75.0, 3, 2.2, 30.0)).speculative == 0


def test_fast_drafts_with_high_acceptance_favour_speculation_when_tpot_is_near_the_weight_read(est32):
    # HumanEval-like acceptance (4 drafts commit 4.4 tokens), fast drafts, TPOT 30 against a ≈ 19 ms weight read
    cap = capacities(est32, _fleet(26.0, 4, 4.4, 30.0))
    assert cap.speculative > 1.1 * cap.decode, cap
    assert cap.step_ms > 30.0  # its steps may be longer than the TPOT: a round commits several tokens


def test_the_slo_quantile_session_decides(est32):
    good = _fleet(26.0, 4, 4.4, 30.0, n=80)
    tail = _fleet(26.0, 4, 1.3, 30.0, n=20)  # a fifth of the sessions barely accept anything
    assert capacities(est32, good + tail, quantile=0.1).speculative < capacities(est32, good).speculative


def test_regime_waits_for_samples_and_flips_with_hysteresis(est32):
    r = Regime(est32, min_samples=8, every_s=1.0)
    for i in range(7):
        r.observe(f"s{i}", SessionSample(22.0, 3, 2.2, 30.0, 500))
    assert r.decide(0.0) == "speculative"  # too few samples: as the sessions opened
    r.observe("s7", SessionSample(22.0, 3, 2.2, 30.0, 500))
    assert r.decide(0.0) == "centralized"
    assert r.stats()["flips"] == 1
    for i in range(8):  # the fleet changes: fast, well-accepted drafts
        r.observe(f"s{i}", SessionSample(26.0, 4, 4.4, 30.0, 500))
    assert r.decide(0.5) == "centralized"  # re-decided at most every every_s
    assert r.decide(1.0) == "speculative"
    assert r.stats()["flips"] == 2


def test_samples_are_per_session_and_bounded():
    r = Regime(VerifyTimeEstimator(), window=4)
    for i in range(10):
        r.observe(f"s{i % 6}", SessionSample(20.0, 3, 2.0, 30.0, 100))
    assert r.stats()["samples"] == 4


def test_one_session_in_probe_every_is_a_probe():
    r = Regime(VerifyTimeEstimator(), probe_every=4)
    assert [r.enlist() for _ in range(8)] == [False, False, False, True] * 2
