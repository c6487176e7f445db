"""The regime (sched/regime.py): the physics model picks server-side decoding where speculation cannot beat it on
the GPU's own estimator, speculation where it can, with hysteresis and a sample floor."""

from __future__ import annotations

import copy
import json

import pytest
from sim_inputs import EST_32B
from wisp_cloud.estimator import BatchShape, ItemShape, VerifyTimeEstimator
from wisp_cloud.sched.capacity import Capacities, DeviceLine, SessionSample, capacities, step_ms
from wisp_cloud.sched.regime import DRAIN_STEPS, GATE_STEPS, PROBE_CAP, Regime


@pytest.fixture(scope="module")
def est32() -> VerifyTimeEstimator:
    return VerifyTimeEstimator.from_dict(json.loads(EST_32B.read_text()))


MAC_M4 = DeviceLine(5.0, 5.2)  # a Mac-mini-class draft (5.2 ms per token) on a 5 ms link
JETSON = DeviceLine(20.0, 18.5)  # Jetson Orin-class (18.5 ms per token) on wifi-metro (20 ms)


def _fleet(alpha: float, tpot_ms: float, n: int = 40) -> list[SessionSample]:
    return [SessionSample(alpha, tpot_ms, 500) for _ in range(n)]


def test_step_ms_of_identical_items_is_the_estimators_prediction(est32):
    shape = BatchShape.of([ItemShape(4, 500)] * 37)
    assert step_ms(est32, 37, 4, 500) == pytest.approx(1000.0 * est32.predict_shape(shape))


def test_decode_capacity_is_the_largest_batch_whose_step_fits_the_slo(est32):
    cap = capacities(est32, _fleet(0.8, 30.0), MAC_M4, quantile=0.1, margin=0.9)
    assert step_ms(est32, cap.decode, 1, 500) <= 27.0 < step_ms(est32, cap.decode + 1, 1, 500)


def test_low_acceptance_or_slow_drafts_favour_decoding_at_32b(est32):
    # ShareGPT's 10th-percentile acceptance (0.66) on Mac-mini-class drafts, TPOT 30
    cap = capacities(est32, _fleet(0.66, 30.0), MAC_M4)
    assert cap.decode > 1.1 * cap.speculative, cap
    # a Jetson-class device cannot make a 30 ms TPOT by speculation at any k
    assert capacities(est32, _fleet(0.8, 30.0), JETSON).speculative == 0


def test_fast_drafts_with_high_acceptance_favour_speculation_when_tpot_is_near_the_weight_read(est32):
    # HumanEval's 10th-percentile acceptance (0.88), TPOT 30 against a ≈ 19 ms weight read
    cap = capacities(est32, _fleet(0.88, 30.0), MAC_M4)
    assert cap.speculative > 1.1 * cap.decode, cap
    assert cap.step_ms > 30.0 and cap.k >= 3  # long steps of long rounds: each commits several tokens


def test_the_slo_quantile_session_decides(est32):
    good, tail = _fleet(0.9, 30.0, n=80), _fleet(0.3, 30.0, n=20)  # a fifth barely accept anything
    assert capacities(est32, good + tail, MAC_M4).speculative < capacities(est32, good, MAC_M4).speculative


def _observe(r: Regime, sid: str, alpha: float, k: float, line: DeviceLine) -> None:
    r.observe(sid, SessionSample(alpha, 30.0, 500), k, line.ms(round(k)))


def test_regime_waits_for_samples_and_flips_with_hysteresis(est32):
    r = Regime(est32, min_samples=8, every_s=1.0, confirm=1)
    for i in range(7):
        _observe(r, f"s{i}", 0.66, 2 + i % 3, MAC_M4)
    assert r.decide(0.0) == "speculative"  # too few samples: as the sessions opened
    _observe(r, "s7", 0.66, 3, MAC_M4)
    assert r.decide(0.0) == "centralized"
    assert r.stats()["flips"] == 1
    for i in range(8):  # the fleet changes: well-accepted drafts
        _observe(r, f"s{i}", 0.9, 3 + i % 3, MAC_M4)
    assert r.decide(0.5) == "centralized"  # re-decided at most every every_s
    assert r.decide(1.0) == "speculative"
    assert r.stats()["flips"] == 2


