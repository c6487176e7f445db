"""The edge fleet: N emulated devices in one or more worker processes, each running sessions through the real
client against a running server. `run_shard` is what a worker process runs; it returns one record per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
import time
from typing import Any

log = logging.getLogger("wisp.fleet")


def _record(dev: int, plan: Any, start: float, **kw: Any) -> dict[str, Any]:
    rec = {
        "device": dev,
        "prompt_index": plan["prompt_index"],
        "max_new_tokens": plan["max_new_tokens"],
        "start_s": start,
        "ttft_ms": None,
        "tpot_ms": None,
        "new_tokens": 0,
        "total_ms": None,
        "met": False,
        "refused": False,
        "error": None,
        "rounds": 0,
        "drafted": 0,
        "accepted": 0,
        "siblings": 0,
        "sibling_hits": 0,
        "wasted_ms": 0.0,
        "draft_busy_ms": 0.0,
        "diverged_at": None,
    }
    rec.update(kw)
    return rec


async def _device(
    dev: int,
    plans: list[dict],
    cfg: dict,
    proto: Any,
    traces: list[Any],
    t0: float,
    records: list[dict],
) -> None:
    from wisp_sdk.errors import ServerError, WispError
    from wisp_sdk.protocol import SLO

    from wisp_cloud.fleet.emulated import EmulatedDraft, ShapedClient

    mode = "centralized" if cfg["mode"] == "centralized" else "speculative"
    client = ShapedClient.from_prototype(
        proto, mode, link=cfg["link"], seed=cfg["seed"] * 100_003 + dev, controller=cfg["controller"]
    )
    # a device that warmed its draft up at start-up (`AsyncEdgeClient.warm_up`) knows its prefill rate from the first
    # generation on, as the simulator's devices do; without it every first session offers `start_on_server`
    if mode == "speculative":
        client.prefill_ms_per_token = cfg["device"].prefill_ms_per_token
    prompts: list[list[int]] = cfg["prompt_ids"]
    truths: dict[int, list[int]] = cfg.get("truth") or {}
    slo = SLO(ttft_ms=cfg["slo_ttft_ms"], tpot_ms=cfg["slo_tpot_ms"])
    eos = set(proto.manifest.eos_token_ids)
    due = t0 + plans[0]["start_s"]
    inflight: tuple[dict, float] | None = None
    try:
        for j, plan in enumerate(plans):
            if j:
                due = time.perf_counter() + plan["start_s"]
            if due - t0 > cfg["duration_s"]:
                break
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            start = time.perf_counter() - t0
            pi = plan["prompt_index"]
            ids = prompts[pi]
            runner = None
            if mode == "speculative":
                truth = truths.get(pi, [])
                runner = EmulatedDraft(
                    len(ids),
                    truth,
                    traces[pi % len(traces)],
                    cfg["device"],
                    proto.manifest.vocab_size,
                    eos,
                    seed=dev * 7919 + j,
                )
            client.runner = runner
            inflight = (plan, start)
            try:
                res = await client.generate(ids, max_new_tokens=plan["max_new_tokens"], slo=slo)
            except ServerError as exc:
                inflight = None
                records.append(_record(dev, plan, start, refused=exc.code == "overloaded", error=exc.code))
                await asyncio.sleep(cfg.get("retry_backoff_s", 0.5))
                continue
            except (WispError, OSError) as exc:
                inflight = None
                records.append(_record(dev, plan, start, error=f"{type(exc).__name__}: {exc}"[:200]))
                continue
            except Exception as exc:  # a bug must show up as an error, not as a silently missing device
                inflight = None
                log.exception("device %d session failed", dev)
                records.append(_record(dev, plan, start, error=f"{type(exc).__name__}: {exc}"[:200]))
                continue
            inflight = None
            st = res.stats
            tpot = st.tpot_ms
            met = st.ttft_ms <= slo.ttft_ms and tpot <= slo.tpot_ms
            diverged = None
            if mode == "speculative" and truths.get(pi):
                t = truths[pi]
                for k, tok in enumerate(res.token_ids):
                    if k >= len(t) or t[k] != tok:
                        diverged = k
                        break
            records.append(
                _record(
                    dev,
                    plan,
                    start,
                    ttft_ms=st.ttft_ms,
                    tpot_ms=tpot,
                    new_tokens=st.new_tokens,
                    total_ms=st.total_ms,
                    met=bool(met),
                    rounds=len(st.rounds),
                    drafted=st.drafted,
                    accepted=st.accepted,
                    siblings=sum(r.siblings for r in st.rounds),
                    sibling_hits=sum(r.sibling for r in st.rounds),
                    wasted_ms=st.wasted_ms,
                    first_gap_ms=st.first_gap_ms if st.deliveries > 1 else None,
                    max_gap_ms=st.max_gap_ms if st.deliveries > 1 else None,
                    draft_busy_ms=1000.0 * runner.busy_s if runner is not None else 0.0,
                    diverged_at=diverged,
                    finish=res.finish_reason,
                    tokens=res.token_ids if cfg.get("keep_tokens") else None,
                )
            )
    except asyncio.CancelledError:
        if inflight is not None:  # cut off at the end of the drain: counts as a missed session
            records.append(_record(dev, inflight[0], inflight[1], error="unfinished"))
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


async def _shard_main(cfg: dict) -> list[dict]:
    from wisp_sdk.client import AsyncEdgeClient

    from wisp_cloud.fleet.trace_sequence import TraceSequence

    proto = AsyncEdgeClient(
        cfg["url"],
        cfg["bundle"],
        mode="centralized",
        response_timeout_s=cfg.get("response_timeout_s", 60.0),
        resume_deadline_s=cfg.get("resume_deadline_s", 30.0),
        overload_retry_s=0.0,  # a refusal is counted as one (the device retries after retry_backoff_s)
    )
    traces = [TraceSequence(s) for s in cfg["trace"]["sequences"]] if cfg.get("trace") else []
    # Align all shards on one wall-clock start.
    t0 = time.perf_counter() + max(0.0, cfg["t0_epoch"] - time.time())
    records: list[dict] = []
    tasks = [
        asyncio.create_task(_device(d, plans, cfg, proto, traces, t0, records))
        for d, plans in cfg["devices"].items()
    ]
    hard_end = t0 + cfg["duration_s"] + cfg["drain_s"]
    done, pending = await asyncio.wait(tasks, timeout=max(1.0, hard_end - time.perf_counter()))
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5.0)
    with contextlib.suppress(Exception):
        proto._pool.shutdown(wait=False)
    return records


def run_shard(cfg: dict) -> list[dict]:
    """Entry point of a fleet worker process (also callable in-process)."""
    logging.getLogger("wisp.client").setLevel(logging.WARNING)
    random.seed(cfg["seed"])
    # An emulated draft sleeps on its client's thread while this process's loop runs the other devices' frames;
    # waking, it waits for the GIL up to the switch interval, and the server counts that as device time. Python's
    # 5 ms stretched 26-ms drafts to 31-37 ms beside a loop busy 30-60 % in 20-ms bursts, 1 ms to 28-30
    # (bench/fleet_gil.py, dev VM). A real device drafts on its own core: 1 ms, as the server does (tune_runtime).
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    try:
        return asyncio.run(_shard_main(cfg))
    finally:
        sys.setswitchinterval(interval)
