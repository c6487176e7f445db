"""Launch alignment in `wisp simulate` (docs/scheduling.md §11): WISP's capacity and mean batch per step with the
verdicts' launch hint (`--align`) and without it, per cell (model, TPOT SLO, device, link).

    python bench/sim_align.py --estimators 32B=bench/results/capacity/est-h200-run13-32b-online.json,\\
7B=bench/results/capacity/est-h200-run12-7b-online.json \\
        --cells 32B:60:mac-m4:metro-edge,32B:60:jetson:wifi-metro --out bench/results/sim_align/align \\
        -- --workload sharegpt --gap 1 --duration 10 --warmup 3 --max-batch 256

Per cell and arm: a capacity search (`sim_search.find_capacity`: largest N devices on one GPU with ≥ 90 % SLO
attainment, doubling from 32 devices), then one run of both arms at the no-align capacity, with the batches counted as `sim_batches.py` counts
them (same load, so the mean batch compares like with like). Any `wisp simulate` flag can follow `--`. Writes
OUT.json, one entry per cell, updated as each finishes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import sim_batches
from wisp_cloud.fleet import cli_simulate, simulate
from wisp_cloud.fleet.profiles import get_device, get_link
from wisp_cloud.fleet.sim_driver import sim_config
from wisp_cloud.fleet.sim_point import run_point
from wisp_cloud.fleet.sim_search import estimator_or_default, find_capacity
from wisp_cloud.fleet.simulate import SimConfig
from wisp_cloud.fleet.trace import load_trace
from wisp_cloud.fleet.workload import resolve_workload_args

LO = 32  # the search starts here: at 8-16 devices a 7 s window judges 2-6 sessions, and one miss fails it


def _capacity(cfg: SimConfig) -> dict[str, Any]:
    t = time.perf_counter()
    cap, gp = find_capacity(cfg, lo=LO)
    return {"capacity": cap, "goodput": round(gp, 1), "wall_s": round(time.perf_counter() - t, 1)}


def _batches(cfg: SimConfig) -> dict[str, Any]:
    """One run at cfg.devices, its steps counted (sim_batches' recording scheduler, in this worker process)."""
    sim_batches.TALLY = sim_batches._Tally()
    sim_batches.WARMUP_S = cfg.warmup_s
    simulate.Scheduler = sim_batches.RecordingScheduler  # type: ignore[misc]
    s = run_point(cfg, gpus=1)
    row = sim_batches.TALLY.row()
    return {
        "devices": cfg.devices,
        "attainment": round(s["attainment"], 3),
        "goodput_tok_s": round(s["goodput_tok_s"], 1),
        "tpot_p50_ms": round(s["tpot_p50_ms"], 1),
        "acceptance": round(s["acceptance"] or 0.0, 3),
        "tokens_per_round": round(s["tokens_per_round"] or 0.0, 2),
        "busy": row["busy"],
        "batch_mean": row["batch_mean"],
        "tokens_mean": row["tokens_mean"],
        "step_ms_mean": row["step_ms_mean"],
        "steps": row["steps"],
    }


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="sim_align")
    p.add_argument("--estimators", required=True, help="MODEL=EST.json,... one GPU estimator per model size")
    p.add_argument("--cells", required=True, help="MODEL:TPOT:DEVICE:LINK,...")
    p.add_argument("--out", default="runs/sim-align/align")
    own = p.parse_args(argv[:split])
    root = argparse.ArgumentParser(prog="sim_align")
    cli_simulate.add_parser(root.add_subparsers(dest="command"))
    args = root.parse_args(["simulate", *argv[split + 1 :]])
    resolve_workload_args(args, trace=True)
    trace = load_trace(args.trace)
    ests = dict(kv.split("=", 1) for kv in own.estimators.split(","))
    out = Path(own.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "kind": "sim-align",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/sim_align.py " + " ".join(argv),
        "cells": [],
    }
    with ProcessPoolExecutor(args.procs) as pool:
        for cell in own.cells.split(","):
            model, tpot, dev, link = cell.split(":")
            base = sim_config(
                args, "wisp", "wisp", trace, estimator_or_default(ests[model]), slo_tpot_ms=float(tpot)
            )
            base.device, base.link = get_device(dev), get_link(link)
            arms = {"align": replace(base, align=True), "no_align": replace(base, align=False)}
            caps = dict(zip(arms, pool.map(_capacity, arms.values()), strict=True))
            n = max(8, caps["no_align"]["capacity"])
            at = dict(
                zip(arms, pool.map(_batches, [replace(c, devices=n) for c in arms.values()]), strict=True)
            )
            row = {
                "model": model,
                "tpot_ms": float(tpot),
                "device": dev,
                "link": link,
                "capacity": caps,
                "at_no_align_capacity": at,
            }
            result["cells"].append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(result, indent=1))  # partial results survive
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
