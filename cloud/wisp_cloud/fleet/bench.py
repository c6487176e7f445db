"""`wisp bench`: a real `wisp serve` per policy and a fleet of N emulated edge devices, swept over N.

One invocation runs every policy against the same server command (model, device, backend), the same prompt
set, trace, device and link profiles and SLO:

  centralized  server --policy centralized, clients in centralized mode (no drafting)
  sled         server --policy sled, clients with FixedK(k), for each k of --sled-k (the best k is reported)
  wisp         server --policy wisp, clients with the Wisp controller

For each (policy, N) the fleet runs `--duration` seconds of Poisson-like session arrivals (each device starts a
session, then waits Exp(--gap) after it ends); sessions that start after `--warmup` are judged. A session meets
its SLO when its client-measured TTFT and TPOT (link included) are within the SLO; refused (`overloaded`),
failed and unfinished sessions count as misses. Attainment = met / judged; goodput = tokens of met sessions ÷
the judged window. Capacity = the largest N swept with attainment ≥ --target (0.9).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from wisp_sdk.errors import WispError

from wisp_cloud.fleet.profiles import get_device, get_link
from wisp_cloud.fleet.workload import SLOSpec, load_prompts, plan_sessions

_LISTEN = re.compile(r"listening on (wss?://\S+)")


# ---------------------------------------------------------------- the server under test


class ServerProc:
    """`wisp serve ... --policy P --port 0` as a subprocess; its log goes to `log_path`."""

    def __init__(
        self,
        serve_args: list[str],
        policy: str,
        log_path: Path,
        startup_s: float = 600.0,
        server_cmd: list[str] | None = None,
    ) -> None:
        prefix = server_cmd or [sys.executable, "-m", "wisp_sdk.cli", "serve"]
        self.cmd = [*prefix, *serve_args, "--policy", policy, "--port", "0"]
        self.lines: list[str] = []
        self.log_path = log_path
        self.startup_s = startup_s
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> ServerProc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            env=os.environ.copy(),
        )
        found: list[str] = []

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.strip())
                m = _LISTEN.search(line)
                if m and not found:
                    found.append(m.group(1))

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + self.startup_s
        while not found:
            if self.proc.poll() is not None:
                self._log.flush()
                tail = self.log_path.read_text()[-2000:]
                raise WispError(f"server exited ({self.proc.returncode}): {' '.join(self.cmd)}\n{tail}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise WispError(f"server did not start within {self.startup_s:.0f}s: {' '.join(self.cmd)}")
            time.sleep(0.1)
        self.url = found[0]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()


# ---------------------------------------------------------------- target continuations


def precompute_truth(
    url: str, bundle: str, prompt_ids: list[list[int]], lengths: list[int], timeout_s: float = 600.0
) -> dict[int, list[int]]:
    """The target's greedy continuation of every prompt, from the server under test (centralized mode)."""
    import asyncio

    from wisp_sdk.client import AsyncEdgeClient

    async def one(i: int) -> tuple[int, list[int]]:
        async with AsyncEdgeClient(url, bundle, mode="centralized", response_timeout_s=timeout_s) as c:
            res = await c.generate(prompt_ids[i], max_new_tokens=lengths[i])
            return i, res.token_ids

    async def main() -> dict[int, list[int]]:
        pairs = await asyncio.gather(*(one(i) for i in range(len(prompt_ids))))
        return dict(pairs)

    return asyncio.run(main())


# ---------------------------------------------------------------- one point


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def summarize(records: list[dict], warmup_s: float, duration_s: float) -> dict[str, Any]:
    judged = [r for r in records if r["start_s"] >= warmup_s]
    window = max(duration_s - warmup_s, 1e-9)
    met = [r for r in judged if r["met"]]
    done = [r for r in judged if r["ttft_ms"] is not None]
    tpots = [r["tpot_ms"] for r in done if r["new_tokens"] >= 2]
    ttfts = [r["ttft_ms"] for r in done]
    drafted = sum(r["drafted"] for r in done)
    errs: dict[str, int] = {}
    for r in judged:
        if r["error"]:
            key = str(r["error"]).split(":")[0]
            errs[key] = errs.get(key, 0) + 1
    unjudged = [r for r in records if r["start_s"] < warmup_s]
    return {
        "sessions": len(judged),
        "error_kinds": errs,
        "warmup_sessions": len(unjudged),
        "warmup_unfinished": sum(1 for r in unjudged if r["error"] == "unfinished"),
        "met": len(met),
        "attainment": len(met) / len(judged) if judged else 0.0,
        "goodput_tok_s": sum(r["new_tokens"] for r in met) / window,
        "throughput_tok_s": sum(r["new_tokens"] for r in done) / window,
        "refused": sum(1 for r in judged if r["refused"]),
        "errors": sum(1 for r in judged if r["error"] and not r["refused"]),
        "ttft_p50_ms": _pct(ttfts, 50),
        "ttft_p99_ms": _pct(ttfts, 99),
        "tpot_p50_ms": _pct(tpots, 50),
        "tpot_p90_ms": _pct(tpots, 90),
        "tpot_p99_ms": _pct(tpots, 99),
        "acceptance": sum(r["accepted"] for r in done) / drafted if drafted else None,
        "tokens_per_round": (
            sum(r["new_tokens"] for r in done) / max(sum(r["rounds"] for r in done), 1) if drafted else None
        ),
        "diverged": sum(1 for r in done if r.get("diverged_at") is not None),
        "wasted_ms_mean": sum(r["wasted_ms"] for r in done) / len(done) if done else 0.0,
        "tpot_ms": sorted(round(x, 3) for x in tpots),
        "ttft_ms": sorted(round(x, 3) for x in ttfts),
    }


