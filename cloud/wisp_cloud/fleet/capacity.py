"""Capacity from a sweep's points: per policy (SLED: its best k), per TPOT SLO judged, and the ratios.

A point's records can be judged at several TPOT SLOs (`wisp bench --slo-tpot-ms 30,60`): a session met the SLO
when it finished without error, its TTFT within the TTFT SLO and its TPOT within the TPOT SLO. Judging a policy's
run at an SLO its sessions did not ask for is exact only for policies whose server ignores the SLO (centralized,
SLED, FIFO: `SLO_BLIND`); the bench runs WISP once per SLO, its sessions asking the SLO they are judged at.
"""

from __future__ import annotations

from typing import Any

SLO_BLIND = frozenset({"centralized", "sled", "fifo"})  # sched/policies.py: these never read a deadline
DEVICE_BLIND = frozenset({"centralized"})  # its clients draft nothing: judged for every device profile
# A point where fewer than N/4 sessions started in the judged window stalled: the devices were stuck in their
# first, slow sessions and the few that started are the short ones, a biased sample (seen on the H200 at 32B:
# 1 session judged at N=288, "attainment 1.00"). Capacity counts such a point as failed.
MIN_JUDGED_PER_DEVICE = 0.25


def starved(p: dict) -> bool:
    return p.get("sessions", 0) < MIN_JUDGED_PER_DEVICE * p["n"]


def met_at(r: dict, ttft_ms: float, tpot_ms: float) -> bool:
    """Did the session of record `r` meet (ttft_ms, tpot_ms)?"""
    if r.get("error") or r.get("ttft_ms") is None or r.get("tpot_ms") is None:
        return False
    return bool(r["ttft_ms"] <= ttft_ms and r["tpot_ms"] <= tpot_ms)


def judge(records: list[dict], warmup_s: float, duration_s: float, ttft_ms: float, tpot_ms: float) -> dict:
    """Attainment, goodput and met sessions of one point's records at (ttft_ms, tpot_ms)."""
    judged = [r for r in records if r["start_s"] >= warmup_s]
    met = [r for r in judged if met_at(r, ttft_ms, tpot_ms)]
    return {
        "attainment": len(met) / len(judged) if judged else 0.0,
        "goodput_tok_s": sum(r["new_tokens"] for r in met) / max(duration_s - warmup_s, 1e-9),
        "met": len(met),
    }


def capacity(points: list[dict], target: float) -> tuple[int, float]:
    """(largest N with attainment ≥ target, its goodput); (0, 0) if none."""
    ok = [p for p in points if p["attainment"] >= target]
    if not ok:
        return 0, 0.0
    best = max(ok, key=lambda p: p["n"])
    return best["n"], best["goodput_tok_s"]


def capacity_interp(points: list[dict], target: float) -> tuple[float, bool]:
    """(N where attainment crosses `target`, linear between the swept points around it; lower bound?).

    The crossing after the largest passing N; if every point passes, that largest N, flagged as a lower bound.
    """
    pts = sorted(points, key=lambda p: p["n"])
    ok = [i for i, p in enumerate(pts) if p["attainment"] >= target]
    if not ok:
        return 0.0, False
    i = ok[-1]
    if i == len(pts) - 1:
        return float(pts[i]["n"]), True
    (n0, a0), (n1, a1) = (pts[i]["n"], pts[i]["attainment"]), (pts[i + 1]["n"], pts[i + 1]["attainment"])
    return n0 + (n1 - n0) * (a0 - target) / max(a0 - a1, 1e-9), False