def test_the_device_line_is_fitted_from_rounds_of_varying_length():
    r = Regime(VerifyTimeEstimator())
    for i in range(64):
        k = 1 + i % 6
        _observe(r, f"s{i}", 0.8, k, MAC_M4)
    line = r.device()
    assert line.per_token_ms == pytest.approx(5.2, rel=0.01) and line.fixed_ms == pytest.approx(5.0, rel=0.02)


def test_fixed_length_rounds_charge_all_device_time_per_token():
    r = Regime(VerifyTimeEstimator())
    for i in range(16):
        _observe(r, f"s{i}", 0.8, 4, MAC_M4)
    line = r.device()
    assert line.fixed_ms == 0.0 and line.ms(4) == pytest.approx(MAC_M4.ms(4))


def test_samples_are_per_session_and_bounded():
    r = Regime(VerifyTimeEstimator(), window=4)
    for i in range(10):
        _observe(r, f"s{i % 6}", 0.8, 3, MAC_M4)
    assert r.stats()["samples"] == 4


def test_one_session_in_probe_every_is_a_probe():
    r = Regime(VerifyTimeEstimator(), probe_every=4)
    assert [r.enlist() for _ in range(8)] == [False, False, False, True] * 2
    # `wisp serve --no-probes`
    assert not any(Regime(VerifyTimeEstimator(), probe_every=0).enlist() for _ in range(8))


def test_the_hybrid_takes_the_regimes_decision_first_and_predicts_only_when_it_must():
    from wisp_cloud.sched.hybrid import HybridRule, Why

    asked: list[int] = []

    def inputs():
        asked.append(1)
        return (
            4,
            0.9,
            0.0,
            30.0,
            None,
            None,
        )  # cheap, well-accepted drafts: the rule alone keeps them on the edge

    rule = HybridRule()
    # the centralized regime: every speculative session moves, a probe excepted; none goes back
    assert rule.moves(False, 1, 0, True, False, inputs) is Why.regime and not asked
    assert not rule.moves(True, 100, 0, True, False, inputs) and not asked
    assert not rule.moves(False, 1, 0, True, True, inputs) and len(asked) == 1  # a probe: the rule decides
    # a probe that started decoded goes to the edge once it has dwelt, at any load, with no prediction
    assert not rule.moves(True, rule.dwell_tokens - 1, 0, True, True, inputs) and len(asked) == 1
    assert rule.moves(True, rule.dwell_tokens, 0, True, True, inputs) is Why.probe and len(asked) == 1
    # the speculative regime: a decoded session within its dwell is refused before any prediction
    assert not rule.moves(True, rule.dwell_tokens - 1, 0, False, False, inputs) and len(asked) == 1
    assert rule.moves(True, rule.dwell_tokens, 0, False, False, inputs) is Why.edge and len(asked) == 2


def test_in_the_centralized_regime_wisp_batches_exactly_as_the_centralized_policy(est32):
    """Run 24 (H200, 7B, TPOT 30): WISP's regime lost 0.79x to centralized serving while it decoded every session,
    because its batches took prompt pieces without centralized's token cap. In that mode the batch must be the
    centralized policy's, the probes' rounds included."""
    from wisp_cloud.sched.policies import CentralizedPolicy, WispPolicy
    from wisp_cloud.sched.requests import Request

    def queue() -> list[Request]:
        reqs = []
        for i in range(300):  # decodes, new sessions' prompts and a probe's round, interleaved by arrival
            kind = "prefill" if i % 17 == 0 else "verify" if i % 41 == 0 else "decode"
            n = 700 if kind == "prefill" else 5 if kind == "verify" else 1
            reqs.append(Request(f"s{i}", kind, n, 0 if kind == "prefill" else 400, 10.0 + i * 1e-3, i * 1e-3))
        return reqs

    central = CentralizedPolicy(est32, max_batch=512, prefill_chunk=256)
    wisp = WispPolicy(est32, max_batch=512, prefill_chunk=256)
    regime = Regime(est32)
    wisp.follow(regime)
    want = [(s.request.session_id, s.n_tokens) for s in central.select(queue(), 1.0).slots]
    # every running session's item first, then the oldest prompts' pieces up to the token cap
    assert sum(n for _, n in want) == 2048 and any(sid == "s0" for sid, _ in want)
    regime.mode = "speculative"  # the priced path takes every prompt piece its members' deadlines allow
    assert [(s.request.session_id, s.n_tokens) for s in wisp.select(queue(), 1.0).slots] != want
    regime.mode = "centralized"
    assert [(s.request.session_id, s.n_tokens) for s in wisp.select(queue(), 1.0).slots] == want


