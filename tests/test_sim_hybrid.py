"""The simulator applies the server's whole hybrid rule (sched/hybrid.py), its too-slow test included: a session
whose device drafts too slowly for its TPOT SLO moves to server decoding, as `commit.py` moves it on a real server.
Before the simulator fed that test (session 5) it modelled the load rule only, and phone-class devices at a 60 ms
SLO simply missed it."""

from __future__ import annotations

from dataclasses import replace

from sim_inputs import sharegpt_32b
from wisp_cloud.fleet.profiles import get_device
from wisp_cloud.fleet.sim_point import run_point
from wisp_cloud.fleet.simulate import SimConfig


def _cfg(hybrid: bool) -> SimConfig:
    return sharegpt_32b(
        40,
        policy="wisp",
        controller="wisp",
        devices=120,
        duration_s=12.0,
        warmup_s=3.0,
        slo_tpot_ms=60.0,
        device=get_device("phone"),  # 60 ms per drafted token: speculation cannot make a 60 ms TPOT
        drain_s=6.0,
        hybrid=hybrid,
    )


def test_too_slow_sessions_move_to_server_decoding_in_the_simulator():
    on = run_point(_cfg(True))
    off = run_point(replace(_cfg(False)))
    assert on["sessions"] > 40 and off["sessions"] > 40
    assert on["attainment"] > off["attainment"] + 0.15, (on["attainment"], off["attainment"])
    assert on["tpot_p50_ms"] < off["tpot_p50_ms"], (on["tpot_p50_ms"], off["tpot_p50_ms"])
