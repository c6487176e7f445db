"""Drivers behind `wisp simulate`: one large run, capacity sweeps, and validation against a bench result."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from wisp_sdk.errors import WispError

from wisp_cloud.fleet.gpu_clock import resolve_host
from wisp_cloud.fleet.profiles import get_device, get_link
from wisp_cloud.fleet.sim_point import run_point
from wisp_cloud.fleet.sim_search import estimator_or_default, find_capacity
from wisp_cloud.fleet.simulate import SimConfig
from wisp_cloud.fleet.trace import load_trace
from wisp_cloud.fleet.workload import load_prompts


def _variants(policy: str, sled_k: list[int]) -> list[str]:
    if policy == "centralized":
        return [""]
    if policy == "sled":
        return [f"fixed:{k}" for k in sled_k]
    return ["wisp"]


def sim_config(args: Any, policy: str, controller: str, trace: dict, est: dict, **over: Any) -> SimConfig:
    """A `SimConfig` from `wisp simulate`'s arguments, with `over` replacing fields."""
    seqs = trace["sequences"]
    prompts = load_prompts(args.prompts)
    # a workload file counts its prompts' tokens; a JSONL prompt set borrows the trace's counts
    ptoks = over.pop("prompt_tokens", None) or [
        int(p.get("prompt_tokens") or seqs[i % len(seqs)].get("prompt_tokens", 64))
        for i, p in enumerate(prompts)
    ]
    lengths = over.pop("lengths", None) or [int(p["max_new_tokens"]) for p in prompts]
    cfg = SimConfig(
        policy=policy,
        controller=controller,
        devices=args.devices,
        duration_s=args.duration,
        warmup_s=args.warmup,
        gap_s=args.gap,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        prompt_tokens=ptoks,
        lengths=lengths,
        trace=seqs,
        device=get_device(args.device_profile),
        link=get_link(args.link),
        estimator=est,
        max_batch=args.max_batch,
        noise=args.noise,
        seed=args.seed,
        balance=args.balance,
        tenant_shares=args.tenant_shares,
        tenant_weights=dict(args.tenant_weight),
        hybrid=not args.no_hybrid,
        regime=not args.no_regime,
        start_on_server=not args.no_start_on_server,
        draft_cap=args.draft_cap,
        truncate=not (args.no_hybrid or args.no_truncate),
        learn=args.learn,
        align=args.align,
        policy_kw={"fill": not args.no_fill, "refuse": args.refuse} if policy == "wisp" else None,
        host=resolve_host(est, args.host_time),
        padded_clock=args.padded_clock,
        device_round_ms=args.device_round_ms,
        drain_s=args.drain
        if args.drain is not None
        else args.slo_ttft_ms / 1000 + max(lengths) * args.slo_tpot_ms / 1000 + 1.0,
    )
    return replace(cfg, **over)


def resample_acceptance(seqs: list[dict], alpha: float, seed: int = 0) -> list[dict]:
    """The trace with its acceptance moved to `alpha`: accepted positions dropped (or rejected ones flipped)
    at random, confidences kept. A what-if, labelled as such in the output."""
    rng = random.Random(seed)
    flat = [a for s in seqs for a in s["accepted"]]
    a0 = sum(flat) / max(len(flat), 1)
    out = []
    for s in seqs:
        acc = []
        for a in s["accepted"]:
            if alpha <= a0:
                acc.append(int(a and rng.random() < alpha / max(a0, 1e-9)))
            else:
                acc.append(int(a or rng.random() < (alpha - a0) / max(1 - a0, 1e-9)))
        out.append({**s, "accepted": acc})
    return out


def run_cli(args: Any) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    est = estimator_or_default(args.estimator)
    trace = load_trace(args.trace)
    sled_k = [int(k) for k in args.sled_k.split(",") if k.strip()]
    policies = [p for p in args.policies.split(",") if p.strip()]
    if args.validate:
        return validate(args, est, trace, out)
    if args.sweep:
        return sweeps(args, est, trace, policies, sled_k, out)
    pool = ProcessPoolExecutor(args.procs) if args.procs > 1 else None
    result: dict[str, Any] = {
        "kind": "wisp-simulate",
        "devices": args.devices,
        "gpus": args.gpus,
        "balance": args.balance,
        "runs": [],
    }
    t_all = time.perf_counter()
    try:
        for policy in policies:
            for ctl in _variants(policy, sled_k):
                cfg = sim_config(args, policy, ctl, trace, est)
                s = run_point(cfg, gpus=args.gpus, procs=args.procs, pool=pool)
                s.pop("tpot_ms", None)
                s.pop("ttft_ms", None)
                s.update(policy=policy, controller=ctl)
                result["runs"].append(s)
                print(
                    f"[sim] {policy:<12}{ctl:<9} {args.devices} devices / {args.gpus} GPUs: "
                    f"{s['sessions']} sessions, attainment {s['attainment']:.3f}, "
                    f"goodput {s['goodput_tok_s']:.0f} tok/s, tpot p50 {s['tpot_p50_ms']:.0f} ms, "
                    f"{s['balance']}: {s['sessions_per_replica_min']}-{s['sessions_per_replica_max']} "
                    f"sessions per GPU ({s['wall_s']:.0f}s wall)",
                    flush=True,
                )
                for name, t in s.get("tenants", {}).items():
                    print(
                        f"[sim]   tenant {name}: {t['sessions']} sessions, attainment {t['attainment']:.3f}, "
                        f"tpot p50 {t['tpot_p50_ms']:.0f} ms",
                        flush=True,
                    )
    finally:
        if pool is not None:
            pool.shutdown()
    result["wall_s"] = round(time.perf_counter() - t_all, 1)
    (out / "simulate.json").write_text(json.dumps(result, indent=1))
    print(f"[sim] total wall {result['wall_s']}s; wrote {out / 'simulate.json'}")
    return 0