def test_the_regime_waits_for_the_online_fit_before_its_first_decision(est32):
    """A server starts on `wisp profile`'s fit, which holds no host time per item, so it overrates decoding (H200
    run 40: every fresh engine flipped to the centralized regime and back). The first decision of the mode waits
    for refits (the draft cap does not: tests/test_draft_cap.py)."""
    est = copy.deepcopy(est32)
    est.refit_every = 4
    r = Regime(est, min_samples=4, every_s=0.0, min_refits=2, confirm=1)
    for i in range(8):
        r.observe(f"s{i}", SessionSample(0.1, 30.0, 500), 4.0, 60.0)  # hopeless speculation: decoding wins
    assert r.decide(1.0) == "speculative" and r.last is None  # no refit yet: not decided
    shapes = [ItemShape(1, 500)] * 64
    for _ in range(8):  # two refits on steps as the profile predicts them
        est.observe(est.predict(shapes), shapes)
    assert est.refits == 2
    assert r.decide(2.0) == "centralized" and r.last is not None


def test_decoding_is_chosen_only_while_it_would_serve_every_open_session(est32):
    # the fleet of the flip above (decoding serves more), but more sessions open than decoding could serve: all of
    # them would miss decoded, so the regime stays speculative (H200 run 42: an overloaded fleet flipped and lost)
    r = Regime(est32, min_samples=8, every_s=1.0, confirm=1)
    for i in range(8):
        _observe(r, f"s{i}", 0.66, 2 + i % 3, MAC_M4)
    assert r.decide(0.0, active=10_000) == "speculative"
    assert r.last is not None
    n_dec, limit = r.last.decode, r.last.decode_limit
    assert 0 < n_dec < limit
    assert r.decide(1.0, active=limit + 1) == "speculative"
    assert r.decide(2.0, active=limit) == "centralized"


def test_the_gate_is_decodings_capacity_at_the_slo_itself(est32):
    # N_dec carries the margin m (steps ≤ m × TPOT) for the comparison with speculation; the gate on the open
    # sessions does not: a fleet between the two is still served decoded (H200 run 47: 51 open, N_dec 50-54)
    fleet = _fleet(0.66, 60.0)
    cap = capacities(est32, fleet, MAC_M4, margin=0.9, prompt_per_token=7.0)
    n = cap.decode_limit
    assert step_ms(est32, n, 1, 500, 7 * n) <= 60.0 < step_ms(est32, n + 1, 1, 500, 7 * (n + 1))
    assert cap.decode < n
    assert capacities(est32, fleet, MAC_M4, margin=1.0, prompt_per_token=7.0).decode == n


def test_prompt_work_rides_every_step_in_both_modes(est32):
    # a HumanEval-like fleet at TPOT 60: prompts several times longer than the answers make every step compute-bound
    fleet = _fleet(0.88, 60.0)
    bare = capacities(est32, fleet, MAC_M4)
    heavy = capacities(est32, fleet, MAC_M4, prompt_per_token=7.0)
    assert heavy.decode < bare.decode / 4 and heavy.speculative < bare.speculative / 4, (bare, heavy)
    # N_dec is still the largest batch whose step (its decodes and their share of prompt tokens) fits the SLO
    n = heavy.decode
    assert step_ms(est32, n, 1, 500, 7 * n) <= 54.0 < step_ms(est32, n + 1, 1, 500, 7 * (n + 1))


