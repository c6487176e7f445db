"""`wisp simulate --validate BENCH.json`: re-simulate every point of a `wisp bench` result as the bench ran it and
report the error per point and per TPOT SLO judged.

Each point is simulated with its own:
- arm: `point["policy"]` is an arm spec (fleet/bench.py `parse_arm`): the server policy, the clients' controller
  (the point's `controller`) and the switches of `config.ARM_FLAGS` (~no-fill, ~no-hybrid, ~no-truncate, ~refuse)
  mapped onto `SimConfig`. An arm the simulator cannot run (a flag that no longer exists, a draft-ahead
  controller) is skipped with a note, never guessed;
- SLO: the sessions ask `point["slo_tpot_ms"]` (WISP's deadlines read it) and the simulated records are judged at
  every SLO of `point["judged"]`, as `capacity.judge` judged the bench's;
- device and link (`point["device"]`, `point["link"]` among the config's profiles), prompt token counts, output
  lengths, duration, warm-up, drain and think time; and the bench's acceptance trace unless `--trace` is given.
Three seeds per point, averaged.

A row is *below saturation* when the bench's goodput at that SLO still rises with N (a larger N of the same arm,
SLO asked and SLO judged has higher goodput) or its attainment is ≥ 0.9: the regime the simulator is held to
(issue 15 item 8: goodput within 15 %).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from wisp_sdk.controllers import Wisp, make_controller
from wisp_sdk.errors import WispError

from wisp_cloud.config import ARM_FLAGS
from wisp_cloud.fleet.bench import parse_arm
from wisp_cloud.fleet.profiles import DeviceProfile, LinkProfile
from wisp_cloud.fleet.sim_point import run_point
from wisp_cloud.fleet.simulate import SimConfig
from wisp_cloud.fleet.trace import load_trace

SEEDS = 3
WITHIN = 0.15  # the goal: goodput within 15 % below saturation


def arm_config(cfg: SimConfig, spec: str, controller: str) -> SimConfig:
    """`cfg` with the arm `spec`'s policy, controller and server switches. Raises WispError for an arm that the
    simulator cannot run."""
    policy, arm_ctl, flags = parse_arm(spec)
    ctl = controller or arm_ctl
    if ctl and isinstance(c := make_controller(ctl), Wisp) and c.draft_ahead:
        raise WispError(f"arm {spec!r}: controller {ctl!r} drafts ahead, which the simulator does not model")
    kw = dict(cfg.policy_kw or {}) if policy == "wisp" else {}
    over: dict[str, Any] = {}
    for flag in flags:
        field, value = ARM_FLAGS[flag]
        if field in ("fill", "refuse"):
            kw[field] = value
        elif field in ("hybrid", "regime", "start_on_server", "draft_cap", "decode_all"):
            over[field] = value
        elif field == "truncate_drafts":
            over["truncate"] = value
        else:  # a switch added to config.ARM_FLAGS without a simulated twin
            raise WispError(f"arm {spec!r}: switch ~{flag} is not simulated")
    return replace(cfg, policy=policy, controller=ctl, policy_kw=kw or None, **over)


def _profiles(c: dict, key: str, one: str, cls: Any) -> dict[str, Any]:
    rows = c.get(key) or [c[one]]
    return {r["name"]: cls(**r) for r in rows}


def bench_trace(bench: dict, given: str | None, fallback: dict) -> dict:
    """The acceptance trace to replay: --trace if given, else the bench's own (its config names it), else
    `fallback` (the workload's)."""
    if given:
        return load_trace(given)
    path = bench["config"].get("trace")
    if path and Path(path).is_file():
        return load_trace(path)
    print(f"[validate] the bench's trace {path!r} is not here: replaying the workload's", flush=True)
    return fallback


def mark_saturation(rows: list[dict]) -> None:
    """Set each row's `below_saturation` (module docstring)."""
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["policy"], r["controller"], r["slo_asked"], r["slo_judged"], r["device"], r["link"])
        series.setdefault(key, []).append(r)
    for pts in series.values():
        for r in pts:
            rising = any(q["n"] > r["n"] and q["bench_goodput"] > r["bench_goodput"] for q in pts)
            r["below_saturation"] = rising or r["bench_attainment"] >= 0.9