SWEEPS = {
    "rtt": [5.0, 60.0, 250.0],
    "draft": [5.0, 18.5, 60.0],
    "accept": [0.5, 0.7, 0.9],
}


def sweeps(args: Any, est: dict, trace: dict, policies: list[str], sled_k: list[int], out: Path) -> int:
    from wisp_cloud.fleet.plots import plot_sweeps

    res: dict[str, list[dict]] = {}
    base_dev, base_link = get_device(args.device_profile), get_link(args.link)
    for param in [p.strip() for p in args.sweep.split(",") if p.strip()]:
        if param not in SWEEPS:
            from wisp_sdk.errors import WispError

            raise WispError(f"unknown sweep {param!r} (have: {', '.join(SWEEPS)})")
        rows = []
        for value in SWEEPS[param]:
            over: dict[str, Any] = {}
            if param == "rtt":
                over["link"] = replace(base_link, rtt_ms=value, name=f"rtt{value:g}")
            elif param == "draft":
                over["device"] = replace(
                    base_dev,
                    decode_ms=value,
                    prefill_ms_per_token=base_dev.prefill_ms_per_token
                    * value
                    / max(base_dev.decode_ms, 1e-9),
                )
            for policy in policies:
                best = (0, 0.0, "")
                for ctl in _variants(policy, sled_k):
                    tr = trace
                    if param == "accept":
                        tr = {**trace, "sequences": resample_acceptance(trace["sequences"], value, args.seed)}
                    cfg = sim_config(args, policy, ctl, tr, est, **over)
                    t = time.perf_counter()
                    cap, gp = find_capacity(cfg)
                    print(
                        f"[sim] {param}={value:<6g} {policy:<12}{ctl:<9} capacity {cap:>5} "
                        f"goodput {gp:8.0f} tok/s ({time.perf_counter() - t:.0f}s)",
                        flush=True,
                    )
                    if (cap, gp) > best[:2]:
                        best = (cap, gp, ctl)
                rows.append(
                    {
                        "param": param,
                        "value": value,
                        "policy": policy,
                        "capacity": best[0],
                        "goodput": best[1],
                        "controller": best[2],
                    }
                )
        res[param] = rows
        (out / "sweeps.json").write_text(
            json.dumps({"kind": "wisp-simulate-sweeps", "sweeps": res}, indent=1)
        )
    files = plot_sweeps(res, out)
    print(f"[sim] wrote {out / 'sweeps.json'} and {', '.join(files)}")
    return 0


def validate(args: Any, est: dict, trace: dict, out: Path) -> int:
    """Re-simulate every point of a bench.json with its own config (fleet/sim_validate.py)."""
    from wisp_cloud.fleet.sim_validate import bench_trace
    from wisp_cloud.fleet.sim_validate import validate as run_validate

    try:
        bench = json.loads(Path(args.validate).read_text())
        c = bench["config"]
        bench["points"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WispError(f"--validate {args.validate}: not a readable `wisp bench` result ({exc!r})") from None
    trace = bench_trace(bench, args.trace_given, trace)
    base = sim_config(
        args, "centralized", "", trace, est, prompt_tokens=c["prompt_tokens"], lengths=c["lengths"]
    )
    base = replace(
        base,
        duration_s=c["duration_s"],
        warmup_s=c["warmup_s"],
        drain_s=c["drain_s"],
        gap_s=c["mean_gap_s"],
        slo_ttft_ms=c["slo"]["ttft_ms"],
    )
    # the server's own batch limit (`wisp serve --max-batch`), not this command's: a run at 512 re-simulated at
    # the default 64 serves an eighth of the decodes per step
    serve = [str(x) for x in c.get("serve") or []]
    if "--max-batch" in serve[:-1]:
        max_batch = int(serve[serve.index("--max-batch") + 1])
        if max_batch != base.max_batch:
            print(f"[validate] --max-batch {max_batch}, the bench server's", flush=True)
        base = replace(base, max_batch=max_batch)
    return run_validate(args, base, bench, args.validate, out)
