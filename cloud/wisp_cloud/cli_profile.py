"""`wisp profile`: time real batches on the backend, fit the verification-time estimator, report held-out MAPE.

The training grid is the shapes the engine runs: B sessions × (k+1) tokens (speculative verifies) and B × 1
(centralized decodes), B up to `--max-batch`, at short and long contexts; prefill chunks, cache-missing items
and seeded ragged mixes. The held-out set is *different* grid points (batch sizes between the training ones,
homogeneous and ragged, another seed), so its MAPE measures the estimator on shapes it never saw.
Each shape is timed after a warm-up pass that is not kept, `reps` times in shuffled round-robin passes, and
again while its median is uncertain (a loaded CPU); the low median of its times is kept (BatchStats.forward_s,
the same number the server refines the estimator from). The fit is robust (Huber IRLS, estimator.py).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wisp_sdk.errors import WispError

from wisp_cloud.backends.factory import device_arg
from wisp_cloud.estimator import (
    DEFAULT_FEATURES,
    VARLEN_FEATURES,
    BatchShape,
    GroupRule,
    ItemShape,
    Observation,
    VerifyTimeEstimator,
)
from wisp_cloud.random_model import add_random_model_args, check_model_args

GRIDS = ("quick", "full")
MIN_SEQ_TOKENS = 64 + 272  # KV tokens a profiled sequence needs at least: a short context and a prompt chunk


def _ragged(rng: random.Random, b: int, max_ctx: int, prefill: bool, miss_p: float) -> list[ItemShape]:
    """A mix as a serving step holds it: speculative verifies of k+1 = 2..9 tokens, centralized decodes of
    one, now and then a prefill chunk or a cache miss."""
    items = []
    decode_share = rng.choice([0.0, 0.3, 1.0])  # all speculative, mixed, all centralized
    for _ in range(b):
        c = rng.randint(8, max(9, max_ctx - 16))
        n = 1 if rng.random() < decode_share else rng.randint(2, 9)
        items.append(ItemShape(n, c, cache_miss=rng.random() < miss_p and c < max_ctx // 2))
    if prefill:
        n = rng.choice([16, 48, 96, 160, 256])
        c = rng.randint(0, max(0, max_ctx - n - 8))
        items[rng.randrange(b)] = ItemShape(n, c)
    return items


def _sizes(lo_hi: tuple[int, ...], max_batch: int) -> tuple[int, ...]:
    """The grid's batch sizes up to `max_batch`, and `max_batch` itself (the engine's largest batch)."""
    return tuple(sorted({b for b in lo_hi if b < max_batch} | {max_batch}))


def make_grid(
    grid: str, max_ctx: int, seed: int = 0, max_batch: int = 64, kv_tokens: int | None = None
) -> tuple[list[list[ItemShape]], list[list[ItemShape]]]:
    """(training batches, held-out batches) for a backend whose sequences may hold `max_ctx` tokens and whose
    batches reach `max_batch` sequences. With `kv_tokens` (a paged KV pool), a batch of B sequences gets
    contexts of at most kv_tokens/B - 272, so that it fits the pool.

    The training grid is the shapes the engine runs, homogeneous: B sessions × (k+1) tokens (speculative
    verifies) and B × 1 (centralized decodes) at short and long contexts, plus prefill chunks, cache misses and
    seeded ragged mixes. The held-out set shares no grid point with it: batch sizes between the training ones,
    homogeneous and ragged, from another seed. So held-out MAPE is split by grid point, not by repeat.
    """
    if grid not in GRIDS:
        raise WispError(f"unknown grid {grid!r}; choose {' or '.join(GRIDS)}")
    if max_batch < 1:
        raise WispError("--max-batch must be at least 1")
    quick = grid == "quick"
    max_ctx = max(64, max_ctx)

    def ctx_cap(b: int) -> int:
        cap = max_ctx if kv_tokens is None else min(max_ctx, kv_tokens // b - 272)
        return max(24, cap)

    ctxs = sorted({c for c in (16, 96, max_ctx // 2, max_ctx - 24) if 0 < c < max_ctx - 10})
    sizes = (
        _sizes((1, 2, 4, 8, 16, 32, 64, 128, 256), max_batch)
        if not quick
        else _sizes((1, 4, 16, 64), max_batch)
    )
    ns = (1, 3, 5, 9) if not quick else (1, 5, 9)
    train: list[list[ItemShape]] = []
    for b in sizes:
        cap = ctx_cap(b)
        for n in ns:
            for c in sorted({min(c, cap - n) for c in (ctxs if not quick else ctxs[::2])}):
                train.append([ItemShape(n, c)] * b)
    for n in (16, 32, 64, 128, 256):
        for c in (0, max_ctx // 3):
            if c + n < max_ctx - 8:
                train.append([ItemShape(n, c)])
    for b in (1, 4, 16):  # three points at least: one alone would fit any outlier exactly
        if b <= max_batch:
            train.append([ItemShape(5, min(64, ctx_cap(b) - 5), cache_miss=True)] * b)
    rng = random.Random(seed)
    for i in range(40 if not quick else 12):
        b = rng.choice(sizes)
        train.append(_ragged(rng, b, ctx_cap(b), prefill=i % 3 == 0, miss_p=0.1 if i % 5 == 0 else 0.0))
    held_rng = random.Random(seed + 1000)
    between = {max(1, round((lo * hi) ** 0.5)) for lo, hi in zip(sizes, sizes[1:], strict=False)}
    held_sizes = tuple(sorted(between - set(sizes))) or (max(1, max_batch - 1),)
    held: list[list[ItemShape]] = []
    for i, b in enumerate(held_sizes * (1 if quick else 2)):
        n = (1, 4, 6)[i % 3]  # a centralized decode, speculative k = 3 and k = 5
        held.append([ItemShape(n, held_rng.randint(16, ctx_cap(b) - n))] * b)
    for i in range(32 if not quick else 12):
        b = held_sizes[i % len(held_sizes)]
        held.append(_ragged(held_rng, b, ctx_cap(b), prefill=i % 4 == 1, miss_p=0.1 if i % 6 == 2 else 0.0))
    return train, held


class BatchRunner:
    """Runs batches of given shapes on a real backend, setting up each sequence's cached context untimed.

    `uncomputed_context`: claim cached contexts without computing them (`backend.reserve_uncomputed`, the paged
    engine's; the KV pages keep whatever they hold), for random-weight targets whose tokens mean nothing: the
    step time does not depend on the KV values, and prefilling thousands of 8k contexts would take minutes.
    """

    def __init__(self, backend: Any, seed: int = 0, uncomputed_context: bool = False) -> None:
        self.backend = backend
        self.uncomputed = uncomputed_context and hasattr(backend, "reserve_uncomputed")
        # a KV pool cannot hold every grid batch's contexts at once: free the sequences a batch does not use
        self.bounded = bool(getattr(backend, "kv_capacity_tokens", None))
        self.rng = random.Random(seed)
        vocab = int(backend.vocab_size)
        self._tok = lambda n: [self.rng.randrange(3, vocab) for _ in range(n)]
        self._ctx: dict[str, list[int]] = {}
        self._used: set[str] = set()
        self.last_cpu_s = self.last_wall_s = 0.0

    def _prepare(self, seq: str, context: int) -> list[int]:
        from wisp_cloud.backends.base import WorkItem

        toks = self._ctx.setdefault(seq, [])
        cached = self.backend.cached_len(seq)
        if cached > len(toks):
            self.backend.truncate(seq, len(toks))
            cached = len(toks)
        if cached >= context:
            self.backend.truncate(seq, context)
            del toks[context:]
            return toks
        if len(toks) > cached:
            del toks[cached:]
        if self.uncomputed:
            self.backend.reserve_uncomputed(seq, context)
            toks.extend([0] * (context - cached))
            return toks
        extra = self._tok(context - cached)
        for i in range(0, len(extra), 256):
            part = extra[i : i + 256]
            self.backend.forward([WorkItem(seq, part, n_logits=0)])
            toks.extend(part)
        return toks

    def run(self, shapes: Sequence[ItemShape]) -> float:
        """Forward one batch of these shapes; returns the backend's forward_s."""
        from wisp_cloud.backends.base import WorkItem

        items = []
        if self.bounded:
            for seq in [q for q in self._used if int(q.rsplit("-", 1)[1]) >= len(shapes)]:
                self.backend.release(seq)
                self._used.discard(seq)
                self._ctx.pop(seq, None)
        for i, s in enumerate(shapes):
            seq = f"profile-{i}"
            self._used.add(seq)
            if s.cache_miss:  # the cache lost this sequence: its context comes again as new tokens
                self.backend.release(seq)
                ctx = self._tok(s.context)
                new = ctx + self._tok(s.new_tokens)
                items.append(WorkItem(seq, new, n_logits=min(s.new_tokens, 16), context=new[: s.context + 1]))
                self._ctx[seq] = new
                continue
            self._prepare(seq, s.context)
            items.append(WorkItem(seq, self._tok(s.new_tokens), n_logits=min(s.new_tokens, 16)))
        t_cpu = time.thread_time()
        _, stats = self.backend.forward(items)
        self.last_cpu_s = time.thread_time() - t_cpu
        self.last_wall_s = float(stats.forward_s)
        return self.last_wall_s

    def close(self) -> None:
        for seq in self._used:
            self.backend.release(seq)
        self._used.clear()
        self._ctx.clear()


def backend_group_rule(backend: Any) -> GroupRule | None:
    """The padded-group rule of a backend that splits batches (NativeBackend), else None."""
    factor = getattr(backend, "max_pad_factor", None)
    return None if factor is None else GroupRule(pad_factor=float(factor), pad_slack=32)


def _spread(ts: list[float]) -> float:
    """Relative standard error of the median of these times, from their MAD (1.2533·1.4826·MAD/√n over the
    median): a burst of load in one reading does not make a shape look noisy."""
    if len(ts) < 2:
        return float("inf")
    med = statistics.median(ts)
    mad = statistics.median(abs(t - med) for t in ts)
    return 1.2533 * 1.4826 * mad / math.sqrt(len(ts)) / med if med > 0 else float("inf")


def profile_backend(
    backend: Any,
    grid: str = "quick",
    reps: int = 5,
    seed: int = 0,
    progress: bool = True,
    clock: str = "wall",
    uncomputed_context: bool = False,
    max_batch: int = 64,
    target_rse: float = 0.03,
    max_reps: int | None = None,
) -> tuple[VerifyTimeEstimator, dict[str, Any]]:
    """Time the grid on `backend`, fit, and evaluate on held-out shapes. Returns (estimator, report).

    Every shape is timed `reps` times after one warm-up pass that is not kept (allocations, graph captures),
    in a shuffled round-robin order, and its times' low median is kept. A shape whose median is still
    uncertain (relative standard error above `target_rse`: a loaded CPU) is timed again, up to `max_reps`
    (default 3 × reps). The fit is robust (Huber IRLS); the report also gives plain least squares' held-out
    MAPE on the same data, for comparison.

    `clock="cpu"` fits the calling thread's CPU time instead of wall time: on a shared CPU machine wall time
    is mostly other tenants' load, while CPU time is the batch's own work (run torch with one thread so that
    all of it is on the calling thread). The server's online refinement then scales to the wall time it sees.
    """
    if clock not in ("wall", "cpu"):
        raise WispError(f"unknown clock {clock!r} (wall or cpu)")
    from tqdm.auto import tqdm

    max_ctx = int(getattr(backend, "max_positions", None) or 2048)
    max_ctx = min(max_ctx, 2048 if grid == "quick" else 8192)
    capacity = getattr(backend, "kv_capacity_tokens", None)  # a paged backend's KV pool, in tokens
    if capacity:
        # A batch of B sequences keeps B contexts (plus a prompt chunk) in the pool at once: large batches get
        # shorter contexts (make_grid), and the largest must still fit a short one.
        need = max_batch * MIN_SEQ_TOKENS
        if int(capacity) < need:
            raise WispError(
                f"the KV pool holds {capacity} tokens: too few for batches of {max_batch} sequences; give a "
                f"larger --kv-budget-tokens (at least {need}) or a smaller --max-batch"
            )
        max_ctx = min(max_ctx, int(capacity) - 272)
    train, held = make_grid(grid, max_ctx, seed, max_batch=max_batch, kv_tokens=capacity)
    runner = BatchRunner(backend, seed, uncomputed_context)
    t0 = time.perf_counter()
    shapes_all = train + held
    times: list[list[float]] = [[] for _ in shapes_all]
    walls: list[list[float]] = [[] for _ in shapes_all]
    cap = max(reps, max_reps if max_reps is not None else 3 * reps)
    # Round-robin passes in a shuffled order: load drift on a shared machine then hits every shape alike,
    # instead of biasing whichever shapes happened to be timed during a busy spell.
    order_rng = random.Random(seed + 7)
    with tqdm(
        total=len(shapes_all) * (reps + 1),
        desc="profiling",
        unit="batch",
        file=sys.stderr,
        disable=not progress,
    ) as bar:
        todo = list(range(len(shapes_all)))
        p = 0
        while todo:
            order_rng.shuffle(todo)
            for i in todo:
                wall = runner.run(shapes_all[i])
                if p:  # pass 0 warms up (allocations, first touch, graph capture) and is not kept
                    times[i].append(runner.last_cpu_s if clock == "cpu" else wall)
                    walls[i].append(wall)
                bar.update()
            p += 1
            if p > reps:  # the fixed passes are done: only shapes still uncertain go again
                todo = [i for i in range(len(shapes_all)) if len(times[i]) < cap]
                todo = [i for i in todo if _spread(times[i]) > target_rse]
                bar.total = bar.n + len(todo)
    obs = [
        Observation(BatchShape.of(sh), statistics.median_low(ts))
        for sh, ts in zip(shapes_all, times, strict=True)
    ]
    obs_train, obs_held = obs[: len(train)], obs[len(train) :]
    wall_obs = [Observation(o.shape, statistics.median_low(w)) for o, w in zip(obs, walls, strict=True)]
    runner.close()
    rule = backend_group_rule(backend)
    features = DEFAULT_FEATURES if rule is not None else VARLEN_FEATURES
    est = VerifyTimeEstimator.fitted(obs_train, features=features, group_rule=rule)
    lsq = VerifyTimeEstimator.fitted(obs_train, features=features, group_rule=rule, robust=False)
    wall_est = VerifyTimeEstimator.fitted(wall_obs[: len(train)], features=features, group_rule=rule)
    n_reps = [len(ts) for ts in times]
    report = {
        "grid": grid,
        "reps": reps,
        "reps_max_used": max(n_reps),
        "timed_batches": sum(n_reps),
        "noise_cv_median": round(
            statistics.median(statistics.pstdev(t) / statistics.mean(t) for t in times), 3
        ),
        "max_batch": max_batch,
        "train_batches": len(obs_train),
        "heldout_batches": len(obs_held),
        "train_mape_pct": round(est.evaluate(obs_train), 2),
        "heldout_mape_pct": round(est.evaluate(obs_held), 2),
        "lsq_heldout_mape_pct": round(lsq.evaluate(obs_held), 2),
        # what even an exact model would score against these held-out medians: E|N(0, rse)| = 0.8·rse
        "heldout_noise_floor_pct": round(
            100 * statistics.mean(0.8 * min(_spread(ts), 1.0) for ts in times[len(train) :]), 2
        ),
        "clock": clock,
        "uncomputed_context": runner.uncomputed,
        "wall_heldout_mape_pct": round(wall_est.evaluate(wall_obs[len(train) :]), 2),
        "profile_s": round(time.perf_counter() - t0, 1),
        "max_context": max_ctx,
        "coefficients": dict(zip(est.features, est.coef, strict=True)),
        "knee": est.knee,  # new tokens per step past which the fit prices compute (None: no roofline term)
    }
    est.meta.update({k: v for k, v in report.items() if k != "coefficients"})
    est.meta["backend"] = getattr(backend, "name", type(backend).__name__)
    est.heldout = obs_held
    return est, report


def _run(args: argparse.Namespace) -> int:
    import json

    check_model_args(args)
    if args.reps < 1:
        raise WispError("--reps must be at least 1")
    if args.max_batch < 1:
        raise WispError("--max-batch must be at least 1")
    if args.target_rse <= 0:
        raise WispError("--target-rse must be positive")
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if args.device == "cpu" else "wall"
    try:
        import torch
    except ImportError as exc:
        raise WispError(f"`wisp profile` needs the cloud extras (pip install 'wisp[cloud]'): {exc}") from exc

    if args.threads or clock == "cpu":
        torch.set_num_threads(args.threads or 1)
    from wisp_cloud.backends.factory import check_device, native_backend, native_engine

    check_device(args.device)

    engine = native_engine(args)
    target = args.target or args.random_config
    if args.target and not Path(args.target).is_dir():
        raise WispError(f"--target {target} is not a model folder")
    try:
        backend = native_backend(args, Path(target), args.kv_budget_tokens)
        if args.random_config:
            with torch.inference_mode():
                backend.kv.normal_()  # contexts are claimed uncomputed (below): never time attention on zeros
    except (OSError, ValueError) as exc:
        raise WispError(f"cannot load target {target}: {exc}") from exc
    est, report = profile_backend(
        backend,
        args.grid,
        args.reps,
        args.seed,
        progress=not args.no_progress,
        clock=clock,
        uncomputed_context=bool(args.random_config),
        max_batch=args.max_batch,
        target_rse=args.target_rse / 100.0,
    )
    est.meta.update({"target": str(target), "device": args.device, "dtype": args.dtype, "engine": engine})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    est.save(out)
    if args.json:
        print(json.dumps({**report, "out": str(out)}))
    else:
        print(
            f"fitted on {report['train_batches']} batches: train MAPE {report['train_mape_pct']:.1f} %, "
            f"held-out MAPE {report['heldout_mape_pct']:.1f} % on {report['heldout_batches']} unseen shapes "
            f"({clock} clock; wall-clock fit: {report['wall_heldout_mape_pct']:.1f} %; plain least squares: "
            f"{report['lsq_heldout_mape_pct']:.1f} %; the held-out timings' own noise: "
            f"{report['heldout_noise_floor_pct']:.1f} %)"
        )
        print(
            f"{report['timed_batches']} timed batches (up to {report['reps_max_used']} per shape; median "
            f"spread {100 * report['noise_cv_median']:.0f} %), batches up to {report['max_batch']}, contexts "
            f"up to {report['max_context']} tokens"
            + (f", roofline knee at {report['knee']} new tokens a step" if report["knee"] is not None else "")
        )
        print(f"wrote {out}")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "profile",
        help="time real batches on the target, fit the verification-time estimator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", help="target model folder (transformers format)")
    add_random_model_args(p)
    p.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "paged", "hf"],
        help="native engine to time (as `wisp serve --engine`); auto = paged on CUDA, hf on CPU",
    )
    p.add_argument(
        "--kv-budget-tokens", type=int, default=None, help="paged engine: KV pool size (default: from memory)"
    )
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument(
        "--dtype", default="auto", help="auto (fp32 on cpu, bf16 on cuda), float32, bfloat16, float16"
    )
    p.add_argument(
        "--out", required=True, help="estimator JSON to write (load it with `wisp serve --estimator`)"
    )
    p.add_argument("--grid", choices=GRIDS, default="quick", help="batch-shape grid (default quick)")
    p.add_argument(
        "--reps", type=int, default=5, help="timed passes over the grid; each shape's (low) median is kept"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=64,
        help="largest batch to profile: give `wisp serve --max-batch` (default 64, as serve's)",
    )
    p.add_argument(
        "--target-rse",
        type=float,
        default=3.0,
        help="time a shape again (up to 3 × --reps) while its median's relative standard error is above this "
        "many percent (default 3)",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 with --clock cpu)"
    )
    p.add_argument(
        "--clock",
        choices=("auto", "wall", "cpu"),
        default="auto",
        help="what to fit: wall time, or the thread's CPU time (robust on a shared CPU); auto = cpu on cpu",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