class Fleet:
    """Runs points; shards devices over `procs` worker processes (in-process when procs == 1)."""

    def __init__(self, procs: int) -> None:
        self.procs = max(1, procs)
        self.pool: ProcessPoolExecutor | None = None
        if self.procs > 1:
            import multiprocessing as mp

            self.pool = ProcessPoolExecutor(self.procs, mp_context=mp.get_context("spawn"))

    def run(self, base: dict, n: int, plans: list[list[Any]], progress: Any = None) -> list[dict]:
        from wisp_cloud.fleet.fleet import run_shard

        shards: list[dict] = [{} for _ in range(min(self.procs, n))]
        for d in range(n):
            shards[d % len(shards)][d] = [asdict(p) for p in plans[d]]
        t0 = time.time() + (2.0 if self.pool is not None else 0.2)
        cfgs = [{**base, "devices": devs, "t0_epoch": t0} for devs in shards]
        if self.pool is None:
            return run_shard(cfgs[0])
        futs = [self.pool.submit(run_shard, c) for c in cfgs]
        while not all(f.done() for f in futs):
            time.sleep(1.0)
            if progress is not None:
                progress(time.time() - t0)
        out: list[dict] = []
        for f in futs:
            out += f.result()
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- the sweep


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


def run_bench(args: Any) -> dict[str, Any]:
    from wisp_sdk.tokenizer import DraftTokenizer

    from wisp_cloud.fleet.trace import load_trace

    t_begin = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(args.prompts)
    tok = DraftTokenizer(args.draft)
    prompt_ids = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": p["prompt"]}])) for p in prompts
    ]
    lengths = [max(2, int(round(p["max_new_tokens"] * args.length_scale))) for p in prompts]
    trace = load_trace(args.trace)
    device = get_device(args.device_profile)
    link = get_link(args.link)
    slo = SLOSpec(args.slo_ttft_ms, args.slo_tpot_ms)
    if getattr(args, "drain", None) is None:
        args.drain = slo.ttft_ms / 1000 + max(lengths) * slo.tpot_ms / 1000 + 1.0
    ns = sorted({int(x) for x in str(args.n).split(",") if x.strip()})
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    sled_ks = [int(k) for k in str(args.sled_k).split(",") if k.strip()]
    serve_args = list(args.serve_args)
    # every device is one client of one server: no per-token session cap, short TTL for abandoned sessions
    for flag, value in (
        ("--session-ttl", "10"),
        ("--max-sessions", "100000"),
        ("--max-sessions-per-token", "100000"),
    ):
        if flag not in serve_args:
            serve_args += [flag, value]
    result: dict[str, Any] = {
        "kind": "wisp-bench",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_begin)),
        "config": {
            "serve": [*(getattr(args, "server_cmd", None) or ["wisp", "serve"]), *serve_args],
            "policies": policies,
            "n": ns,
            "sled_k": sled_ks,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "drain_s": args.drain,
            "mean_gap_s": args.gap,
            "slo": asdict(slo),
            "target_attainment": args.attainment,
            "prompts": str(args.prompts),
            "lengths": lengths,
            "prompt_tokens": [len(p) for p in prompt_ids],
            "trace": str(args.trace),
            "trace_summary": trace.get("summary"),
            "device_profile": asdict(device),
            "link_profile": asdict(link),
            "procs": args.procs,
            "seed": args.seed,
        },
        "points": [],
    }
    truth: dict[int, list[int]] | None = None
    fleet = Fleet(args.procs)
    log_dir = out / "logs"
    try:
        for policy in policies:
            variants = (
                [(f"fixed:{k}", k) for k in sled_ks]
                if policy == "sled"
                else [("wisp", None)]
                if policy == "wisp"
                else [("", None)]
            )
            server_policy = args.server_policy.get(policy, policy) if args.server_policy else policy
            # one fresh server per policy: same command, model and estimator file, no state carried over
            with ServerProc(
                serve_args,
                server_policy,
                log_dir / f"serve-{policy}.log",
                server_cmd=getattr(args, "server_cmd", None),
            ) as server:
                print(f"[bench] {policy}: server at {server.url}", flush=True)
                if truth is None:
                    t = time.time()
                    truth = precompute_truth(server.url, args.draft, prompt_ids, lengths)
                    print(
                        f"[bench] target continuations: {sum(map(len, truth.values()))} tokens "
                        f"in {time.time() - t:.1f}s",
                        flush=True,
                    )
                    result["truth_lengths"] = [len(truth[i]) for i in range(len(prompt_ids))]
                for controller, k in variants:
                    below = 0
                    for n in ns:
                        plans = plan_sessions(n, args.duration, prompts, args.gap, seed=args.seed)
                        for dev_plans in plans:
                            for pl in dev_plans:
                                pl.max_new_tokens = lengths[pl.prompt_index]
                        base = {
                            "url": server.url,
                            "bundle": args.draft,
                            "mode": "centralized" if policy == "centralized" else "speculative",
                            "controller": controller or None,
                            "prompt_ids": prompt_ids,
                            "truth": truth,
                            "trace": trace,
                            "device": device,
                            "link": link,
                            "slo_ttft_ms": slo.ttft_ms,
                            "slo_tpot_ms": slo.tpot_ms,
                            "duration_s": args.duration,
                            "drain_s": args.drain,
                            "seed": args.seed,
                            "response_timeout_s": max(60.0, args.drain + args.duration),
                        }
                        label = policy + (f"+{controller}" if controller and policy == "sled" else "")
                        t = time.time()

                        def progress(el: float, label: str = label, n: int = n) -> None:
                            total = args.duration + args.drain
                            print(
                                f"\r[bench] {label:<14} N={n:<5} {el:5.0f}/{total:.0f}s", end="", flush=True
                            )

                        recs = fleet.run(base, n, plans, progress if sys.stdout.isatty() else None)
                        summ = summarize(recs, args.warmup, args.duration)
                        point = {"policy": policy, "controller": controller, "k": k, "n": n, **summ}
                        (out / "records").mkdir(exist_ok=True)
                        (out / "records" / f"{label}-{n}.json").write_text(json.dumps(recs))
                        result["points"].append(point)
                        acc = summ["acceptance"]
                        print(
                            f"\r[bench] {label:<14} N={n:<5} sessions {summ['sessions']:>4}  "
                            f"attain {summ['attainment']:.2f}  goodput {summ['goodput_tok_s']:8.1f} tok/s  "
                            f"tpot p50/p90 {summ['tpot_p50_ms']:.0f}/{summ['tpot_p90_ms']:.0f} ms  "
                            f"refused {summ['refused']} err {summ['errors']}"
                            + (f"  accept {acc:.2f}" if acc is not None else "")
                            + (f" diverged {summ['diverged']}" if acc is not None else "")
                            + f"  ({time.time() - t:.0f}s)",
                            flush=True,
                        )
                        (out / "bench.json").write_text(json.dumps(result, indent=1))
                        below = below + 1 if summ["attainment"] < args.stop_below else 0
                        if below >= 2:
                            break
    finally:
        fleet.close()
    finalize(result, args.attainment)
    result["wall_s"] = round(time.time() - t_begin, 1)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    if not args.no_plots:
        from wisp_cloud.fleet.plots import plot_bench

        result["plots"] = plot_bench(result, out)
        (out / "bench.json").write_text(json.dumps(result, indent=1))
    print_summary(result)
    return result