def test_the_fleets_own_draft_length_is_the_one_priced(est32):
    fleet = _fleet(0.88, 30.0)
    best = capacities(est32, fleet, MAC_M4)
    own = capacities(est32, fleet, MAC_M4, fleet_k=11.2)
    assert own.k == 11 and best.k != 11
    assert own.speculative <= best.speculative


def test_the_regime_measures_prompt_tokens_per_answer_token_of_finished_sessions():
    r = Regime(VerifyTimeEstimator())
    assert r.prompt_per_token() == 0.0
    for _ in range(20):  # HumanEval-like: a 150-token prompt for a 25-token answer
        r.finished(150, 25)
    assert r.prompt_per_token() == pytest.approx(6.0)
    assert r.stats()["prompt_per_token"] == pytest.approx(6.0)
    for _ in range(2000):  # the fleet changes: ShareGPT-like
        r.finished(60, 120)
    assert r.prompt_per_token() == pytest.approx(0.5, rel=0.01)


def test_a_flip_needs_the_same_verdict_confirm_decisions_in_a_row(est32):
    est = copy.deepcopy(est32)
    r = Regime(est, min_samples=8, every_s=1.0, confirm=2)
    for i in range(8):
        _observe(r, f"s{i}", 0.66, 2 + i % 3, MAC_M4)
    assert r.decide(0.0) == "speculative"  # decoding wins once: not yet
    for i in range(8):
        _observe(r, f"s{i}", 0.9, 3 + i % 3, MAC_M4)
    est.refits += 1  # the server's estimator refits every 64 steps
    assert r.decide(1.0) == "speculative"  # speculation wins: the count starts over
    for i in range(8):
        _observe(r, f"s{i}", 0.66, 2 + i % 3, MAC_M4)
    est.refits += 1
    assert r.decide(2.0) == "speculative"
    assert r.leaning == 1
    est.refits += 1
    assert r.decide(3.0) == "centralized"
    assert r.stats()["flips"] == 1
    assert r.decide(3.5) == "centralized"  # within `every_s`: no decision
    assert r.decisions == 4 and r.leaning == 0


def test_the_engine_reports_finished_sessions_to_the_regime():
    import asyncio

    from fake_drive import VOCAB, drive
    from wisp_cloud.backends.fake import FakeBackend
    from wisp_cloud.config import ServerConfig
    from wisp_cloud.server import WispServer

    async def main() -> tuple[float, list[int], int]:
        backend = FakeBackend(VOCAB, base_s=0.001, per_token_s=0.0)
        server = WispServer(backend, ServerConfig(port=0, policy="wisp", admission_target=0.0))
        await server.start()
        try:
            for seed in range(2):  # 40 prompt tokens, 20 new, twice
                await drive(server.url, list(range(5, 45)), 20, 1.0, 3, 60.0, seed=seed)
            regime = server.engine.committer.regime
            assert regime is not None
            return regime.prompt_per_token(), list(regime._batches), regime._steps
        finally:
            await server.stop()

    rho, batches, steps = asyncio.run(main())
    assert rho == pytest.approx(40 / 20, rel=0.02)
    # and every step's items, which bound how many sessions it decodes (`MEASURED_SLACK`): one session at a time
    assert len(batches) == steps > 0 and set(batches) == {1}


