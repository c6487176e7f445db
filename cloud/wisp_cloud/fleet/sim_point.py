"""One simulated point (`run_point`): `wisp simulate`'s fleets over one or more GPUs, summarized as `wisp bench` does."""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from typing import Any

from wisp_cloud.fleet.capacity import judge
from wisp_cloud.fleet.simulate import SimConfig, simulate_gpu


def _summ(records: list[dict], warmup: float, duration: float) -> dict[str, Any]:
    from wisp_cloud.fleet.bench import summarize

    for r in records:
        r.setdefault("diverged_at", None)
    return summarize(records, warmup, duration)


def run_point(cfg: SimConfig, gpus: int = 1, procs: int = 1, pool: ProcessPoolExecutor | None = None) -> dict:
    """`cfg.devices` devices in total over `gpus` GPUs; returns the bench-style summary (goodput summed).
    With a load balancer (`cfg.balance` leastconn/roundrobin) all GPUs are one simulation; else one per GPU."""
    t = time.perf_counter()
    if cfg.balance != "device-hash" and gpus > 1:
        joint = SimConfig(**{**asdict(cfg), "replicas": gpus, "device": cfg.device, "link": cfg.link})
        records = simulate_gpu(joint)
    else:
        per = [cfg.devices // gpus + (1 if g < cfg.devices % gpus else 0) for g in range(gpus)]
        cfgs = [
            SimConfig(**{**asdict(cfg), "devices": n, "seed": cfg.seed * 1000 + g}) for g, n in enumerate(per)
        ]
        for c in cfgs:  # asdict turned the profiles into dicts
            c.device, c.link = cfg.device, cfg.link
        if pool is not None and gpus > 1:
            results = list(pool.map(simulate_gpu, cfgs))
        else:
            results = [simulate_gpu(c) for c in cfgs]
        for g, rs in enumerate(results):  # each shard numbered its one replica 0
            for rec in rs:
                rec["replica"] = g
        records = [r for rs in results for r in rs]
    summ = _summ(records, cfg.warmup_s, cfg.duration_s)
    if cfg.tenant_shares:  # the same summary per tenant (fair sharing)
        names = sorted({r["tenant"] for r in records})
        summ["tenants"] = {}
        for name in names:
            per = _summ([r for r in records if r["tenant"] == name], cfg.warmup_s, cfg.duration_s)
            per.pop("tpot_ms", None)  # the raw per-session lists stay out of the summary, as run_cli does
            per.pop("ttft_ms", None)
            summ["tenants"][name] = per
    summ["moves_to_server"] = sum(r["moves"] for r in records)  # the bench's session_switches["centralized"]
    if cfg.judge_tpot_ms:  # as `wisp bench` judges a point at every SLO of --slo-tpot-ms (fleet/capacity.py)
        summ["judged"] = {
            f"{x:g}": judge(records, cfg.warmup_s, cfg.duration_s, cfg.slo_ttft_ms, x)
            for x in cfg.judge_tpot_ms
        }
    summ["wall_s"] = round(time.perf_counter() - t, 2)
    summ["n"] = cfg.devices
    summ["gpus"] = gpus
    summ["balance"] = cfg.balance if gpus > 1 else "device-hash"
    summ.update(_replica_spread(records, gpus, cfg.warmup_s, cfg.duration_s))
    return summ


def _replica_spread(records: list[dict], gpus: int, warmup: float, duration: float) -> dict[str, int]:
    """Sessions opened per replica in the measured window: how even the balancing was."""
    counts = [0] * gpus
    for r in records:
        if warmup <= r["start_s"] < duration:
            counts[r["replica"]] += 1
    return {"sessions_per_replica_min": min(counts), "sessions_per_replica_max": max(counts)}
