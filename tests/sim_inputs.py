"""A `wisp simulate` point on the committed public inputs: ShareGPT V3 request lengths (a quarter of their output
lengths, to keep tests short) and acceptance trace, and the H200 Qwen2.5-32B estimator of GPU run 13. Shared by
the simulator tests that need a realistic load (test_sim_hybrid, test_sim_validate)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wisp_cloud.fleet.profiles import get_link
from wisp_cloud.fleet.simulate import SimConfig

REPO = Path(__file__).resolve().parents[1]
EST_32B = REPO / "bench/results/capacity/est-h200-run13-32b-online.json"


def sharegpt_32b(requests: int, **fields: Any) -> SimConfig:
    """One simulated H200 (32B shape) serving the first `requests` ShareGPT requests over a metro-edge link;
    `fields` set the rest of the point (policy, controller, devices, SLO, device, ...) or override these."""
    trace = json.loads((REPO / "bench/traces/sharegpt.json").read_text())["sequences"]
    work = json.loads((REPO / "bench/workloads/sharegpt.json").read_text())["requests"][:requests]
    base: dict[str, Any] = {
        "gap_s": 1.0,
        "slo_ttft_ms": 2000.0,
        "prompt_tokens": [r["prompt_tokens"] for r in work],
        "lengths": [max(2, r["max_new_tokens"] // 4) for r in work],
        "trace": trace,
        "link": get_link("metro-edge"),
        "estimator": json.loads(EST_32B.read_text()),
        "max_batch": 256,
    }
    return SimConfig(**{**base, **fields})