@pytest.mark.parametrize("learn", [False, True])
def test_the_simulated_regime_waits_for_the_servers_refits(monkeypatch, learn):
    """The simulator's regime decides as the server's does: only after MIN_REFITS refits, which its estimator
    counts at the server's pace, one every `refit_every` steps: its own refits on the simulated steps with `learn`
    (`wisp simulate --learn`), else a count kept for it."""
    from sim_inputs import sharegpt_32b
    from wisp_cloud.fleet import sim_point, simulate
    from wisp_cloud.fleet.profiles import get_device

    decided: list[tuple[float, int, int]] = []  # each decision's (time, refits so far, leaning + flips)
    decide = Regime.decide

    def spy(self: Regime, now: float, active: int | None = None) -> str:
        before = self._decided_at
        mode = decide(self, now, active)
        if self._decided_at != before:
            decided.append((now, self.estimator.refits, self.leaning + self.flips))
        return mode

    monkeypatch.setattr(Regime, "decide", spy)
    # later than its samples would allow (first at ≈ 3.7 s, 2 refits)
    monkeypatch.setattr(simulate, "MIN_REFITS", 4)
    cfg = sharegpt_32b(
        40,
        policy="wisp",
        controller="wisp",
        devices=60,
        duration_s=10.0,
        warmup_s=2.0,
        drain_s=4.0,
        slo_tpot_ms=30.0,
        device=get_device("mac-m4"),
        learn=learn,
    )
    sim_point.run_point(cfg)
    assert decided and decided[-1][1] >= 4, f"the simulated regime's refits do not advance: {decided[-3:]}"
    # before the refits only the draft cap is decided (tests/test_draft_cap.py): the mode leans nowhere
    assert all(moved == 0 for _, refits, moved in decided if refits < 4), decided


def test_a_session_enters_the_regime_after_sample_rounds_rounds():
    """The server samples a session's speculation after SAMPLE_ROUNDS rounds: 32B / HumanEval sessions, decoded
    for their first 16 tokens and drafting k ≈ 12, rarely reached 4 (H200 runs 46-48)."""
    import asyncio

    from fake_drive import VOCAB, drive
    from wisp_cloud.backends.fake import FakeBackend
    from wisp_cloud.config import ServerConfig
    from wisp_cloud.sched.regime import SAMPLE_ROUNDS
    from wisp_cloud.server import WispServer

    assert SAMPLE_ROUNDS == 2

    async def main() -> list[int]:
        backend = FakeBackend(VOCAB, base_s=0.001, per_token_s=0.0)
        server = WispServer(backend, ServerConfig(port=0, policy="wisp", admission_target=0.0))
        await server.start()
        try:
            regime = server.engine.committer.regime
            assert regime is not None
            counts = []
            # every draft token right, k = 3: a round commits 4 tokens after the Open's one
            for rounds in (1, 2, 3):
                await drive(server.url, list(range(5, 45)), 1 + 4 * rounds, 1.0, 3, 60.0, seed=rounds)
                counts.append(regime.stats()["samples"])
            return [int(c) for c in counts]
        finally:
            await server.stop()

    assert asyncio.run(main()) == [0, 1, 2]


def test_in_the_centralized_regime_decoded_sessions_skip_the_hybrid_check_until_a_decision_is_due(
    monkeypatch,
):
    """A decoded session cannot go back to the edge in the centralized regime: between the regime's decisions the
    check after each decoded token is skipped (it cost ≈ 3.6 µs a token), and its dwell still counts."""
    import asyncio
    import time

    from fake_drive import VOCAB, drive
    from wisp_cloud.backends.fake import FakeBackend
    from wisp_cloud.commit import Committer
    from wisp_cloud.config import ServerConfig
    from wisp_cloud.server import WispServer

    # every full hybrid check asks the regime first (`Committer._decide`); the skipped ones do not
    calls: list[str] = []
    decide = Committer._decide

    def spy(self: Committer, regime, now):  # type: ignore[no-untyped-def]
        mode = decide(self, regime, now)
        calls.append(mode)
        return mode

    monkeypatch.setattr(Committer, "_decide", spy)

    async def main() -> tuple[list[str], dict[str, int]]:
        backend = FakeBackend(VOCAB, base_s=0.001, per_token_s=0.0)
        server = WispServer(backend, ServerConfig(port=0, policy="wisp", admission_target=0.0))
        await server.start()
        try:
            committer = server.engine.committer
            regime = committer.regime
            assert regime is not None
            regime.mode, regime.min_samples, regime.probe_every = "centralized", 1 << 30, 1 << 30
            # a decision taken now, the next an hour away
            regime.every_s, regime._decided_at = 3600.0, time.monotonic()
            run = await drive(server.url, list(range(5, 45)), 40, 1.0, 3, 60.0, seed=0)
            assert run.modes == ["centralized"], run.modes  # moved at its first verdict, never back
            return calls, dict(committer.switch_counts)
        finally:
            await server.stop()

    calls_made, counts = asyncio.run(main())
    assert calls_made == ["centralized"], calls_made  # the move; no check after the ≈ 35 decoded tokens
    assert counts.get("centralized") == 1 and not counts.get("speculative"), counts


