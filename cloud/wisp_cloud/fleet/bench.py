"""`wisp bench`: a real `wisp serve` per policy and a fleet of N emulated edge devices, swept over N.

One invocation runs every policy against the same server command (model, device, backend), the same prompt
set, trace, device and link profiles and SLO:

  centralized  server --policy centralized, clients in centralized mode (no drafting)
  sled         server --policy sled, clients with FixedK(k), for each k of --sled-k (the best k is reported)
  wisp         server --policy wisp, clients with the Wisp controller
  wisp+C~F     ablation arms: the wisp server policy with clients' controller C (fixed:K, wisp+ahead, wisp+cap, wisp+tree) and the
               server switches F set for this arm (config.ARM_FLAGS: no-fill, no-hybrid, no-regime, no-start-on-server,
               no-truncate, refuse, align, decode-all, no-probes, draft-cap)

For each (policy, N) the fleet runs `--duration` seconds of Poisson-like session arrivals (each device starts a
session, then waits Exp(--gap) after it ends); sessions that start after `--warmup` are judged. A session meets
its SLO when its client-measured TTFT and TPOT (link included) are within the SLO; refused (`overloaded`),
failed and unfinished sessions count as misses. Attainment = met / judged; goodput = tokens of met sessions ÷
the judged window. Capacity = the largest N swept with attainment ≥ --target (0.9).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wisp_sdk.controllers import FixedK, make_controller
from wisp_sdk.errors import WispError

from wisp_cloud.config import ARM_FLAGS
from wisp_cloud.fleet.capacity import DEVICE_BLIND, SLO_BLIND, finalize, judge, print_summary
from wisp_cloud.fleet.profiles import DeviceProfile, LinkProfile, get_device, get_link
from wisp_cloud.fleet.server_proc import ServerProc
from wisp_cloud.fleet.workload import SLOSpec, load_prompts, plan_sessions

# ---------------------------------------------------------------- target continuations


# `wisp bench --extend`: a sweep that still met the target at its largest N goes on at this × the last N
EXTEND_STEP = 1.15


def precompute_truth(
    url: str, bundle: str, prompt_ids: list[list[int]], lengths: list[int], timeout_s: float = 600.0
) -> dict[int, list[int]]:
    """The target's greedy continuation of every prompt, from the server under test (centralized mode)."""
    import asyncio

    from wisp_sdk.client import AsyncEdgeClient

    from wisp_cloud.fleet.emulated import ShapedClient

    async def main() -> dict[int, list[int]]:
        # one prototype: loading the bundle's tokenizer per prompt took 150 s for 256 ShareGPT prompts
        proto = AsyncEdgeClient(url, bundle, mode="centralized", response_timeout_s=timeout_s)

        async def one(i: int) -> tuple[int, list[int]]:
            c = ShapedClient.from_prototype(proto, "centralized")
            try:
                res = await c.generate(prompt_ids[i], max_new_tokens=lengths[i])
            finally:
                await c.aclose()
            return i, res.token_ids

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
    # the gap from the first token to the next delivery, and each session's longest (fleet.py; None: one delivery)
    first_gaps = [r["first_gap_ms"] for r in done if r.get("first_gap_ms") is not None]
    max_gaps = [r["max_gap_ms"] for r in done if r.get("max_gap_ms") is not None]
    drafted = sum(r["drafted"] for r in done)
    rounds = sum(r["rounds"] for r in done)
    accepted = sum(r["accepted"] for r in done)
    siblings = sum(r.get("siblings", 0) for r in done)
    hits = sum(r.get("sibling_hits", 0) for r in done)
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
        "first_gap_p50_ms": _pct(first_gaps, 50),
        "max_gap_p50_ms": _pct(max_gaps, 50),
        "max_gap_p90_ms": _pct(max_gaps, 90),
        "acceptance": accepted / drafted if drafted else None,
        # a round's mean draft, and verified tokens (the sent drafts, which a truncated verify may cut, and the
        # bonus slot) per token the rounds committed: what speculation costs a compute-bound GPU beside decoding's 1.0
        "draft_len_mean": drafted / rounds if rounds else None,
        # token trees: siblings sent per round, and the share of them committed
        "siblings_per_round": siblings / rounds if rounds else None,
        "sibling_hits": hits,
        "verified_per_committed": (drafted + siblings + rounds) / (accepted + hits + rounds)
        if rounds
        else None,
        # sessions that sent no round (the server decoded them throughout) — not those moved after a round
        "server_decoded_sessions": sum(1 for r in done if r["rounds"] == 0),
        # [sessions, met] of the judged sessions that sent no round and of those that sent some: in which mode a
        # point's misses ran (session 14 could not tell, in the regime's centralized mode, from aggregates alone)
        "met_by_rounds": {
            "none": [sum(1 for r in judged if r["rounds"] == 0), sum(1 for r in met if r["rounds"] == 0)],
            "some": [sum(1 for r in judged if r["rounds"] > 0), sum(1 for r in met if r["rounds"] > 0)],
        },
        "tokens_per_round": (sum(r["new_tokens"] for r in done) / max(rounds, 1) if drafted else None),
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


