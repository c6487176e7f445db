"""10⁵ devices over 8–64 GPUs in `wisp simulate`: one replica per GPU, sessions placed by the load balancer's
rule (HAProxy `leastconn` at open, then sticky: `wisp cluster`'s config) or by hashing devices (device d on GPU
d mod G), the WISP policy on each replica. Writes a JSON and a PNG (attainment, goodput, TPOT p50 vs GPUs).

    python bench/cluster_sim.py --estimator bench/results/capacity/est-h200-paged-qwen7b.json \
        --gpus 8,16,32,64 --gap 60 --duration 6 --out bench/results/cluster/sim-100k

Any other `wisp simulate` flag can follow `--` (e.g. `-- --link lte --slo-tpot-ms 80`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from wisp_cloud.fleet import cli_simulate
from wisp_cloud.fleet.sim_driver import sim_config
from wisp_cloud.fleet.sim_point import run_point
from wisp_cloud.fleet.sim_search import estimator_or_default
from wisp_cloud.fleet.trace import load_trace

_STYLE = {"leastconn": ("tab:green", "HAProxy leastconn, sticky"), "device-hash": ("tab:gray", "device hash")}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for balance, (color, label) in _STYLE.items():
        pts = sorted((p for p in result["points"] if p["balance"] == balance), key=lambda p: p["gpus"])
        if not pts:
            continue
        g = [p["gpus"] for p in pts]
        axes[0].plot(g, [p["attainment"] for p in pts], "o-", color=color, label=label)
        axes[1].plot(g, [p["goodput_tok_s"] for p in pts], "o-", color=color, label=label)
        axes[2].plot(g, [p["tpot_p50_ms"] for p in pts], "o-", color=color, label=label)
    for ax, title in zip(axes, ("SLO attainment", "goodput (tok/s)", "TPOT p50 (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["gpus"], [str(x) for x in result["gpus"]])
        ax.set_xlabel("GPUs (one replica each)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].set_ylim(bottom=0)
    axes[2].set_ylim(bottom=0)
    axes[0].legend()
    c = result["config"]
    fig.suptitle(
        f"wisp simulate: {c['devices']:,} devices, WISP policy, gap {c['gap']:g} s, SLO TTFT {c['slo_ttft_ms']:g} ms / "
        f"TPOT {c['slo_tpot_ms']:g} ms, {Path(c['estimator'] or 'default').name}, {c['link']}, {c['device_profile']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="8,16,32,64")
    p.add_argument("--balance", default="leastconn,device-hash")
    p.add_argument("--out", default="runs/cluster-sim")
    own, rest = p.parse_known_args()
    rest = [a for a in rest if a != "--"]
    sim = argparse.ArgumentParser()
    cli_simulate.add_parser(sim.add_subparsers())
    args = sim.parse_args(
        ["simulate", "--devices", "100000", "--policies", "wisp", "--max-batch", "256", *rest]
    )
    gpus = [int(g) for g in own.gpus.split(",")]
    est = estimator_or_default(args.estimator)
    trace = load_trace(args.trace)
    out = Path(own.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "kind": "cluster-sim",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "gpus": gpus,
        "points": [],
    }
    pool = ProcessPoolExecutor(args.procs) if args.procs > 1 else None
    try:
        for balance in own.balance.split(","):
            for g in gpus:
                cfg = sim_config(args, "wisp", "wisp", trace, est, balance=balance)
                s = run_point(cfg, gpus=g, procs=args.procs, pool=pool)
                for k in ("tpot_ms", "ttft_ms"):
                    s.pop(k, None)
                result["points"].append(s)
                print(
                    f"[cluster-sim] {balance:<11} {g:>3} GPUs: attainment {s['attainment']:.3f}, goodput "
                    f"{s['goodput_tok_s']:.0f} tok/s, tpot p50 {s['tpot_p50_ms']:.0f} ms, sessions/GPU "
                    f"{s['sessions_per_replica_min']}-{s['sessions_per_replica_max']} ({s['wall_s']:.0f}s)",
                    flush=True,
                )
                out.with_suffix(".json").write_text(json.dumps(result, indent=1))  # partial results survive
    finally:
        if pool is not None:
            pool.shutdown()
    plot(result, out.with_suffix(".png"))
    print(f"[cluster-sim] wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
