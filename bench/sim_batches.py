"""Batch composition under `wisp simulate`: how full each simulated GPU step is, per policy.

    python bench/sim_batches.py --estimator EST.json --workload sharegpt --device-profile mac-m4 \
        --link metro-edge --slo-tpot-ms 60 --policies centralized,wisp --devices 200 --duration 20 \
        --max-batch 256 --gap 1 [--policy-kw '{"fill": false}']

Takes `wisp simulate`'s arguments (one GPU), runs each policy through the simulator's own `run_point`, and
prints, besides the summary, what the engine's `steps` log lines show on the GPU: steps, mean items per step
(and decode items of server-decoded sessions), mean new tokens per step, busy fraction and the policy's hold
count. The batches are recorded by a `Scheduler` subclass swapped into the simulator module for the run;
nothing else changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from wisp_cloud.fleet import cli_simulate, simulate
from wisp_cloud.fleet.sim_driver import sim_config
from wisp_cloud.fleet.sim_point import run_point
from wisp_cloud.fleet.sim_search import estimator_or_default
from wisp_cloud.fleet.trace import load_trace
from wisp_cloud.fleet.workload import resolve_workload_args
from wisp_cloud.sched import Batch, Scheduler
from wisp_cloud.sched.fill import fixed_cost


class _Tally:
    def __init__(self) -> None:
        self.steps = 0
        self.items = 0
        self.decodes = 0
        self.tokens = 0
        self.busy_s = 0.0
        self.holds = 0
        self.fill_holds = 0
        self.small = 0  # steps dominated by the fixed cost: predicted time < 2 × w (sched/fill.py)
        self.sizes: list[int] = []
        self.t0: float | None = None
        self.t1 = 0.0

    def row(self) -> dict[str, float]:
        span = max(self.t1 - (self.t0 or 0.0), 1e-9)
        n = max(self.steps, 1)
        return {
            "steps": self.steps,
            "batch_mean": round(self.items / n, 1),
            "decode_mean": round(self.decodes / n, 1),
            "tokens_mean": round(self.tokens / n, 1),
            "step_ms_mean": round(1000 * self.busy_s / n, 2),
            "batch_p50": sorted(self.sizes)[len(self.sizes) // 2] if self.sizes else 0,
            "fixed_dominated": round(self.small / n, 3),
            "busy": round(self.busy_s / span, 3),
            "holds": self.holds,
            "fill_holds": self.fill_holds,
        }


TALLY = _Tally()
WARMUP_S = 0.0


class RecordingScheduler(Scheduler):
    """The simulator's Scheduler, counting every batch it completes after the warm-up."""

    def complete(self, batch: Batch, forward_s: float | Any, now: float) -> list:  # type: ignore[override]
        if batch.formed_at >= WARMUP_S:
            t = TALLY
            t.steps += 1
            t.items += len(batch)
            t.sizes.append(len(batch))
            t.small += self.estimator.predict(batch.shapes) < 2 * fixed_cost(self.estimator)
            t.decodes += sum(1 for r in batch.requests if r.kind == "decode")
            t.tokens += sum(s.n_tokens for s in batch.slots)
            t.busy_s += float(forward_s)
            t.t0 = batch.formed_at if t.t0 is None else t.t0
            t.t1 = now
            t.holds = self.policy.counters["hold"]
            t.fill_holds = self.policy.counters["fill_hold"]
        return super().complete(batch, forward_s, now)


def main(argv: list[str]) -> int:
    global TALLY, WARMUP_S
    root = argparse.ArgumentParser(prog="sim_batches")
    sub = root.add_subparsers(dest="command")
    cli_simulate.add_parser(sub)
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument(
        "--policy-kw", default="{}", help='JSON: extra WispPolicy fields (e.g. {"fill": false})'
    )
    known, rest = extra.parse_known_args(argv)
    args = root.parse_args(["simulate", *rest])
    resolve_workload_args(args, trace=True)
    est = estimator_or_default(args.estimator)
    trace = load_trace(args.trace)
    WARMUP_S = args.warmup
    simulate.Scheduler = RecordingScheduler  # type: ignore[misc]
    for policy in [p for p in args.policies.split(",") if p.strip()]:
        ctl = "" if policy == "centralized" else ("fixed:4" if policy == "sled" else "wisp")
        cfg = sim_config(args, policy, ctl, trace, est)
        if policy == "wisp" and json.loads(known.policy_kw):
            cfg.policy_kw = {**(cfg.policy_kw or {}), **json.loads(known.policy_kw)}
        TALLY = _Tally()
        s = run_point(cfg, gpus=1)
        row = {
            "policy": policy,
            "devices": args.devices,
            "tpot_slo_ms": args.slo_tpot_ms,
            "sessions": s["sessions"],
            "attainment": round(s["attainment"], 3),
            "goodput_tok_s": round(s["goodput_tok_s"], 1),
            "tpot_p50_ms": round(s["tpot_p50_ms"], 1),
            **TALLY.row(),
        }
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