def test_a_flip_waits_while_the_capacity_it_trusts_is_still_moving(est32):
    """On an H200 (7B, Mac mini, ShareGPT, TPOT 60; runs 64, 67, 68, 72) the first decisions after the online refits
    read N_dec 527-574, then 401-439, then ≈ 290-335, and the flips to decoding that came on the second or third
    decision lost 6-47 points of attainment. A decision whose N_dec moved more than `STEADY` since the last counted
    one starts the count over; one on the same estimator fit as the last counted one adds nothing."""
    est = copy.deepcopy(est32)
    r = Regime(est, min_samples=8, every_s=1.0, confirm=2)

    def fleet(tpot_ms: float) -> None:
        for i in range(8):
            k = 2 + i % 3
            r.observe(f"s{i}", SessionSample(0.66, tpot_ms, 500), k, MAC_M4.ms(k))

    fleet(30.0)
    assert r.decide(0.0) == "speculative" and r.leaning == 1  # decoding wins once: not yet
    assert r.last is not None
    first = r.last.decode
    est.refits += 1
    fleet(45.0)  # decoding still wins, at an N_dec far from the last decision's
    assert r.decide(1.0) == "speculative" and r.leaning == 0  # moved: counts nothing, the count ends
    assert r.last.decode > 1.1 * r.last.speculative and abs(r.last.decode - first) > 0.1 * first
    # the same N_dec, but on the same fit: read against the fit before, it has still moved
    assert r.decide(2.0) == "speculative" and r.leaning == 0
    est.refits += 1
    assert r.decide(3.0) == "speculative" and r.leaning == 1  # the same N_dec on the next fit: counts
    est.refits += 1
    assert r.decide(4.0) == "centralized"  # and once more: confirmed


def _sampled(est32: VerifyTimeEstimator) -> tuple[VerifyTimeEstimator, Regime]:
    """A regime on its own copy of the estimator, with one session's sample in (decisions may come)."""
    est = copy.deepcopy(est32)
    r = Regime(est, min_samples=1, every_s=1.0, confirm=2)
    r.observe("s", SessionSample(0.7, 60.0, 500), 6.0, 120.0)
    return est, r


def _fixed(r: Regime, monkeypatch: pytest.MonkeyPatch, caps: Capacities) -> None:
    """Every decision of `r` reads `caps`."""
    monkeypatch.setattr(r, "_capacities", lambda samples, fleet_k, slack_ms=0.0: caps)


def test_a_jump_after_a_decision_to_stay_starts_no_count(est32, monkeypatch):
    """H200 run 82 (7B, Jetson, code10, 720 devices): N_dec read 341, 328 (speculation held), then 595, 708, 700 on
    three refits. The jump to 595 started a count, 708 -> 700 confirmed it, and the fleet flipped to decoding, met
    0.69 where it had met 0.80 speculating, and N_dec read 458, then 291, after the flip. Each decision is read
    against the one on the fit before it, whatever that one said."""
    est, r = _sampled(est32)
    reads = [
        (341, 350),
        (328, 347),
        (595, 341),
        (708, 383),
        (700, 356),
        (458, 370),
        (700, 356),
        (705, 350),
        (702, 352),
    ]
    it = iter(reads)

    def scripted(samples, fleet_k, slack_ms=0.0):
        dec, spec = next(it)
        return Capacities(dec, spec, 7, 40.0, 10 * dec)

    monkeypatch.setattr(r, "_capacities", scripted)
    modes, leaning = [], []
    for t in range(len(reads)):
        est.refits += 1
        modes.append(r.decide(float(t), active=500))
        leaning.append(r.leaning)
    # stay, stay, then 595 (moved from 328), 708 (moved), 700 (held: counts), 458 (moved: the count ends)
    assert leaning[:6] == [0, 0, 0, 0, 1, 0] and modes[:6] == ["speculative"] * 6
    # 700, then 705 and 702 on the next fits: held twice, the flip comes
    assert leaning[6:8] == [0, 1] and modes[-1] == "centralized" and r.flips == 1


