"""The draft cap (sched/regime.py, docs/scheduling.md §13; `wisp serve --draft-cap`, off by default): under load
the regime caps drafts at the draft length that serves the most sessions at their SLO, every verdict carries it
(`Verdict.draft_cap`, protocol 4), the SDK drafts no more, and the server verifies no more of a round drafted before
it was set. Output stays the target's."""

from __future__ import annotations

import json

import pytest
from cli_process import ServerProcess
from pydantic import ValidationError
from sim_inputs import EST_32B
from wisp_cloud.deadlines import expected_committed
from wisp_cloud.estimator import VerifyTimeEstimator
from wisp_cloud.sched.capacity import DeviceLine, SessionSample, capacities
from wisp_cloud.sched.regime import STEP_STEPS, Regime
from wisp_sdk import EdgeClient, FixedK, Wisp
from wisp_sdk.errors import ProtocolError
from wisp_sdk.protocol import PROTOCOL_VERSION, Verdict, decode_verdict, encode_verdict, new_session_id

JETSON = DeviceLine(20.0, 18.5)  # Jetson Orin-class drafts (18.5 ms a token) on wifi-metro (20 ms)


@pytest.fixture(scope="module")
def est32() -> VerifyTimeEstimator:
    return VerifyTimeEstimator.from_dict(json.loads(EST_32B.read_text()))


# ---- protocol ----


def test_the_verdict_carries_the_cap_since_protocol_4():
    assert PROTOCOL_VERSION >= 4
    msg = Verdict(
        session_id=new_session_id(), round=3, committed_len=9, accepted=1, next_token=4, draft_cap=3
    )
    frame = encode_verdict(msg)
    assert decode_verdict(frame) == msg
    blank = Verdict(session_id=msg.session_id, round=3, committed_len=9, accepted=1, next_token=4)
    assert decode_verdict(encode_verdict(blank)).draft_cap == 0  # no cap
    # a v3 frame (no draft_cap) is refused with one clear error, not misread
    v3 = bytes([3]) + frame[1:-6] + frame[-4:]
    with pytest.raises(ProtocolError, match=f"protocol version 3, expected {PROTOCOL_VERSION}"):
        decode_verdict(v3)
    with pytest.raises(ValidationError):
        Verdict(session_id=msg.session_id, round=3, committed_len=9, accepted=1, next_token=4, draft_cap=-1)


# ---- the regime ----


def _loaded(
    r: Regime, k: float, n: int = 64, alpha: float = 0.82, line: DeviceLine = JETSON, finished: bool = True
) -> None:
    """n sessions' samples of a code-like fleet at TPOT 60, drafting rounds of about k tokens (and, `finished`,
    sessions that ended: ρ is known, 0 here)."""
    if finished:
        r.finished(0, 100)
    for i in range(n):
        kk = max(1.0, k + (i % 5 - 2))  # rounds of varying length: the device line is determined
        r.observe(f"s{i}", SessionSample(alpha, 60.0, 500), kk, line.ms(round(kk)))


def test_a_loaded_fleet_that_drafts_long_is_capped_at_the_best_k(est32):
    r = Regime(est32, every_s=1.0, cap=True)
    _loaded(r, 8.0)
    samples = [SessionSample(0.82, 60.0, 500)] * 64
    best = capacities(est32, samples, r.device())
    own = capacities(est32, samples, r.device(), fleet_k=8.0)
    assert best.k < own.k and best.speculative > own.speculative, (best, own)  # the premise
    r.decide(0.0, active=best.speculative)  # loaded: the open sessions reach speculation's capacity
    assert r.draft_cap == best.k and r.stats()["draft_cap"] == best.k
    assert r.last is not None and r.last.k == best.k  # speculation is priced at the k the fleet will draft
    assert r.fleet is not None and r.fleet.k == own.k  # ... and the fleet's own, logged beside it