def _run_point(
    args: Any,
    fleet: Fleet,
    url: str,
    policy: str,
    controller: str,
    k: int | None,
    n: int,
    asked: float,
    judge_at: list[float],
    prompts: list[dict],
    prompt_ids: list[list[int]],
    lengths: list[int],
    truth: dict[int, list[int]],
    trace: dict,
    device: Any,
    link: Any,
    out: Path,
    label: str,
) -> dict[str, Any]:
    """One (policy, variant, SLO asked, N) point: the fleet's sessions, summarized and judged at `judge_at`;
    `label` names it in the progress lines and its records file."""
    plans = plan_sessions(n, args.duration, prompts, args.gap, seed=args.seed)
    for dev_plans in plans:
        for pl in dev_plans:
            pl.max_new_tokens = lengths[pl.prompt_index]
    base = {
        "url": url,
        "bundle": args.draft,
        "mode": "centralized" if policy == "centralized" else "speculative",
        "controller": controller or None,
        "prompt_ids": prompt_ids,
        "truth": truth,
        "trace": trace,
        "device": device,
        "link": link,
        "slo_ttft_ms": args.slo_ttft_ms,
        "slo_tpot_ms": asked,
        "duration_s": args.duration,
        "drain_s": args.drain,
        "seed": args.seed,
        "response_timeout_s": max(60.0, args.drain + args.duration),
    }
    t = time.time()

    def progress(el: float) -> None:
        print(
            f"\r[bench] {label:<14} N={n:<5} {el:5.0f}/{args.duration + args.drain:.0f}s", end="", flush=True
        )

    recs = fleet.run(base, n, plans, progress if sys.stdout.isatty() else None)
    summ = summarize(recs, args.warmup, args.duration)
    judged = {f"{x:g}": judge(recs, args.warmup, args.duration, args.slo_ttft_ms, x) for x in judge_at}
    point = {"policy": policy, "controller": controller, "k": k, "n": n, "slo_tpot_ms": asked, **summ}
    point["judged"] = judged
    (out / "records").mkdir(exist_ok=True)
    (out / "records" / f"{label}-{n}.json").write_text(json.dumps(recs))
    acc = summ["acceptance"]
    attain = "  ".join(f"attain@{key} {j['attainment']:.2f}" for key, j in judged.items())
    print(
        f"\r[bench] {label:<14} N={n:<5} sessions {summ['sessions']:>4}  {attain}  "
        f"goodput {summ['goodput_tok_s']:8.1f} tok/s  "
        f"tpot p50/p90 {summ['tpot_p50_ms']:.0f}/{summ['tpot_p90_ms']:.0f} ms  "
        f"refused {summ['refused']} err {summ['errors']}"
        + (f"  accept {acc:.2f}" if acc is not None else "")
        + (f" diverged {summ['diverged']}" if acc is not None else "")
        + (f" k {summ['draft_len_mean']:.1f}" if summ["draft_len_mean"] is not None else "")
        + f"  ({time.time() - t:.0f}s)",
        flush=True,
    )
    return point


def parse_arm(spec: str) -> tuple[str, str, tuple[str, ...]]:
    """`POLICY[+CONTROLLER][~FLAG...]` -> (policy, controller or "", flags), e.g. `wisp+fixed:3~no-fill`."""
    head, *flags = spec.split("~")
    policy, _, controller = head.partition("+")
    bad = [f for f in flags if f not in ARM_FLAGS]
    if bad or ((flags or controller) and policy != "wisp"):
        raise WispError(
            f"arm {spec!r}: only a wisp arm takes a controller (+fixed:K, +wisp+ahead, +wisp+cap, +wisp+tree) or flags "
            f"(~{', ~'.join(ARM_FLAGS)}); sweep SLED's k with --sled-k"
        )
    if controller:
        try:
            make_controller(controller)
        except ValueError as e:
            raise WispError(f"arm {spec!r}: {e}") from None
    return policy, controller, tuple(flags)


def _fixed_k(controller: str) -> int | None:
    """K of a `fixed:K` controller spec (parsed once, by the SDK's make_controller), else None."""
    ctl = make_controller(controller)
    return ctl.k if isinstance(ctl, FixedK) else None