def finalize(result: dict, target: float) -> None:
    """Capacity and goodput per policy (sled: its best k), and the ratios against the goal."""
    pts = result["points"]
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
    result["policies"] = per

    def ratio(a: str, b: str, key: str) -> float | None:
        if a not in per or b not in per or not per[b].get(key):
            return None
        return per[a][key] / per[b][key]

    result["ratios"] = {
        "capacity_vs_centralized": ratio("wisp", "centralized", "capacity"),
        "capacity_vs_sled": ratio("wisp", "sled", "capacity"),
        "capacity_interp_vs_centralized": ratio("wisp", "centralized", "capacity_interp"),
        "capacity_interp_vs_sled": ratio("wisp", "sled", "capacity_interp"),
        "goodput_vs_centralized": ratio("wisp", "centralized", "peak_goodput"),
        "goodput_vs_sled": ratio("wisp", "sled", "peak_goodput"),
        "goal": {
            "capacity_vs_centralized": 2.5,
            "capacity_vs_sled": 5.0,
            "capacity_interp_vs_centralized": 2.5,
            "capacity_interp_vs_sled": 5.0,
            "goodput_vs_centralized": 2.2,
            "goodput_vs_sled": 4.0,
        },
    }


def print_summary(result: dict) -> None:
    print("[bench] capacity (largest N with attainment >= target) and goodput:")
    for policy, d in result.get("policies", {}).items():
        print(
            f"  {policy:<12} capacity {d.get('capacity', 0):>5} (interpolated {d.get('capacity_interp', 0):.0f}"
            + ("+, all swept N passed" if d.get("capacity_is_lower_bound") else "")
            + f")  peak goodput {d.get('peak_goodput', 0):8.1f} tok/s"
            + (f"  ({d['controller']})" if d.get("controller") else "")
        )
    for k, v in result.get("ratios", {}).items():
        if k != "goal":
            goal = result["ratios"]["goal"][k]
            print(f"  {k:<26} {'n/a' if v is None else f'{v:.2f}x'}  (goal {goal}x)")
