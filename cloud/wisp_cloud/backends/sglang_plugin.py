"""The `wisp` SGLang plugin: WISP ordering inside SGLang's waiting queue, and SGLang's real batch timings out.

Registered as an entry point (group `sglang.srt.plugins`, name `wisp`) in pyproject.toml; SGLang loads it in each
of its processes. It does nothing unless `WISP_SGLANG_PLUGIN=1` (set by `SGLangBackend`), so installing wisp
next to SGLang changes nobody else's server.

Hooks (sglang.srt.plugins.hook_registry, AROUND):

* `SchedulePolicy.calc_priority`: after SGLang's own sort (priority, then arrival), WISP requests (request ids
  `wisp:<n_logits>:<serial>:<seq>`, priority = deadline in ms of the monotonic clock) are reordered the way
  the `wisp` policy orders work: requests that are urgent (slack below `URGENT_FACTOR` × their predicted time)
  and can still make it first, least slack first; then the rest by density (tokens it can commit per predicted
  second), highest first; hopeless ones (deadline already unreachable) last, earliest deadline first. Other
  requests keep SGLang's order after WISP's. With `WISP_SGLANG_ORDER=deadline`, SGLang's priority order
  (earliest deadline first) is left as it is.
* `Scheduler.run_batch`: times every batch the scheduler runs and appends one JSON line per batch to
  `WISP_SGLANG_TIMINGS`: `{"mode", "items": [[new_tokens, cached_context], ...], "rids", "forward_s", "t"}`.
  The backend reads it after each forward and feeds `VerifyTimeEstimator.observe`; the plugin's own estimator
  (started from `WISP_SGLANG_ESTIMATOR` or the default prior) learns from the same timings for its predictions.
  On CUDA the timer synchronizes the device first, so it measures the forward and not just the launch.

No sglang import at module level: SGLang imports this module itself through the entry point.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

log = logging.getLogger("wisp.sglang_plugin")

CALC_PRIORITY = "sglang.srt.managers.schedule_policy.SchedulePolicy.calc_priority"
RUN_BATCH = "sglang.srt.managers.scheduler.Scheduler.run_batch"
URGENT_FACTOR = 2.0

_state: dict[str, Any] = {"estimator": None, "lock": threading.Lock(), "registered": False}


def enabled() -> bool:
    return os.environ.get("WISP_SGLANG_PLUGIN") == "1"


def _estimator():
    est = _state["estimator"]
    if est is None:
        from wisp_cloud.estimator import VerifyTimeEstimator

        path = os.environ.get("WISP_SGLANG_ESTIMATOR")
        est = None
        if path:
            try:
                est = VerifyTimeEstimator.load(path)
            except Exception:  # noqa: BLE001 - a bad file falls back to the prior, loudly
                log.exception("wisp plugin: cannot load estimator %s; using the default prior", path)
        _state["estimator"] = est = est or VerifyTimeEstimator.default()
    return est


# ---- ordering ----


def wisp_order_key(now: float, deadline_s: float, new_tokens: int, context: int, n_logits: int, est) -> tuple:
    """Sort key of one WISP request (smaller runs first)."""
    from wisp_cloud.estimator import ItemShape

    cost = max(est.predict([ItemShape(max(1, new_tokens), context)]), 1e-6)
    slack = deadline_s - now - cost
    if slack < 0:
        return (2, deadline_s)  # hopeless: best effort, earliest deadline first
    if slack < URGENT_FACTOR * cost:
        return (0, slack)  # urgent and feasible: least slack first
    return (1, -max(1, n_logits) / cost)  # comfortable: densest first


def reorder(waiting_queue: list, now: float | None = None) -> None:
    """Reorder SGLang's waiting queue in place (WISP requests first, in WISP order; others after, as they were)."""
    from wisp_cloud.backends.sglang import NO_DEADLINE_PRIORITY, parse_rid

    now = time.monotonic() if now is None else now
    est = _estimator()
    keyed = []
    for pos, req in enumerate(waiting_queue):
        info = parse_rid(str(getattr(req, "rid", "")))
        if info is None:
            keyed.append(((3, pos), req))
            continue
        n_logits, _seq = info
        total = len(getattr(req, "origin_input_ids", ()) or ())
        prefix = len(getattr(req, "prefix_indices", ()) or ())
        prio = getattr(req, "priority", None)
        if prio is None or prio >= NO_DEADLINE_PRIORITY:
            keyed.append(((2, float("inf"), pos), req))
            continue
        key = wisp_order_key(now, prio / 1000.0, total - prefix, prefix, n_logits, est)
        keyed.append(((*key, pos), req))
    keyed.sort(key=lambda kr: kr[0])
    waiting_queue[:] = [req for _key, req in keyed]