def _decoded(
    r: Regime, est: VerifyTimeEstimator, ms: float, steps: int = DRAIN_STEPS + GATE_STEPS, left: int = 0
) -> None:
    """`steps` steps of `ms` each ran (500 items, `left` left waiting), on a fresh fit."""
    for _ in range(steps):
        r.stepped(ms, 500, left=left)
    est.refits += 1


def test_decoding_that_no_longer_serves_the_open_sessions_hands_the_fleet_back(est32, monkeypatch):
    """H200 run 83 (7B, Jetson, code10, 720 devices): the fit read on speculative steps put N_dec at 663 and the fleet
    flipped with 567 open; the fits on decode steps then read a limit of 418 and 318 with 632-639 open, and the fleet
    stayed decoded, missing, to the end of the point. While decoding, `confirm` decisions in a row that see the drained
    decode steps run longer than the quantile TPOT (60 ms here) send it back, and it is decoded again only with at
    most as many open as their period would serve."""
    est, r = _sampled(est32)
    _fixed(r, monkeypatch, Capacities(663, 365, 7, 40.0, 743))
    modes = []
    for t in range(2):  # decoding wins, steady twice: decoded
        est.refits += 1
        modes.append(r.decide(float(t), active=567))
    assert modes == ["speculative", "centralized"]
    _decoded(r, est, 80.0, DRAIN_STEPS + GATE_STEPS - 1)  # not yet measured: no count
    assert r.decide(2.0, active=630) == "centralized" and r.decode_ceiling is None
    _decoded(r, est, 80.0, 1)
    assert r.decide(3.0, active=630) == "centralized"
    _decoded(r, est, 80.0)
    assert r.decide(4.0, active=640) == "speculative"
    assert r.decode_ceiling == int(640 * 60.0 / 80.0) == 480
    for t in range(5, 8):  # the fit still says decode: held under the ceiling
        est.refits += 1
        assert r.decide(float(t), active=500) == "speculative"
    for t in range(8, 10):  # the load falls under it: decoding may be chosen again (steady twice)
        est.refits += 1
        modes.append(r.decide(float(t), active=470))
    assert modes[-1] == "centralized" and r.decode_ceiling is None
    assert r.flips == 3 and r.stats()["decode_ceiling"] == -1


def test_drained_decode_steps_within_the_slo_keep_the_fleet_decoded(est32, monkeypatch):
    """H200 run 90 (32B, Jetson, code10, 288 devices): the fits on the transition's mixed steps put the limit at
    176-220 with 233-249 open, and the fleet went back to speculation after 4 s (WISP 0.88, centralized 1.00, whose
    234-item decode steps ran 54 ms against a 60-ms TPOT). The gate reads the steps themselves: the transition's
    long ones are drained, and 54-ms decode steps keep the fleet decoded whatever the fit says."""
    est, r = _sampled(est32)
    r.mode = "centralized"
    _fixed(r, monkeypatch, Capacities(155, 108, 7, 40.0, 176))
    _decoded(r, est, 110.0, DRAIN_STEPS)  # the speculative rounds still in flight
    for t in range(6):
        _decoded(r, est, 54.0)
        assert r.decide(float(t), active=249) == "centralized"
    assert r.flips == 0 and r.decode_ceiling is None


