"""The simulator applies the server's whole hybrid rule (sched/hybrid.py), its too-slow test included: a session
whose device drafts too slowly for its TPOT SLO moves to server decoding, as `commit.py` moves it on a real server.
Before the simulator fed that test (session 5) it modelled the load rule only, and phone-class devices at a 60 ms
SLO simply missed it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from wisp_cloud.fleet.profiles import get_device, get_link
from wisp_cloud.fleet.simulate import SimConfig, run_point

REPO = Path(__file__).resolve().parents[1]


def _cfg(hybrid: bool) -> SimConfig:
    trace = json.loads((REPO / "bench/traces/sharegpt.json").read_text())["sequences"]
    work = json.loads((REPO / "bench/workloads/sharegpt.json").read_text())["requests"][:40]
    return SimConfig(
        policy="wisp",
        controller="wisp",
        devices=120,
        duration_s=12.0,
        warmup_s=3.0,
        gap_s=1.0,
        slo_ttft_ms=2000.0,
        slo_tpot_ms=60.0,
        prompt_tokens=[r["prompt_tokens"] for r in work],
        lengths=[max(2, r["max_new_tokens"] // 4) for r in work],
        trace=trace,
        device=get_device("phone"),  # 60 ms per drafted token: speculation cannot make a 60 ms TPOT
        link=get_link("metro-edge"),
        estimator=json.loads((REPO / "bench/results/capacity/est-h200-run13-32b-online.json").read_text()),
        max_batch=256,
        drain_s=6.0,
        hybrid=hybrid,
    )


def test_too_slow_sessions_move_to_server_decoding_in_the_simulator():
    on = run_point(_cfg(True))
    off = run_point(replace(_cfg(False)))
    assert on["sessions"] > 40 and off["sessions"] > 40
    assert on["attainment"] > off["attainment"] + 0.15, (on["attainment"], off["attainment"])
    assert on["tpot_p50_ms"] < off["tpot_p50_ms"], (on["tpot_p50_ms"], off["tpot_p50_ms"])