def _calc_priority_hook(original, self, waiting_queue, *args, **kwargs):
    result = original(self, waiting_queue, *args, **kwargs)
    if os.environ.get("WISP_SGLANG_ORDER", "wisp") == "wisp" and len(waiting_queue) > 1:
        try:
            reorder(waiting_queue)
        except Exception:  # noqa: BLE001 - never break SGLang's scheduler over an ordering preference
            log.exception("wisp plugin: reorder failed; keeping SGLang's order")
    return result


# ---- timings ----


def batch_shapes(batch) -> tuple[str, list[list[int]], list[str]]:
    """(mode, [[new_tokens, cached_context], ...], rids) of an SGLang ScheduleBatch."""
    mode = getattr(getattr(batch, "forward_mode", None), "name", "UNKNOWN")
    reqs = list(getattr(batch, "reqs", None) or [])
    rids = [str(getattr(r, "rid", "")) for r in reqs]
    items: list[list[int]] = []
    extend = getattr(batch, "extend_lens", None)
    prefix = getattr(batch, "prefix_lens", None)
    fm = getattr(batch, "forward_mode", None)
    is_decode = bool(fm is not None and hasattr(fm, "is_decode") and fm.is_decode())
    if not is_decode and extend and prefix and len(extend) == len(reqs):
        items = [[int(e), int(p)] for e, p in zip(extend, prefix, strict=True)]
    else:
        seq_lens = getattr(batch, "seq_lens_cpu", None)
        if seq_lens is not None and len(seq_lens) == len(reqs):
            items = [[1, max(0, int(s) - 1)] for s in seq_lens.tolist()]
        else:
            items = [
                [1, max(0, len(getattr(r, "origin_input_ids", ())) + len(r.output_ids) - 1)] for r in reqs
            ]
    return mode, items, rids


def _sync_device(batch) -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception:  # noqa: BLE001
        pass


def _run_batch_hook(original, self, batch, *args, **kwargs):
    start = time.perf_counter()
    result = original(self, batch, *args, **kwargs)
    try:
        _sync_device(batch)
        forward_s = time.perf_counter() - start
        mode, items, rids = batch_shapes(batch)
        if items:
            record(mode, items, rids, forward_s)
    except Exception:  # noqa: BLE001 - timing is best effort
        log.exception("wisp plugin: could not record a batch timing")
    return result


def record(mode: str, items: list[list[int]], rids: list[str], forward_s: float) -> None:
    from wisp_cloud.estimator import ItemShape

    with _state["lock"]:
        _estimator().observe(forward_s, [ItemShape(n, c) for n, c in items])
        path = os.environ.get("WISP_SGLANG_TIMINGS")
        if path:
            line = json.dumps(
                {"t": time.monotonic(), "mode": mode, "items": items, "rids": rids, "forward_s": forward_s}
            )
            with open(path, "a") as f:  # one write of one line: readers see whole lines
                f.write(line + "\n")


# ---- entry point ----


def register() -> None:
    """Entry point of the `wisp` plugin (group `sglang.srt.plugins`)."""
    if not enabled() or _state["registered"]:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(CALC_PRIORITY, _calc_priority_hook, HookType.AROUND)
    HookRegistry.register(RUN_BATCH, _run_batch_hook, HookType.AROUND)
    _state["registered"] = True
    log.info("wisp plugin: hooked %s and %s", CALC_PRIORITY, RUN_BATCH)
