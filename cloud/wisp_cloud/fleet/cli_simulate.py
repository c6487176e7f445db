"""`wisp simulate`: discrete-event simulation of edge fleets and GPUs around the real scheduler code.

    wisp simulate --estimator EST.json --trace TRACE.json --devices 100000 --gpus 8 --gap 300
    wisp simulate --estimator EST.json --devices 100000 --gpus 32 --balance leastconn --policies wisp
    wisp simulate --estimator EST.json --trace TRACE.json --sweep rtt,draft,accept --out runs/sim
    wisp simulate --estimator EST.json --validate runs/bench/bench.json

Only argparse at import time.
"""

from __future__ import annotations

import argparse

from wisp_sdk.errors import WispError

from wisp_cloud.config import parse_tenant_weight
from wisp_cloud.fleet.workload import add_workload_args, resolve_workload_args


def _shares(text: str) -> tuple[float, ...]:
    """`--tenants 0.95,0.05`: checked at parse time (one usage line)."""
    try:
        shares = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: expected comma-separated shares, e.g. 0.95,0.05") from None
    if shares and (any(x <= 0 for x in shares) or abs(sum(shares) - 1.0) > 1e-6):
        raise argparse.ArgumentTypeError(f"{text}: shares must be > 0 and sum to 1")
    return shares


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="discrete-event simulation (10^5 devices, several GPUs) over the real scheduler and controllers",
        description="Simulate devices, links and GPUs; the scheduler, estimator, deadlines and controllers are "
        "the real ones. GPU time comes from a `wisp profile` estimator file.",
    )
    p.add_argument(
        "--estimator",
        help="estimator JSON from `wisp profile` (default: the built-in prior). It is the simulated GPU's clock: "
        "a running server's online estimator has learned step-to-answer times, 1.1-1.6x the step period on H200 "
        "runs 60-61 (docs/benchmarks.md), so the start-up profile with the default --host-time fits better",
    )
    add_workload_args(p)
    p.add_argument("--trace", help="acceptance trace (default: the workload's)")
    p.add_argument("--policies", default="centralized,sled,wisp")
    p.add_argument("--sled-k", default="2,4,6", help="FixedK values for sled (best reported)")
    p.add_argument("--devices", type=int, default=100_000, help="devices in total")
    p.add_argument("--gpus", type=int, default=8, help="GPUs, one verifier replica each")
    p.add_argument(
        "--balance",
        default="device-hash",
        choices=["device-hash", "leastconn", "roundrobin"],
        help="which replica a new session opens on (then sticky, as with docs/deploy.md's affinity cookie): "
        "device-hash = device d on GPU d mod G, GPUs simulated apart in --procs processes (fastest); leastconn "
        "(HAProxy's, as `wisp cluster` configures it) or roundrobin = one simulation of all GPUs",
    )
    p.add_argument("--gap", type=float, default=300.0, help="mean think time between a device's sessions (s)")
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--drain", type=float, help="default: TTFT SLO + longest output × TPOT SLO + 1 s")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=60.0)
    p.add_argument("--device-profile", default="jetson")
    p.add_argument("--link", default="wifi-metro")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--noise", type=float, default=0.0, help="relative noise on simulated batch times")
    p.add_argument("--procs", type=int, default=2, help="worker processes (GPUs are simulated in parallel)")
    p.add_argument("--sweep", default="", help="capacity sweeps on one GPU: any of rtt,draft,accept")
    p.add_argument(
        "--validate",
        help="a bench.json: re-simulate each point with its own arm, SLO, device, link and trace, and report the "
        "error per point and SLO judged (fleet/sim_validate.py)",
    )
    p.add_argument(
        "--tenants",
        dest="tenant_shares",
        type=_shares,
        default=(),
        metavar="SHARES",
        help="fair sharing: the devices split into tenants t0, t1, ... by these shares (e.g. 0.95,0.05); the "
        "summary then has one entry per tenant",
    )
    p.add_argument(
        "--tenant-weight",
        action="append",
        default=[],
        type=parse_tenant_weight,
        metavar="TENANT=W",
        help="a tenant's weight in the fair share (repeatable, e.g. t1=2; others weigh 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-hybrid",
        action="store_true",
        help="wisp policy: no load-adaptive hybrid and no truncated verify (as `wisp serve --no-hybrid --no-truncate`)",
    )
    p.add_argument(
        "--no-regime",
        action="store_true",
        help="wisp policy: no regime (as `wisp serve --no-regime`)",
    )
    p.add_argument(
        "--no-start-on-server",
        action="store_true",
        help="devices do not offer to start decoded by the server (as `wisp serve --no-start-on-server` declines)",
    )
    p.add_argument(
        "--no-truncate",
        action="store_true",
        help="wisp policy: verify every draft token, not only the prefix that pays (as `wisp serve --no-truncate`)",
    )
    p.add_argument(
        "--learn",
        action="store_true",
        help="the simulated servers' estimators refit online on the simulated steps (host time included), as "
        "`wisp serve`'s do: the regime then reads the fits a server would",
    )
    p.add_argument(
        "--draft-cap",
        action="store_true",
        help="wisp policy: under load, verdicts cap drafts at the regime's best k (as `wisp serve --draft-cap`)",
    )
    p.add_argument(
        "--refuse",
        action="store_true",
        help="wisp policy: a round or decode may be left out of a batch for a member's deadline (as `wisp serve --refuse`)",
    )
    p.add_argument(
        "--no-fill",
        action="store_true",
        help="wisp policy: do not fill the weight read (as `wisp serve --no-fill`; docs/scheduling.md §10)",
    )
    p.add_argument(
        "--align",
        action="store_true",
        help="wisp policy: verdicts carry a launch hint and devices align their rounds with the next step "
        "(as `wisp serve --align`; docs/scheduling.md §11)",
    )
    p.add_argument(
        "--host-time",
        default="auto",
        metavar="auto|default|off|FILE",
        help="serial host time per engine step on the simulated GPU (fleet/gpu_clock.py): auto = the estimator "
        "file's `host` block, else the default fitted from the H200 steps logs; off = none (the old perfect loop); "
        "or a JSON file with a `host` block (bench/fit_host_time.py prints one)",
    )
    p.add_argument(
        "--padded-clock",
        action="store_true",
        help="the GPU clock keeps a paged estimator's padded features (default: folded into their packed twins)",
    )
    p.add_argument(
        "--device-round-ms",
        type=float,
        default=0.0,
        help="per-round time on the device besides drafting (client/SDK work, the fleet's event loops)",
    )
    p.add_argument("--out", default="runs/sim")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from wisp_cloud.fleet.sim_driver import run_cli

    if args.devices < 1 or args.gpus < 1:
        raise WispError("--devices and --gpus must be >= 1")
    args.trace_given = args.trace  # --validate replays the bench's own trace unless one is given
    resolve_workload_args(args, trace=True)
    return run_cli(args)
