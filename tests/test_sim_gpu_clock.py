"""The simulated GPU's clock (cloud/wisp_cloud/fleet/gpu_clock.py): serial host time per step and the varlen view.

What the H200 `steps` logs show (docs/benchmarks.md, "Engine figures"): a centralized step at B ≈ 180–250 decodes
holds the GPU 1.8–2.3× its forward (7–12 ms of host work that the next decode waits for), a verify step of
12–14 rounds 1.09–1.11×. These tests hold the model to those figures and check that it moves the simulator's
centralized prediction the way the data does: longer steps, higher TPOT, more for centralized than for WISP.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from wisp_cloud.estimator import ItemShape, VerifyTimeEstimator
from wisp_cloud.fleet.gpu_clock import GpuClock, HostTime, resolve_host, varlen_view
from wisp_cloud.fleet.profiles import get_device, get_link
from wisp_cloud.fleet.sim_point import run_point
from wisp_cloud.fleet.simulate import SimConfig
from wisp_cloud.sched import Batch, Request, Slot
from wisp_sdk.errors import WispError

REPO = Path(__file__).resolve().parents[1]
CAP = REPO / "bench/results/capacity"
EST_32B = CAP / "est-h200-run13-32b-online.json"


def _est(path: Path = EST_32B) -> dict:
    return json.loads(path.read_text())


def _batch(kind: str, n: int, new: int, ctx: int = 120) -> Batch:
    slots = []
    for i in range(n):
        req = Request(f"s{i}", kind, new, ctx, deadline=1.0, arrival=0.0)  # type: ignore[arg-type]
        slots.append(Slot(req, 0, new))
    return Batch(slots, 0.0)


def test_host_time_matches_the_steps_logs():
    """The default reproduces the measured host gaps: run 12's centralized B = 232 → 11.5 ms (p50), run 13's
    B = 187 → 7.8 ms; a 14-round verify step (run 12's WISP) → 0.4–0.6 ms."""
    h = HostTime.default()
    assert 7.0e-3 <= h.step_s(232, 0) <= 11.6e-3
    assert 6.0e-3 <= h.step_s(187, 0) <= 9.0e-3
    assert 0.4e-3 <= h.step_s(0, 14) <= 0.8e-3
    assert h.step_s(0, 0) == 0.0


def test_clock_step_over_forward_is_the_measured_one():
    """With host time a 200-decode step holds the GPU far longer than its forward (measured 1.8–2.3× at 7B); a
    small verify step barely longer (1.03–1.11×). Without it, both equal the forward (the old simulator)."""
    est = _est(CAP / "est-h200-run12-7b-online.json")
    on, off = GpuClock(est, asdict(HostTime.default())), GpuClock(est, None)
    dec, ver = _batch("decode", 200, 1), _batch("verify", 14, 5)
    fwd_dec, fwd_ver = off.step_s(dec), off.step_s(ver)
    assert fwd_dec > 0 and fwd_ver > 0
    assert on.step_s(dec) / fwd_dec >= 1.4  # serial host work is a large part of a big decode step
    assert 1.0 < on.step_s(ver) / fwd_ver <= 1.15


def test_varlen_view_keeps_homogeneous_batches_and_drops_padding_on_mixed_ones():
    est = _est()
    assert "pad_rows" in est["features"] and est["meta"]["backend"] == "paged"
    view = varlen_view(est)
    assert not any(f.startswith("pad_") for f in view["features"])
    old, new = VerifyTimeEstimator.from_dict(est), VerifyTimeEstimator.from_dict(view)
    homo = [ItemShape(1, 120)] * 100
    assert new.predict(homo) == pytest.approx(old.predict(homo), rel=1e-9)
    mixed = [ItemShape(1, 120)] * 70 + [ItemShape(45, 0)] * 3  # decodes beside prompt chunks: no padded rows
    assert new.predict(mixed) < 0.8 * old.predict(mixed)
    cpu = VerifyTimeEstimator.default().to_dict()  # not a paged estimator: untouched
    assert varlen_view(cpu) is cpu


def test_resolve_host_choices(tmp_path):
    est = _est()
    assert resolve_host(est, "off") is None
    assert resolve_host(est, "auto") == asdict(HostTime.default())  # no host block: the documented default
    block = {"decode_per_item_ms": 0.05, "verify_per_item_ms": 0.03, "verify_fixed_ms": 0.5, "source": "mine"}
    got = resolve_host({**est, "host": block}, "auto")
    assert got is not None and got["decode_per_item_s"] == pytest.approx(5e-5) and got["source"] == "mine"
    f = tmp_path / "host.json"
    f.write_text(json.dumps({"host": block}))
    assert resolve_host(est, str(f)) == got
    f.write_text(json.dumps({"host": {"verify_per_item_ms": 1}}))
    with pytest.raises(WispError, match="host-time"):
        resolve_host(est, str(f))
    with pytest.raises(WispError, match="host-time"):
        resolve_host(est, str(tmp_path / "missing.json"))


def test_default_is_the_fit_of_the_committed_logs():
    """HostTime.default() is what bench/fit_host_time.py fits from the committed H200 runs 11–13 logs."""
    spec = importlib.util.spec_from_file_location("fit_host_time", REPO / "bench/fit_host_time.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [w for r in (11, 12, 13) for w in mod.windows(str(CAP / f"h200-run{r}-steps.txt"))]
    h = HostTime.default()
    a, b = mod.fit([(x[1], x[3]) for x in rows if x[0] == "decode"])
    assert a * 1e-3 == pytest.approx(h.decode_fixed_s, abs=1e-5)
    assert b * 1e-3 == pytest.approx(h.decode_per_item_s, rel=0.01)
    a, b = mod.fit([(x[1], x[3]) for x in rows if x[0] == "verify"])
    assert a * 1e-3 == pytest.approx(h.verify_fixed_s, rel=0.01)
    assert b * 1e-3 == pytest.approx(h.verify_per_item_s, rel=0.01)


def _cfg(policy: str, ctl: str, host: dict | None) -> SimConfig:
    trace = json.loads((REPO / "bench/traces/qwen-coder.json").read_text())["sequences"]
    return SimConfig(
        policy=policy,
        controller=ctl,
        devices=120,
        duration_s=5.0,
        warmup_s=1.5,
        gap_s=1.0,
        slo_ttft_ms=2000.0,
        slo_tpot_ms=60.0,
        prompt_tokens=[41, 43, 45, 39, 60],
        lengths=[40, 32, 64, 48, 32],
        trace=trace,
        device=get_device("jetson"),
        link=get_link("wifi-metro"),
        estimator=_est(CAP / "est-h200-run12-7b-online.json"),
        max_batch=256,
        drain_s=4.0,
        hybrid=False,
        host=host,
    )


def test_host_time_raises_centralized_tpot_more_than_wisp():
    """The direction the data shows: serial host time lengthens centralized decode steps (large batches, one step
    per token), so its simulated TPOT rises; WISP's few large verify steps barely change."""
    host = asdict(HostTime.default())
    c_off = run_point(_cfg("centralized", "", None))
    c_on = run_point(replace(_cfg("centralized", "", None), host=host))
    w_off = run_point(_cfg("wisp", "wisp", None))
    w_on = run_point(replace(_cfg("wisp", "wisp", None), host=host))
    assert c_off["sessions"] > 20 and w_off["sessions"] > 20
    c_rise = c_on["tpot_p50_ms"] / c_off["tpot_p50_ms"]
    w_rise = w_on["tpot_p50_ms"] / w_off["tpot_p50_ms"]
    assert c_rise > 1.15, (c_off["tpot_p50_ms"], c_on["tpot_p50_ms"])
    assert c_rise > w_rise + 0.05, (c_rise, w_rise)