def _server_stats(server: ServerProc) -> dict[str, Any]:
    st = server.stats()
    keep = (
        "policy_counters",
        "session_switches",
        "switch_reasons",
        "steps",
        "batch_mean",
        "estimator_correction",
        "regime",
    )
    return {k: st.get(k) for k in keep}


@dataclass(frozen=True, eq=False)
class Sweep:
    """One arm's sweep over N: a server policy (with flags), the clients' controller, one device, link and SLO."""

    spec: str
    policy: str
    server_policy: str
    flags: tuple[str, ...]
    controller: str
    k: int | None
    device: DeviceProfile
    link: LinkProfile
    asked: float
    judge_at: list[float]
    label: str


def _sweeps(
    policies: list[str],
    args: Any,
    devices: list[DeviceProfile],
    links: list[LinkProfile],
    tpots: list[float],
    sled_ks: list[int],
) -> list[Sweep]:
    """Every arm × device × link × SLO × controller variant, in the order the arms were given."""
    sweeps = []
    for spec in policies:
        # an arm: a server policy, optionally with the clients' controller (`wisp+fixed:3`) and WISP switches
        # set for this arm (`wisp~no-fill~refuse`); its points carry the whole spec as their policy
        policy, arm_controller, flags = parse_arm(spec)
        # SLO-blind servers are judged at every SLO from one sweep; the others get one sweep per SLO
        asks = [tpots[0]] if policy in SLO_BLIND else tpots
        variants = (
            [(arm_controller, _fixed_k(arm_controller))]
            if arm_controller
            else [(f"fixed:{k}", k) for k in sled_ks]
            if policy == "sled"
            else [("wisp", None)]
            if policy == "wisp"
            else [("", None)]
        )
        server_policy = args.server_policy.get(policy, policy) if args.server_policy else policy
        # a centralized client drafts nothing: its device profile is never used, only its link
        combos = [(dv, lk) for dv in (devices[:1] if policy in DEVICE_BLIND else devices) for lk in links]
        for (dv, lk), asked, (controller, k) in itertools.product(combos, asks, variants):
            label = spec + (f"+{controller}" if controller and policy == "sled" else "")
            label += f"@{asked:g}" if len(asks) > 1 else ""
            label += f"-{dv.name}-{lk.name}" if len(devices) * len(links) > 1 else ""
            judge_at = tpots if policy in SLO_BLIND else [asked]
            sweeps.append(
                Sweep(spec, policy, server_policy, flags, controller, k, dv, lk, asked, judge_at, label)
            )
    return sweeps


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
    devices = [get_device(x.strip()) for x in str(args.device_profile).split(",") if x.strip()]
    links = [get_link(x.strip()) for x in str(args.link).split(",") if x.strip()]
    device, link = devices[0], links[0]
    tpots = [float(x) for x in str(args.slo_tpot_ms).split(",") if x.strip()]  # each judged: capacity.py
    slo = SLOSpec(args.slo_ttft_ms, tpots[0])
    server_cmd = getattr(args, "server_cmd", None)
    if getattr(args, "drain", None) is None:
        args.drain = slo.ttft_ms / 1000 + max(lengths) * max(tpots) / 1000 + 1.0
    ns = sorted({int(x) for x in str(args.n).split(",") if x.strip()})
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for spec in policies:
        parse_arm(spec)  # a bad arm fails before any server starts
    sled_ks = [int(k) for k in str(args.sled_k).split(",") if k.strip()]
    extend = int(getattr(args, "extend", 0) or 0)
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
            "serve": [*(server_cmd or ["wisp", "serve"]), *serve_args],
            "policies": policies,
            "n": ns,
            "sled_k": sled_ks,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "drain_s": args.drain,
            "mean_gap_s": args.gap,
            "slo": asdict(slo),
            "slo_tpot_ms_judged": tpots,
            "target_attainment": args.attainment,
            "workload": getattr(args, "workload", None),
            "prompts": str(args.prompts),
            "lengths": lengths,
            "prompt_tokens": [len(p) for p in prompt_ids],
            "trace": str(args.trace),
            "trace_summary": trace.get("summary"),
            "device_profile": asdict(device),
            "link_profile": asdict(link),
            "device_profiles": [asdict(d) for d in devices],
            "link_profiles": [asdict(x) for x in links],
            "procs": args.procs,
            "seed": args.seed,
            "extend": extend,
        },
        "points": [],
    }
    truth: dict[int, list[int]] | None = None
    fleet = Fleet(args.procs)
    log_dir = out / "logs"
    one_server = not getattr(args, "server_per_policy", False)
    sweeps = _sweeps(policies, args, devices, links, tpots, sled_ks)
    interleave = bool(getattr(args, "interleave", False))
    if interleave and not one_server:
        raise WispError(
            "--interleave switches one server's policy before every point: not with --server-per-policy"
        )
    result["config"]["interleave"] = interleave
    # arm by arm (each sweep's points in a row), or point by point (every sweep at one N before the next N): then
    # a slow spell of the host, or the server's state after an arm, does not land on one arm's points only
    order = [(sw, n) for n in ns for sw in sweeps] if interleave else [(sw, n) for sw in sweeps for n in ns]
    below: dict[Sweep, int] = {}  # per sweep: points in a row below --stop-below (2 end it)
    with contextlib.ExitStack() as stack:
        stack.callback(fleet.close)
        shared: ServerProc | None = None
        # the server of the arm now running (--server-per-policy): closed when the next arm starts, or by `stack`
        arm = stack.enter_context(contextlib.ExitStack())
        server: ServerProc | None = None
        current: str | None = None  # the arm the server's engine runs now
        announced: set[str] = set()

        def run(sw: Sweep, n: int) -> float:
            """Run one point of sweep `sw` at `n` devices; its best attainment over the SLOs it is judged at."""
            nonlocal shared, server, current, truth
            if one_server and shared is None:
                # one process for every arm: the model load and graph capture are paid once; each arm gets a
                # fresh engine and a fresh copy of the start-up estimator (WispServer.switch_policy)
                shared = stack.enter_context(
                    ServerProc(
                        serve_args,
                        sw.server_policy,
                        log_dir / "serve.log",
                        server_cmd=server_cmd,
                        control=True,
                    )
                )
            if shared is not None:
                # a fresh engine per arm, and with --interleave per point
                if interleave or current != sw.spec:
                    shared.switch(sw.server_policy, sw.flags)
                    current = sw.spec
                server = shared
            elif sw.spec != current:  # one fresh server per policy, no state carried over
                current = sw.spec
                arm.close()
                server = arm.enter_context(
                    ServerProc(
                        [*serve_args, *(f"--{f}" for f in sw.flags)],
                        sw.server_policy,
                        log_dir / f"serve-{sw.spec}.log",
                        server_cmd=server_cmd,
                    )
                )
            assert server is not None
            if sw.spec not in announced:
                print(f"[bench] {sw.spec}: server at {server.url}", flush=True)
                announced.add(sw.spec)
            if truth is None:
                t = time.time()
                truth = precompute_truth(server.url, args.draft, prompt_ids, lengths)
                print(
                    f"[bench] target continuations: {sum(map(len, truth.values()))} tokens "
                    f"in {time.time() - t:.1f}s",
                    flush=True,
                )
                result["truth_lengths"] = [len(truth[i]) for i in range(len(prompt_ids))]
            point = _run_point(
                args, fleet, server.url, sw.policy, sw.controller, sw.k, n, sw.asked, sw.judge_at,
                prompts, prompt_ids, lengths, truth, trace, sw.device, sw.link, out, sw.label,
            )  # fmt: skip
            point["policy"] = sw.spec
            point["device"], point["link"] = sw.device.name, sw.link.name
            if shared is not None:
                # the engine's counters, cumulative over the arm (over the point: --interleave)
                point["server"] = _server_stats(shared)
            result["points"].append(point)
            (out / "bench.json").write_text(json.dumps(result, indent=1))
            return max(j["attainment"] for j in point["judged"].values())

        last: dict[Sweep, float] = {}  # per sweep: its last point's best attainment
        for sw, n in order:
            if below.get(sw, 0) >= 2:
                continue
            last[sw] = best = run(sw, n)
            below[sw] = below.get(sw, 0) + 1 if best < args.stop_below else 0
        # --extend: a sweep whose largest N still met the target gives only a lower bound on its capacity; it goes
        # on at EXTEND_STEP × the last N until a point misses (at most `extend` more points)
        for sw in sweeps:
            n = ns[-1]
            for _ in range(extend):
                if last.get(sw, 0.0) < args.attainment:
                    break
                n = max(n + 1, round(n * EXTEND_STEP))
                last[sw] = run(sw, n)
    finalize(result, args.attainment)
    result["wall_s"] = round(time.time() - t_begin, 1)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    if not args.no_plots:
        from wisp_cloud.fleet.plots import plot_bench

        result["plots"] = plot_bench(result, out)
        (out / "bench.json").write_text(json.dumps(result, indent=1))
    print_summary(result)
    return result