def test_no_cap_before_a_session_has_finished(est32):
    """Until then the prompt ratio is unknown, and the best k would be priced as if prompts cost nothing."""
    r = Regime(est32, every_s=1.0, cap=True)
    _loaded(r, 8.0, finished=False)
    r.decide(0.0, active=500)
    assert r.draft_cap == 0
    r.finished(0, 100)
    r.decide(1.0, active=500)
    assert r.draft_cap > 0


def test_no_cap_below_the_load_where_it_matters_or_when_turned_off(est32):
    r = Regime(est32, every_s=1.0, cap=True)
    _loaded(r, 8.0)
    r.decide(0.0, active=2)  # a quiet server: a long draft costs no one
    assert r.draft_cap == 0 and r.last is not None and r.last.k == 8
    off = Regime(est32, every_s=1.0)  # the default: no cap
    _loaded(off, 8.0)
    off.decide(0.0, active=10_000)
    assert off.draft_cap == 0


def _capped(est: VerifyTimeEstimator) -> tuple[Regime, DeviceLine, int]:
    """A regime with the cap on over a loaded fleet drafting k ≈ 8, after its first decision: the regime, its
    device line, and the cap it set (a shorter k)."""
    r = Regime(est, every_s=1.0, cap=True)
    _loaded(r, 8.0)
    line = r.device()
    r.decide(0.0, active=500)
    cap = r.draft_cap
    assert 0 < cap < 8
    return r, line, cap


def test_the_cap_holds_once_the_fleet_drafts_it_and_the_device_line_stands(est32):
    r, line, cap = _capped(est32)
    # the capped fleet now drafts exactly the cap: its draft lengths no longer vary
    for j in range(2000):
        r.observe(f"s{j % 64}", SessionSample(0.82, 60.0, 500), float(cap), JETSON.ms(cap))
    assert r.device() == line  # all per token, the cap's time would make every shorter k look cheap
    r.decide(1.0, active=500)
    assert r.draft_cap == cap  # its own k is now the cap's, and the cap holds while the load does
    r.decide(2.0, active=2)
    assert r.draft_cap == 0  # the load fell
    # without the cap the regime reads the device line as session 14's did: all per token once lengths stop varying
    off = Regime(est32)
    _loaded(off, 8.0)
    for j in range(2000):
        off.observe(f"s{j % 64}", SessionSample(0.82, 60.0, 500), float(cap), JETSON.ms(cap))
    assert off.device().fixed_ms == 0.0 and off.device().ms(cap) == pytest.approx(JETSON.ms(cap), rel=0.01)


def _allowed_ms(line: DeviceLine, k: int, alpha: float = 0.82, tpot_ms: float = 60.0) -> float:
    """The longest step at which a session at `alpha` meets its TPOT (no margin) drafting k: half a step's wait
    and one step after its device's time."""
    return (expected_committed(k, alpha) * tpot_ms - line.ms(k)) / 1.5


def test_a_cap_without_slack_at_its_measured_steps_is_given_up_while_the_load_lasts(est32):
    """H200 run 57 (7B, Jetson, code10): the best k (3) allowed 22-34 ms steps where they ran 50-54 ms, and the
    capped fleet missed its SLO. Once its steps are measured a cap stays only where the quantile session meets its
    TPOT at them."""
    r = Regime(est32, every_s=1.0, cap=True)
    _loaded(r, 8.0)
    line = r.device()
    for _ in range(500):
        r.stepped(1000.0)  # steps measured before the cap say nothing about it
    r.decide(0.0, active=500)
    cap = r.draft_cap
    assert 0 < cap < 8 and r.measured_step_ms == 1000.0
    for _ in range(STEP_STEPS - 1):
        r.stepped(_allowed_ms(line, cap) + 5.0)  # a little longer than the cap allows
    r.decide(1.0, active=500)
    assert r.draft_cap == cap  # not yet measured: it holds
    r.stepped(_allowed_ms(line, cap) + 5.0)
    r.decide(2.0, active=500)
    assert r.draft_cap == 0 and r.no_slack and r.last is not None and r.last.k == 8  # priced at the fleet's k
    for _ in range(500):
        r.stepped(1.0)
    r.decide(3.0, active=500)
    assert r.draft_cap == 0  # given up while the load lasts
    r.decide(4.0, active=2)
    r.decide(5.0, active=500)
    assert r.draft_cap == cap and not r.no_slack  # a new load: tried again