def _mean(sims: list[dict], key: str) -> float | None:
    xs = [s[key] for s in sims if s.get(key) is not None]
    return sum(xs) / len(xs) if xs else None


def _err(sim: float | None, bench: float | None) -> float | None:
    return (sim - bench) / bench if sim is not None and bench else None


def parse_arm_policy(spec: str) -> str:
    """An arm spec's server policy (`wisp~no-fill` -> wisp), even for a spec `parse_arm` no longer accepts."""
    return spec.split("~")[0].split("+")[0]


def validate_points(
    bench: dict, base: SimConfig, only: frozenset[str] = frozenset()
) -> tuple[list[dict], list[str]]:
    """(one row per point and SLO judged, notes on skipped points); `only`: these server policies only."""
    c = bench["config"]
    devices = _profiles(c, "device_profiles", "device_profile", DeviceProfile)
    links = _profiles(c, "link_profiles", "link_profile", LinkProfile)
    rows: list[dict] = []
    notes: list[str] = []
    moved: dict[str, int] = {}
    for p in bench["points"]:
        if only and parse_arm_policy(p["policy"]) not in only:
            continue
        asked = float(p.get("slo_tpot_ms") or c["slo"]["tpot_ms"])
        label = f"{p['policy']} {p['controller'] or ''} N={p['n']} @{asked:g}"
        try:
            cfg = arm_config(base, p["policy"], p["controller"] or "")
        except WispError as exc:
            notes.append(f"skipped {label}: {exc}")
            print(f"[validate] skipped {label}: {exc}", flush=True)
            continue
        judged = p.get("judged") or {f"{asked:g}": p}
        cfg = replace(
            cfg,
            devices=p["n"],
            slo_tpot_ms=asked,
            judge_tpot_ms=tuple(float(k) for k in judged),
            device=devices.get(p.get("device"), next(iter(devices.values()))),
            link=links.get(p.get("link"), next(iter(links.values()))),
        )
        sims = [run_point(replace(cfg, seed=s)) for s in range(SEEDS)]
        common = {
            "policy": p["policy"],
            "controller": p["controller"],
            "n": p["n"],
            "slo_asked": asked,
            "device": cfg.device.name,
            "link": cfg.link.name,
            "bench_tpot_p50_ms": p["tpot_p50_ms"],
            "sim_tpot_p50_ms": _mean(sims, "tpot_p50_ms"),
            "bench_ttft_p50_ms": p.get("ttft_p50_ms"),
            "sim_ttft_p50_ms": _mean(sims, "ttft_p50_ms"),
            "bench_sessions": p.get("sessions"),
            "sim_sessions": _mean(sims, "sessions"),
            "bench_acceptance": p.get("acceptance"),
            "sim_acceptance": _mean(sims, "acceptance"),
            "bench_tokens_per_round": p.get("tokens_per_round"),
            "sim_tokens_per_round": _mean(sims, "tokens_per_round"),
        }
        # the server's counters are cumulative over an arm: this point's moves are the rise since the last point
        # (None where the bench predates the counters, runs before 19)
        server = p.get("server")
        cum = (server.get("session_switches") or {}).get("centralized", 0) if server else None
        bench_moves = cum - moved.get(p["policy"], 0) if cum is not None else None
        common.update(bench_moves=bench_moves, sim_moves=_mean(sims, "moves_to_server"))
        moved[p["policy"]] = cum or 0
        common["tpot_err"] = _err(common["sim_tpot_p50_ms"], p["tpot_p50_ms"])
        for key, j in judged.items():
            g = sum(s["judged"][key]["goodput_tok_s"] for s in sims) / len(sims)
            a = sum(s["judged"][key]["attainment"] for s in sims) / len(sims)
            rows.append(
                {
                    **common,
                    "slo_judged": float(key),
                    "bench_goodput": j["goodput_tok_s"],
                    "sim_goodput": g,
                    "goodput_err": _err(g, j["goodput_tok_s"]),
                    "bench_attainment": j["attainment"],
                    "sim_attainment": a,
                }
            )
            r = rows[-1]
            print(
                f"[validate] {label:<28} judged@{key:<3} goodput bench {r['bench_goodput']:8.1f} sim {g:8.1f} "
                f"({_pct(r['goodput_err'])})  attain {r['bench_attainment']:.2f}/{a:.2f}  tpot50 "
                f"{p['tpot_p50_ms']:.1f}/{common['sim_tpot_p50_ms'] or 0:.1f} ms  ttft50 "
                f"{p.get('ttft_p50_ms') or 0:.0f}/{common['sim_ttft_p50_ms'] or 0:.0f} ms  tok/round "
                f"{p.get('tokens_per_round') or 0:.2f}/{common['sim_tokens_per_round'] or 0:.2f}  sessions "
                f"{p.get('sessions')}/{common['sim_sessions'] or 0:.0f}  moves {common['bench_moves']}/"
                f"{common['sim_moves'] or 0:.0f}",
                flush=True,
            )
    mark_saturation(rows)
    return rows, notes


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.0f}%"