def _per_policy(pts: list[dict], target: float) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Capacity and goodput per policy (sled: its best k), and the ratios against the goal."""
    per: dict[str, dict[str, Any]] = {}
    for policy in dict.fromkeys(p["policy"] for p in pts):
        mine = [p for p in pts if p["policy"] == policy]
        by_ctl: dict[str, list[dict]] = {}
        for p in mine:
            by_ctl.setdefault(p["controller"] or "", []).append(p)
        best = None
        for ctl, ps in by_ctl.items():
            cap, gp = capacity(ps, target)
            peak = max(p["goodput_tok_s"] for p in ps)
            interp, lower = capacity_interp(ps, target)
            cand = {
                "controller": ctl,
                "capacity": cap,
                "capacity_interp": round(interp, 1),
                "capacity_is_lower_bound": lower,
                "goodput_at_capacity": gp,
                "peak_goodput": peak,
            }
            if best is None or (cap, peak) > (best["capacity"], best["peak_goodput"]):
                best = cand
            per.setdefault(policy, {}).setdefault("variants", []).append(cand)
        per[policy].update(best or {})

    def ratio(a: str, b: str, key: str) -> float | None:
        if a not in per or b not in per or not per[b].get(key):
            return None
        return per[a][key] / per[b][key]

    ratios = {
        "capacity_vs_centralized": ratio("wisp", "centralized", "capacity"),
        "capacity_vs_sled": ratio("wisp", "sled", "capacity"),
        "capacity_interp_vs_centralized": ratio("wisp", "centralized", "capacity_interp"),
        "capacity_interp_vs_sled": ratio("wisp", "sled", "capacity_interp"),
        "goodput_vs_centralized": ratio("wisp", "centralized", "peak_goodput"),
        "goodput_vs_sled": ratio("wisp", "sled", "peak_goodput"),
        "goal": {
            "capacity_vs_centralized": 2.5,
            "capacity_vs_sled": 1.5,
            "capacity_interp_vs_centralized": 2.5,
            "capacity_interp_vs_sled": 1.5,
            "goodput_vs_centralized": 2.2,
            "goodput_vs_sled": 4.0,
        },
    }
    return per, ratios


def finalize(result: dict, target: float) -> None:
    """Per (TPOT SLO judged, device profile, link) — a `regime` — capacity and goodput per policy and the
    ratios. Centralized points serve every device profile of their link (DEVICE_BLIND). `policies` and `ratios`
    at the top are the first regime's (what the plots show)."""
    cfg = result["config"]
    dev0, link0 = cfg["device_profile"]["name"], cfg["link_profile"]["name"]
    pts = [{**p, "device": p.get("device", dev0), "link": p.get("link", link0)} for p in result["points"]]
    for p in pts:
        if "judged" not in p:  # points from before `judged` existed
            p["judged"] = {
                f"{cfg['slo']['tpot_ms']:g}": {
                    "attainment": p["attainment"],
                    "goodput_tok_s": p["goodput_tok_s"],
                }
            }
    devices = list(dict.fromkeys(p["device"] for p in pts if p["policy"] not in DEVICE_BLIND)) or [dev0]
    links = list(dict.fromkeys(p["link"] for p in pts))
    regimes = []
    for key in dict.fromkeys(k for p in pts for k in p["judged"]):
        for device in devices:
            for link in links:
                at = [
                    {
                        **p,
                        "attainment": 0.0 if starved(p) else p["judged"][key]["attainment"],
                        "goodput_tok_s": p["judged"][key]["goodput_tok_s"],
                    }
                    for p in pts
                    if key in p["judged"]
                    and p["link"] == link
                    and (p["device"] == device or p["policy"] in DEVICE_BLIND)
                ]
                if not at:
                    continue
                per, ratios = _per_policy(at, target)
                regimes.append(
                    {
                        "slo_tpot_ms": float(key),
                        "device": device,
                        "link": link,
                        "policies": per,
                        "ratios": ratios,
                    }
                )
    result["regimes"] = regimes
    result["policies"], result["ratios"] = (
        (regimes[0]["policies"], regimes[0]["ratios"]) if regimes else ({}, {})
    )


def print_summary(result: dict) -> None:
    for regime in result.get("regimes", []):
        _print_regime(regime)


def _print_regime(regime: dict) -> None:
    print(
        f"[bench] TPOT SLO {regime['slo_tpot_ms']:g} ms, {regime.get('device', '?')}, {regime.get('link', '?')}: "
        "capacity (largest N with attainment >= target) and goodput:"
    )
    for policy, d in regime.get("policies", {}).items():
        print(
            f"  {policy:<12} capacity {d.get('capacity', 0):>5} (interpolated {d.get('capacity_interp', 0):.0f}"
            + ("+, all swept N passed" if d.get("capacity_is_lower_bound") else "")
            + f")  peak goodput {d.get('peak_goodput', 0):8.1f} tok/s"
            + (f"  ({d['controller']})" if d.get("controller") else "")
        )
    for k, v in regime.get("ratios", {}).items():
        if k != "goal":
            goal = regime["ratios"]["goal"][k]
            print(f"  {k:<26} {'n/a' if v is None else f'{v:.2f}x'}  (goal {goal}x)")
