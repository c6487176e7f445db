"""`wisp bench`: capacity and goodput of wisp / sled / centralized with a real server and an emulated fleet.

    wisp bench trace --draft BUNDLE --target DIR --prompts FILE --out TRACE.json
    wisp bench run --serve "--target DIR --device cuda" --draft BUNDLE --trace TRACE.json --n 8,16,32 --out DIR

Only argparse at import time (the dispatcher imports this for `wisp --help`).
"""

from __future__ import annotations

import argparse
import shlex

from wisp_sdk.argtypes import deprecated
from wisp_sdk.errors import WispError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="capacity/goodput benchmark: a real server and a fleet of emulated edge devices",
        description="Sweep the number of edge devices N per policy (wisp, sled, centralized) against a real "
        "`wisp serve`; report SLO attainment, capacity and goodput, with JSON and PNG plots.",
    )
    sub = p.add_subparsers(dest="bench_command", metavar="ACTION")

    r = sub.add_parser("run", help="run the sweep")
    r.add_argument(
        "--serve",
        required=True,
        help='arguments for `wisp serve` (quoted), e.g. "--target DIR --device cuda --backend native"',
    )
    r.add_argument(
        "--server-cmd",
        default="",
        help="server command before its arguments (default: `wisp serve`); it must take `--policy P --port 0` "
        "and print `listening on ws://HOST:PORT`",
    )
    r.add_argument(
        "--draft",
        metavar="BUNDLE",
        help="draft bundle (its manifest and tokenizer; no ONNX needed); required",
    )
    r.add_argument("--bundle", dest="draft", action=deprecated("--draft"), help=argparse.SUPPRESS)
    r.add_argument("--trace", required=True, help="acceptance trace from `wisp bench trace`")
    r.add_argument("--prompts", default="bench/prompts/code10.jsonl", help="prompt set (JSONL)")
    r.add_argument("--policies", default="centralized,sled,wisp", help="comma-separated, run in this order")
    r.add_argument("--n", default="4,8,16,32", help="device counts to sweep (comma-separated)")
    r.add_argument(
        "--sled-k", default="2,4,6", help="FixedK draft lengths swept for sled (best one reported)"
    )
    r.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per point")
    r.add_argument("--warmup", type=float, default=5.0, help="sessions starting earlier are not judged")
    r.add_argument(
        "--drain",
        type=float,
        help="extra seconds for sessions still running (default: TTFT SLO + longest output × TPOT SLO + 1 s, "
        "so a session cut off by the drain could not have met its SLO)",
    )
    r.add_argument("--gap", type=float, default=1.0, help="mean think time between a device's sessions (s)")
    r.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    r.add_argument("--slo-tpot-ms", type=float, default=60.0)
    r.add_argument("--attainment", type=float, default=0.9, help="SLO attainment that defines capacity (0-1)")
    r.add_argument(
        "--target", dest="attainment", type=float, action=deprecated("--attainment"), help=argparse.SUPPRESS
    )
    r.add_argument("--stop-below", type=float, default=0.5, help="stop a sweep after 2 points below this")
    r.add_argument("--device-profile", default="jetson", help="jetson, phone, x86-2core, instant")
    r.add_argument("--link", default="wifi-metro", help="lan, wifi-metro, lte, none")
    r.add_argument("--length-scale", type=float, default=1.0, help="scale the prompt set's output lengths")
    r.add_argument("--procs", type=int, default=1, help="fleet worker processes")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument(
        "--server-policy",
        default="",
        help=argparse.SUPPRESS,  # testing only: map a policy to another server policy, e.g. sled=fifo
    )
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--out", default="runs/bench", help="output folder (bench.json, PNGs, server logs)")
    r.set_defaults(func=_run)

    t = sub.add_parser("trace", help="measure an acceptance trace with a real draft/target pair")
    t.add_argument("--draft", required=True, help="draft bundle (ONNX)")
    t.add_argument("--target", required=True, help="target HF folder or known model name")
    t.add_argument("--prompts", default="bench/prompts/code10.jsonl")
    t.add_argument("--max-new-tokens", type=int, default=64)
    t.add_argument("--limit", type=int, help="first N prompts only")
    t.add_argument("--threads", type=int)
    t.add_argument("--out", required=True)
    t.set_defaults(func=_trace)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _run(args: argparse.Namespace) -> int:
    from wisp_cloud.fleet.bench import run_bench

    if not args.draft:
        raise WispError("wisp bench run needs --draft BUNDLE")
    args.serve_args = shlex.split(args.serve)
    args.server_cmd = shlex.split(args.server_cmd) if args.server_cmd else None
    if args.server_cmd is None and not {"--target", "--random-config"} & set(args.serve_args):
        raise WispError("--serve must include --target or --random-config")
    args.server_policy = dict(kv.split("=", 1) for kv in args.server_policy.split(",") if "=" in kv)
    if args.duration <= args.warmup:
        raise WispError("--duration must be longer than --warmup")
    run_bench(args)
    return 0


def _trace(args: argparse.Namespace) -> int:
    from pathlib import Path

    from wisp_cloud.cli_serve import _resolve_target
    from wisp_cloud.fleet.trace import make_trace

    target = Path(args.target) if Path(args.target, "config.json").is_file() else _resolve_target(args.target)
    trace = make_trace(
        args.draft,
        target,
        args.prompts,
        args.out,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        threads=args.threads,
    )
    s = trace["summary"]
    print(f"wrote {args.out}: {int(s['positions'])} positions, acceptance {s['alpha']:.3f}")
    return 0
