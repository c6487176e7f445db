"""`wisp simulate --validate` (fleet/sim_validate.py): each bench point is re-simulated with its own arm and its own
TPOT SLO, judged at every SLO the bench judged it at; and the simulated draft pays the feed a real draft pays.

Before this, a bench with `--slo-tpot-ms 30,60` had its WISP points at 30 and at 60 simulated at one SLO (identical
numbers for both), ablation arms (`wisp~no-hybrid`, `wisp+fixed:3`) were simulated as plain WISP, and the trace
replayed was the CLI's default workload's, not the bench's.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from sim_inputs import sharegpt_32b
from wisp_cloud.fleet.profiles import DeviceProfile, get_device, get_link
from wisp_cloud.fleet.sim_point import run_point
from wisp_cloud.fleet.sim_validate import arm_config, mark_saturation, validate_points
from wisp_cloud.fleet.simulate import SimConfig
from wisp_sdk.errors import WispError


def _base(**over) -> SimConfig:
    cfg = sharegpt_32b(
        30,
        policy="centralized",
        controller="",
        devices=40,
        duration_s=6.0,
        warmup_s=1.5,
        slo_tpot_ms=30.0,
        device=get_device("mac-m4"),
        drain_s=5.0,
    )
    return replace(cfg, **over)


def test_arm_specs_map_onto_the_simulators_switches():
    base = _base(policy_kw={"fill": True, "refuse": False})
    c = arm_config(base, "wisp~no-fill~no-hybrid", "wisp")
    assert (c.policy, c.controller, c.hybrid, c.truncate) == ("wisp", "wisp", False, True)
    assert c.policy_kw == {"fill": False, "refuse": False}
    c = arm_config(base, "wisp~no-truncate~refuse", "wisp")
    assert (c.hybrid, c.truncate, c.policy_kw) == (True, False, {"fill": True, "refuse": True})
    c = arm_config(base, "wisp+fixed:3", "fixed:3")
    assert (c.policy, c.controller) == ("wisp", "fixed:3")
    c = arm_config(base, "wisp~no-start-on-server", "wisp")
    assert (c.start_on_server, c.regime, c.hybrid) == (False, True, True) and base.start_on_server
    c = arm_config(base, "sled", "fixed:5")
    assert (c.policy, c.controller, c.policy_kw) == ("sled", "fixed:5", None)
    with pytest.raises(WispError, match="no-refuse"):  # run 19's flag name, gone since: skipped, not guessed
        arm_config(base, "wisp~no-refuse", "wisp")
    with pytest.raises(WispError, match="drafts ahead"):
        arm_config(base, "wisp+wisp+ahead", "wisp+ahead")


def test_below_saturation_is_goodput_still_rising_or_attainment_met():
    rows = [
        {"n": n, "bench_goodput": g, "bench_attainment": a, "slo_judged": 30.0}
        for n, g, a in ((48, 1100.0, 0.77), (96, 1400.0, 0.47), (160, 1000.0, 0.22), (224, 900.0, 0.95))
    ]
    for r in rows:
        r.update(policy="sled", controller="fixed:3", slo_asked=30.0, device="d", link="l")
    mark_saturation(rows)
    assert [r["below_saturation"] for r in rows] == [True, False, False, True]


def _point(policy: str, controller: str, n: int, asked: float, judged: list[float]) -> dict:
    return {
        "policy": policy,
        "controller": controller,
        "n": n,
        "slo_tpot_ms": asked,
        "device": "mac-m4",
        "link": "metro-edge",
        "tpot_p50_ms": 25.0,
        "ttft_p50_ms": 60.0,
        "sessions": 50,
        "acceptance": 0.6,
        "tokens_per_round": 3.0,
        "judged": {f"{x:g}": {"attainment": 0.9, "goodput_tok_s": 1000.0, "met": 45} for x in judged},
    }


def test_each_point_asks_its_own_slo_and_is_judged_at_the_bench_slos(monkeypatch):
    monkeypatch.setattr("wisp_cloud.fleet.sim_validate.SEEDS", 1)
    bench = {
        "config": {
            "slo": {"ttft_ms": 2000.0, "tpot_ms": 30.0},
            "device_profiles": [vars(get_device("mac-m4")) | {}],
            "link_profiles": [vars(get_link("metro-edge")) | {}],
        },
        "points": [
            _point("sled", "fixed:3", 40, 30.0, [30.0, 60.0]),
            _point("wisp", "wisp", 40, 30.0, [30.0]),
            _point("wisp", "wisp", 40, 60.0, [60.0]),
            _point("wisp~no-refuse", "wisp", 40, 30.0, [30.0]),
        ],
    }
    # without the regime: with it, both WISP points decode every session on the server and meet both SLOs
    rows, notes = validate_points(bench, _base(regime=False))
    assert len(notes) == 1 and "wisp~no-refuse" in notes[0]
    keyed = {(r["policy"], r["slo_asked"], r["slo_judged"]): r for r in rows}
    assert set(keyed) == {
        ("sled", 30.0, 30.0),
        ("sled", 30.0, 60.0),
        ("wisp", 30.0, 30.0),
        ("wisp", 60.0, 60.0),
    }
    # one SLED run judged twice: the looser SLO meets at least as many sessions
    assert keyed[("sled", 30.0, 60.0)]["sim_attainment"] >= keyed[("sled", 30.0, 30.0)]["sim_attainment"]
    # WISP asked at 60 is a different run from WISP asked at 30 (its deadlines read the SLO)
    w30, w60 = keyed[("wisp", 30.0, 30.0)], keyed[("wisp", 60.0, 60.0)]
    assert (w30["sim_goodput"], w30["sim_tpot_p50_ms"]) != (w60["sim_goodput"], w60["sim_tpot_p50_ms"])
    assert w60["sim_attainment"] > w30["sim_attainment"]


def test_a_fully_accepted_draft_feeds_its_last_token_with_the_next():
    """DraftRunner.sync after a round whose k drafts were all accepted feeds two tokens (the last draft, never fed,
    and the verdict's): a prefill step. Every round of an always-accepted trace pays it, so a 38 ms dearer prefill
    token adds ≈ 38 ms per 4-token round to TPOT; with the one-token feed charged before, only the first round's
    (one-token) prompt prefill changed, ≈ 1 ms per token."""
    always = [{"accepted": [1] * 400, "top1": [0.9] * 400, "entropy": [0.2] * 400}]

    def tpot(prefill_ms: float) -> float:
        dev = DeviceProfile("d", 2.0, prefill_ms, "test", "derived", jitter=0.0)
        cfg = _base(policy="sled", controller="fixed:3", devices=8, trace=always, device=dev)
        s = run_point(replace(cfg, lengths=[40] * 30, prompt_tokens=[1] * 30))
        assert s["sessions"] >= 8 and s["tokens_per_round"] == pytest.approx(4.0, abs=0.2)
        return float(s["tpot_p50_ms"])

    assert tpot(40.0) - tpot(2.0) > 6.0


def test_device_round_time_is_paid_once_per_round():
    """`--device-round-ms`: time on the device per round besides drafting delays every round's send."""
    always = [{"accepted": [1] * 400, "top1": [0.9] * 400, "entropy": [0.2] * 400}]
    cfg = _base(
        policy="sled",
        controller="fixed:3",
        devices=8,
        trace=always,
        lengths=[40] * 30,
        prompt_tokens=[1] * 30,
    )
    t0 = run_point(cfg)["tpot_p50_ms"]
    t20 = run_point(replace(cfg, device_round_ms=20.0))["tpot_p50_ms"]
    assert 3.5 < t20 - t0 < 7.0  # 20 ms per 4-token round


def test_a_file_that_is_no_bench_result_is_one_clear_error(tmp_path, capsys):
    from wisp_sdk.cli import main

    bad = tmp_path / "bench.json"
    bad.write_text('{"kind": "something else"}')
    for path in (bad, tmp_path / "missing.json"):
        assert main(["simulate", "--validate", str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert "not a readable `wisp bench` result" in err and "Traceback" not in err


def test_validate_re_simulates_at_the_bench_servers_max_batch(tmp_path, monkeypatch):
    """`--validate` takes the bench server's `--max-batch` (a run at 256 re-simulated at the CLI's default 64
    would serve a quarter of its decodes per step)."""
    from wisp_sdk.cli import main

    seen: list[int] = []

    def fake_validate(args, base, bench, path, out):
        seen.append(base.max_batch)
        return 0

    monkeypatch.setattr("wisp_cloud.fleet.sim_validate.validate", fake_validate)
    bench = {
        "kind": "wisp-bench",
        "config": {
            "serve": ["wisp", "serve", "--max-batch", "256", "--kv-budget-tokens", "400000"],
            "slo": {"ttft_ms": 2000.0, "tpot_ms": 60.0},
            "prompt_tokens": [10, 20],
            "lengths": [8, 8],
            "duration_s": 5.0,
            "warmup_s": 1.0,
            "drain_s": 5.0,
            "mean_gap_s": 1.0,
            "trace": "",
        },
        "points": [],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    assert main(["simulate", "--validate", str(path), "--out", str(tmp_path / "out")]) == 0
    bench["config"]["serve"] = ["wisp", "serve"]  # none given: the command's own
    path.write_text(json.dumps(bench))
    assert (
        main(["simulate", "--validate", str(path), "--max-batch", "32", "--out", str(tmp_path / "out")]) == 0
    )
    assert seen == [256, 32]