def test_decodes_left_waiting_count_in_the_period_a_decoded_session_sees(est32, monkeypatch):
    """A decode left waiting rides a later step: at max_batch (H200 run 92, centralized at 336 devices: 256 items
    and 28 left a step) steps of 60-62 ms gave a TPOT p50 of 65 ms. Simulated on run 92 at 336 devices, a decoded
    fleet whose steps' mean period read 58-60 ms stayed decoded at 0.42 attainment where speculating served 0.74 on
    the GPU. The gate reads the period times the ready work over the work that rode."""
    est, r = _sampled(est32)
    r.mode = "centralized"
    _fixed(r, monkeypatch, Capacities(600, 200, 5, 40.0, 640))  # the fit still says decoding serves them
    _decoded(r, est, 54.0, DRAIN_STEPS)
    modes = []
    for t in range(2):
        _decoded(r, est, 54.0, left=60)  # 54 × 560 / 500 = 60.5 ms > 60
        modes.append(r.decide(float(t), active=560))
    assert modes == ["centralized", "speculative"] and r.decode_ceiling == int(560 * 60.0 / 60.48), (
        r.decode_ceiling
    )


def test_decoding_is_chosen_only_for_as_many_sessions_as_recent_steps_held(est32, monkeypatch):
    """H200 runs 83-84 (7B, Jetson, code10): speculative steps held 70-120 items, and as the estimator's window of
    decode steps turned over N_dec rose to 620-700; the fleet flipped with 540-640 open, and the decode steps that
    followed put N_dec at 284-437. At 32B (run 78) the flips came with 14-17 open and steps of 11-17 items."""
    est, r = _sampled(est32)
    _fixed(r, monkeypatch, Capacities(700, 360, 7, 40.0, 780))
    for _ in range(600):
        r.stepped(25.0, 120)
    for t in range(4):
        est.refits += 1
        assert r.decide(float(t), active=560) == "speculative"  # 560 > 1.25 × 120
    assert r.leaning == 0
    for _ in range(600):  # the steps grow (sessions decoded on the server, a burst of rounds)
        r.stepped(40.0, 480)
    est.refits += 1
    assert r.decide(10.0, active=560) == "speculative" and r.leaning == 1
    est.refits += 1
    assert r.decide(11.0, active=560) == "centralized"


def test_gpu_bound_steps_let_decoding_serve_more_sessions_than_they_held(est32, monkeypatch):
    """H200 run 89 (32B, Jetson, code10): N_dec 201-238 against N_spec 115-138 with 223-302 open, steps of 65-111
    items, host work 4-7 % of a step: the fit's extrapolation holds there, and the gate cost WISP 0.87 against
    centralized's 0.98. Steps that are mostly host work (7B, runs 83-85: 18-20 %) still gate it."""
    for host_ms, flips in ((2.0, True), (8.0, False)):  # of 40-ms steps: a share of 0.05, then 0.2
        est, r = _sampled(est32)
        _fixed(r, monkeypatch, Capacities(235, 125, 7, 40.0, 260))
        for _ in range(600):
            r.stepped(40.0, 100, host_ms)
        modes = []
        for t in range(3):
            est.refits += 1
            modes.append(r.decide(float(t), active=240))  # 240 > 1.25 × 100
        assert (modes[-1] == "centralized") is flips, (host_ms, modes, r.host_share)


def test_a_probe_in_the_centralized_regime_drafts_at_most_probe_cap_and_adds_no_device_line_point(est32):
    """H200 run 75 (32B / HumanEval / TPOT 30): held decoded, WISP met 0.91 with its probes' k ≈ 7 rounds in every
    step and 0.97 without them. In the centralized regime a probe drafts at most `PROBE_CAP`; its α still counts,
    but its capped rounds would read as the fleet's device line and its own k."""
    r = Regime(copy.deepcopy(est32), min_samples=1)
    assert r.cap_for(True) == r.cap_for(False) == 0  # speculative regime: no cap
    r.mode = "centralized"
    assert r.cap_for(True) == PROBE_CAP and r.cap_for(False) == 0
    r.draft_cap = 1
    assert r.cap_for(True) == 1 and r.cap_for(False) == 1  # the fleet's tighter cap holds for all
    r.observe("p", SessionSample(0.8, 60.0, 500), 2.0, 60.0, probe=True)
    assert r.sample_count == 1 and r._line.mean_k() is None
    r.observe("s", SessionSample(0.8, 60.0, 500), 6.0, 120.0)
    assert r._line.mean_k() == 6.0