def test_a_cap_with_slack_stays_at_the_best_k_that_has_it(est32):
    r, line, cap = _capped(est32)
    step = _allowed_ms(line, cap) - 1.0  # the cap meets the TPOT at its steps
    for _ in range(STEP_STEPS):
        r.stepped(step)
    r.decide(1.0, active=500)
    # the best k overall has slack, so it stays the best among those that do
    assert r.draft_cap == cap and not r.no_slack


# ---- end to end: the SDK drafts no more than the verdict's cap, and the output is the target's ----


@pytest.fixture(scope="module")
def capped(tiny_target, tiny_bundle):
    srv = ServerProcess(tiny_target, 0, "--policy", "wisp", "--debug-draft-cap", "2")
    client = EdgeClient(srv.url, tiny_bundle, threads=1)
    yield client
    client.close()
    srv.stop()


@pytest.mark.parametrize("controller", [FixedK(6), Wisp(max_draft=16)], ids=["fixed:6", "wisp"])
def test_the_sdk_drafts_no_more_than_the_cap_and_greedy_is_the_targets(capped, reference, controller):
    prompt = "def fibonacci(n):\n"
    ids = capped.encode_prompt(prompt)
    res = capped.generate(prompt, max_new_tokens=32, controller=controller)
    assert res.token_ids == reference(ids, 32)
    rounds = res.stats.rounds
    assert len(rounds) > 3 and all(r.drafted <= 2 for r in rounds[1:]), [r.drafted for r in rounds]
    if isinstance(controller, FixedK):
        # the first round was drafted before any verdict (6 tokens): the server verified only the cap's 2
        assert rounds[0].drafted == 6 and rounds[0].unverified == 4


def test_the_cap_is_set_before_the_online_refits_the_mode_waits_for_them(est32):
    """An uncapped fleet's long rounds cost every step until the first decision (H200 run 55: 77-104 ms steps for
    10-15 s); the cap ranks draft lengths on the start-up fit, the mode waits for the refits (test_regime.py)."""
    r = Regime(est32, every_s=1.0, min_refits=2, cap=True)
    _loaded(r, 8.0)
    r.decide(0.0, active=500)
    assert r.draft_cap > 0 and r.mode == "speculative" and r.leaning == 0


def _with_bad(r: Regime) -> Regime:
    """A fleet at 0.85, and one session that met a bad round early: 1 of 4 tries."""
    for i in range(20):
        r.observe(f"s{i}", SessionSample(0.8, 60.0, 500, accepted=17.0, tried=20.0), 3.0, 80.0)
    r.observe("bad", SessionSample(0.5, 60.0, 500, accepted=1.0, tried=4.0), 3.0, 80.0)
    return r


def test_a_sessions_alpha_is_shrunk_toward_the_fleets_with_the_cap(est32):
    r = _with_bad(Regime(est32, cap=True))
    shrunk = {s.alpha for s in r.fleet_samples()}
    rate = (20 * 17.0 + 1.0) / (20 * 20.0 + 4.0)
    assert min(shrunk) == pytest.approx((1.0 + 8.0 * rate) / 12.0)  # 0.65, not the 0.25 its tries alone say
    assert max(shrunk) == pytest.approx((17.0 + 8.0 * rate) / 28.0)
    # without the cap (the default) the regime reads the samples as they are, as runs 45-53 measured it
    assert Regime(est32)._samples == {} and {s.alpha for s in _with_bad(Regime(est32)).fleet_samples()} == {
        0.8,
        0.5,
    }
    # samples without counts (older callers) pass through
    plain = Regime(est32, cap=True)
    plain.observe("x", SessionSample(0.6, 60.0, 500), 3.0, 80.0)
    assert plain.fleet_samples()[0].alpha == 0.6
