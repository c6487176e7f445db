"""`wisp bench`: capacity and goodput of wisp / sled / centralized with a real server and an emulated fleet.

    wisp bench workload --workload sharegpt --n 256 --out bench/workloads/sharegpt.json
    wisp bench trace --draft BUNDLE --target DIR --workload sharegpt --limit 64 --out bench/traces/sharegpt.json
    wisp bench run --serve "--target DIR --device cuda" --draft BUNDLE --workload sharegpt --n 8,16,32 --out DIR

A workload names a prompt set and its acceptance trace (`workload.WORKLOADS`); --prompts/--trace override them.

Only argparse at import time (the dispatcher imports this for `wisp --help`).
"""

from __future__ import annotations

import argparse
import shlex

from wisp_sdk.argtypes import deprecated
from wisp_sdk.errors import WispError

from wisp_cloud.fleet.workload import add_workload_args, resolve_workload_args

PUBLIC = ("sharegpt", "humaneval")  # workloads sampled from public datasets (`wisp bench workload`)


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
    add_workload_args(r)
    r.add_argument("--trace", help="acceptance trace from `wisp bench trace` (default: the workload's)")
    r.add_argument(
        "--policies",
        default="centralized,sled,wisp",
        help="comma-separated arms, run in this order; a wisp arm may name its clients' controller and turn WISP "
        "switches for itself, for ablations: wisp+fixed:3, wisp~no-fill, wisp~no-hybrid~no-truncate, wisp~refuse, "
        "wisp~align",
    )
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
    r.add_argument(
        "--slo-tpot-ms",
        type=_tpot_list,
        default="60",
        help="TPOT SLO in ms, or a comma-separated list: centralized and SLED are judged at each from one sweep "
        "(their servers ignore the SLO); WISP runs one sweep per SLO, its sessions asking that SLO",
    )
    r.add_argument(
        "--server-per-policy",
        action="store_true",
        help="start a fresh `wisp serve` per policy (default: one server, its policy switched between arms, so "
        "the model load and CUDA graph capture are paid once)",
    )
    r.add_argument(
        "--interleave",
        action="store_true",
        help="run every arm at one N before the next N, a fresh engine per point (default: arm by arm): a slow "
        "spell of the host or the order of the arms then weighs on every arm alike (one server only)",
    )
    r.add_argument("--attainment", type=float, default=0.9, help="SLO attainment that defines capacity (0-1)")
    r.add_argument(
        "--target", dest="attainment", type=float, action=deprecated("--attainment"), help=argparse.SUPPRESS
    )
    r.add_argument("--stop-below", type=float, default=0.5, help="stop a sweep after 2 points below this")
    r.add_argument(
        "--extend",
        type=int,
        default=0,
        metavar="POINTS",
        help="an arm that still meets --attainment at the largest N runs up to POINTS more points, each 1.15x the "
        "last N, until one misses: its capacity is then measured, not a lower bound (default 0: no more points)",
    )
    r.add_argument(
        "--device-profile",
        default="jetson",
        help="jetson, phone, mac-m4, x86-2core, instant; or a comma-separated list (the drafting arms run for each; "
        "centralized, which drafts nothing, once)",
    )
    r.add_argument(
        "--link",
        default="wifi-metro",
        help="lan, wifi-metro, metro-edge, lte, none; or a comma-separated list (every arm runs for each)",
    )
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
    add_workload_args(t)
    t.add_argument("--max-new-tokens", type=int, default=64)
    t.add_argument("--limit", type=int, help="first N prompts only")
    t.add_argument("--threads", type=int)
    t.add_argument("--out", required=True)
    t.set_defaults(func=_trace)

    w = sub.add_parser(
        "workload",
        help="sample request lengths from a public dataset (ShareGPT V3, HumanEval) into a workload file",
        description="Sample requests as vLLM's serving benchmark does (seeded; length filters 4 ≤ prompt ≤ "
        "1024, output ≥ 4, prompt + output ≤ 2048 tokens), counted with the real pair's tokenizer.",
    )
    w.add_argument("--workload", required=True, choices=PUBLIC)
    w.add_argument(
        "--n", type=_positive, help="requests to sample (default: 256 for sharegpt, all 164 for humaneval)"
    )
    w.add_argument("--seed", type=int, default=0)
    w.add_argument(
        "--tokenizer",
        help="folder with tokenizer.json, or a cached model name (default: the real pair's, "
        "qwen2.5-coder-1.5b-instruct)",
    )
    w.add_argument("--dataset", help="sharegpt only: a ShareGPT JSON file instead of the package's")
    w.add_argument("--out", required=True, help="workload JSON to write")
    w.set_defaults(func=_workload)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _tpot_list(text: str) -> str:
    """`60` or `30,60`: positive numbers, checked at parse time; kept as text (bench.py splits it)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive milliseconds, e.g. 60 or 30,60")
    return ",".join(f"{v:g}" for v in values)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run(args: argparse.Namespace) -> int:
    from wisp_cloud.fleet.bench import run_bench

    if not args.draft:
        raise WispError("wisp bench run needs --draft BUNDLE")
    resolve_workload_args(args, trace=True)
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

    resolve_workload_args(args, trace=False)
    target = Path(args.target) if Path(args.target, "config.json").is_file() else _resolve_target(args.target)
    trace = make_trace(
        args.draft,
        target,
        args.prompts,
        args.out,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        threads=args.threads,
        command=shlex.join(["wisp", "bench", "trace", *_trace_flags(args)]),
    )
    s = trace["summary"]
    print(f"wrote {args.out}: {int(s['positions'])} positions, acceptance {s['alpha']:.3f}")
    return 0


def _trace_flags(args: argparse.Namespace) -> list[str]:
    """The trace command's flags as resolved (for the trace's provenance)."""
    out = ["--draft", str(args.draft), "--target", str(args.target), "--prompts", str(args.prompts)]
    out += ["--max-new-tokens", str(args.max_new_tokens)]
    for flag, value in (("--limit", args.limit), ("--threads", args.threads)):
        if value is not None:
            out += [flag, str(value)]
    return [*out, "--out", str(args.out)]


def _workload(args: argparse.Namespace) -> int:
    from wisp_cloud.fleet.datasets import build_workload, pair_tokenizer, save_workload

    if args.dataset and args.workload != "sharegpt":
        raise WispError("--dataset is for --workload sharegpt")
    tok = pair_tokenizer(args.tokenizer)
    parts = ["wisp", "bench", "workload", "--workload", args.workload, "--seed", str(args.seed)]
    for flag, value in (("--n", args.n), ("--tokenizer", args.tokenizer), ("--dataset", args.dataset)):
        if value is not None:
            parts += [flag, str(value)]
    command = shlex.join([*parts, "--out", str(args.out)])
    doc = build_workload(args.workload, args.n, args.seed, tok, args.dataset, command=command)
    save_workload(doc, args.out)
    s = doc["summary"]
    print(
        f"wrote {args.out}: {int(s['requests'])} {args.workload} requests, prompt tokens mean "
        f"{s['prompt_tokens_mean']:.0f} (p90 {s['prompt_tokens_p90']:.0f}), output tokens mean "
        f"{s['output_tokens_mean']:.0f} (p90 {s['output_tokens_p90']:.0f})"
    )
    for note in doc["provenance"]["stats"]["notes"]:
        print(f"note: {note}")
    return 0
