"""Searches over `wisp simulate` points: the capacity of one simulated GPU (largest N devices with attainment at the
target), and the estimator a simulation runs on."""

from __future__ import annotations

from dataclasses import asdict

from wisp_cloud.estimator import VerifyTimeEstimator
from wisp_cloud.fleet.sim_point import run_point
from wisp_cloud.fleet.simulate import SimConfig


def find_capacity(
    base: SimConfig, target: float = 0.9, lo: int = 1, hi: int = 4096, steps: int = 7
) -> tuple[int, float]:
    """Largest N (devices on one GPU) with attainment ≥ target, by doubling then bisection."""

    def ok(n: int) -> tuple[bool, float]:
        s = run_point(SimConfig(**{**asdict(base), "devices": n, "device": base.device, "link": base.link}))
        return s["attainment"] >= target, s["goodput_tok_s"]

    good, gp = 0, 0.0
    n = max(lo, 8)
    while n <= hi:
        passed, g = ok(n)
        if not passed:
            break
        good, gp = n, g
        n *= 2
    else:
        return good, gp
    low, high = good, n
    for _ in range(steps):
        if high - low <= max(1, low // 16):
            break
        mid = (low + high) // 2
        passed, g = ok(mid)
        if passed:
            low, gp = mid, g
        else:
            high = mid
    return low, gp


def estimator_or_default(path: str | None) -> dict:
    if path:
        return VerifyTimeEstimator.load(path).to_dict()
    return VerifyTimeEstimator.default().to_dict()