def summarize_rows(rows: list[dict]) -> dict[str, Any]:
    errs = [abs(r["goodput_err"]) for r in rows if r["goodput_err"] is not None]
    below = [r for r in rows if r["below_saturation"] and r["goodput_err"] is not None]
    b_errs = [abs(r["goodput_err"]) for r in below]
    t_errs = [abs(r["tpot_err"]) for r in below if r["tpot_err"] is not None]
    return {
        "rows": len(rows),
        "goodput_mape": sum(errs) / len(errs) if errs else None,
        "below_saturation": len(below),
        "below_goodput_mape": sum(b_errs) / len(b_errs) if b_errs else None,
        "below_goodput_max_err": max(b_errs) if b_errs else None,
        "below_within_15pct": sum(e <= WITHIN for e in b_errs),
        "below_tpot_p50_within_15pct": sum(e <= WITHIN for e in t_errs),
        "below_misses": [
            f"{r['policy']} {r['controller'] or ''} N={r['n']} @{r['slo_asked']:g}/{r['slo_judged']:g}: "
            f"{_pct(r['goodput_err'])}"
            for r in below
            if abs(r["goodput_err"]) > WITHIN
        ],
    }


def validate(args: Any, base: SimConfig, bench: dict, bench_path: str, out: Path) -> int:
    only = frozenset(x.strip() for x in args.policies.split(",") if x.strip())
    rows, notes = validate_points(bench, base, only)
    summary = summarize_rows(rows)
    (out / "validate.json").write_text(
        json.dumps(
            {
                "kind": "wisp-simulate-validate",
                "bench": bench_path,
                "device_round_ms": base.device_round_ms,
                "summary": summary,
                "notes": notes,
                "rows": rows,
            },
            indent=1,
        )
    )
    n_below = summary["below_saturation"]
    print(
        f"[validate] {len(rows)} rows, goodput mean |error| {_pct(summary['goodput_mape'])}; below saturation "
        f"{n_below} rows: within 15 % {summary['below_within_15pct']}/{n_below} (TPOT p50: "
        f"{summary['below_tpot_p50_within_15pct']}/{n_below}), mean |error| "
        f"{_pct(summary['below_goodput_mape'])}, max {_pct(summary['below_goodput_max_err'])}",
        flush=True,
    )
    for m in summary["below_misses"]:
        print(f"[validate]   miss: {m}", flush=True)
    print(f"[validate] wrote {out / 'validate.json'}", flush=True)
    return 0
