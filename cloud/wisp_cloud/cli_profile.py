"""`wisp profile`: time real batches on the backend, fit the verification-time estimator, report held-out MAPE.

The training grid covers homogeneous verify batches (batch size × tokens per item × context), prefill chunks,
cache-missing items and seeded random ragged mixes. The held-out set is a *different* seeded set of ragged
mixes with batch sizes off the training grid, so its MAPE measures the estimator on shapes it never saw.
Each shape is timed `reps` times after a warm-up and the median forward time is kept (BatchStats.forward_s,
the same number the server refines the estimator from).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wisp_sdk.errors import WispError

from wisp_cloud.backends.factory import device_arg
from wisp_cloud.estimator import BatchShape, GroupRule, ItemShape, Observation, VerifyTimeEstimator
from wisp_cloud.random_model import add_random_model_args, check_model_args

GRIDS = ("quick", "full")


def _ragged(rng: random.Random, b: int, max_ctx: int, prefill: bool, miss_p: float) -> list[ItemShape]:
    items = []
    for _ in range(b):
        c = rng.randint(8, max_ctx - 16)
        items.append(ItemShape(rng.randint(1, 9), c, cache_miss=rng.random() < miss_p and c < max_ctx // 2))
    if prefill:
        n = rng.choice([16, 48, 96, 160, 256])
        c = rng.randint(0, max(0, max_ctx - n - 8))
        items[rng.randrange(b)] = ItemShape(n, c)
    return items


def make_grid(grid: str, max_ctx: int, seed: int = 0) -> tuple[list[list[ItemShape]], list[list[ItemShape]]]:
    """(training batches, held-out batches) for a backend whose sequences may hold `max_ctx` tokens."""
    if grid not in GRIDS:
        raise WispError(f"unknown grid {grid!r}; choose {' or '.join(GRIDS)}")
    quick = grid == "quick"
    max_ctx = max(64, max_ctx)
    ctxs = sorted({c for c in (16, 96, max_ctx // 2, max_ctx - 24) if 0 < c < max_ctx - 10})
    sizes = (1, 2, 4, 8, 16, 32) if not quick else (1, 4, 16)
    ks = (1, 3, 5, 9) if not quick else (1, 5, 9)
    train: list[list[ItemShape]] = []
    for b in sizes:
        for n in ks:
            for c in ctxs if not quick else ctxs[::2]:
                train.append([ItemShape(n, c)] * b)
    for n in (16, 32, 64, 128, 256):
        for c in (0, max_ctx // 3):
            if c + n < max_ctx - 8:
                train.append([ItemShape(n, c)])
    for b in (1, 4, 16) if not quick else (4,):
        train.append([ItemShape(5, 64, cache_miss=True)] * b)
    rng = random.Random(seed)
    for i in range(40 if not quick else 12):
        b = rng.choice(sizes)
        train.append(_ragged(rng, b, max_ctx, prefill=i % 3 == 0, miss_p=0.1 if i % 5 == 0 else 0.0))
    held_rng = random.Random(seed + 1000)
    held_sizes = (3, 6, 12, 24) if not quick else (3, 6, 12)
    held: list[list[ItemShape]] = []
    for i in range(32 if not quick else 12):
        b = held_sizes[i % len(held_sizes)]
        held.append(_ragged(held_rng, b, max_ctx, prefill=i % 4 == 1, miss_p=0.1 if i % 6 == 2 else 0.0))
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


def profile_backend(
    backend: Any,
    grid: str = "quick",
    reps: int = 5,
    seed: int = 0,
    progress: bool = True,
    clock: str = "wall",
    uncomputed_context: bool = False,
) -> tuple[VerifyTimeEstimator, dict[str, Any]]:
    """Time the grid on `backend`, fit, and evaluate on held-out shapes. Returns (estimator, report).

    `clock="cpu"` fits the calling thread's CPU time instead of wall time: on a shared CPU machine wall time
    is mostly other tenants' load, while CPU time is the batch's own work (run torch with one thread so that
    all of it is on the calling thread). The server's online refinement then scales to the wall time it sees.
    """
    if clock not in ("wall", "cpu"):
        raise WispError(f"unknown clock {clock!r} (wall or cpu)")
    from tqdm.auto import tqdm

    max_ctx = int(getattr(backend, "max_positions", None) or 2048)
    max_ctx = min(max_ctx, 2048 if grid == "quick" else 8192)
    want_ctx = max_ctx
    capacity = getattr(backend, "kv_capacity_tokens", None)  # a paged backend's KV pool, in tokens
    if capacity:
        # Every sequence of the largest batch keeps its context (plus a prompt chunk) in the pool at once: a
        # full grid at 8k contexts needs ~270k tokens, more than a 32B model leaves on one GPU (KVCacheFull).
        small_train, small_held = make_grid(grid, 64, seed)  # batch sizes do not depend on the context length
        largest = max(len(b) for b in small_train + small_held)
        max_ctx = min(max_ctx, int(capacity) // largest - 272)
        if max_ctx < 64:
            raise WispError(
                f"the KV pool holds {capacity} tokens: too few for the {grid} grid's batches of {largest} "
                f"sequences; give a larger --kv-budget-tokens (at least {largest * (64 + 272)})"
            )
    train, held = make_grid(grid, max_ctx, seed)
    runner = BatchRunner(backend, seed, uncomputed_context)
    t0 = time.perf_counter()
    shapes_all = train + held
    times: list[list[float]] = [[] for _ in shapes_all]
    walls: list[list[float]] = [[] for _ in shapes_all]
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
        for p in range(reps + 1):  # pass 0 warms up (allocations, first touch) and is not kept
            order = list(range(len(shapes_all)))
            order_rng.shuffle(order)
            for i in order:
                wall = runner.run(shapes_all[i])
                if p:
                    times[i].append(runner.last_cpu_s if clock == "cpu" else wall)
                    walls[i].append(wall)
                bar.update()
    obs = [
        Observation(BatchShape.of(sh), statistics.median(ts))
        for sh, ts in zip(shapes_all, times, strict=True)
    ]
    obs_train, obs_held = obs[: len(train)], obs[len(train) :]
    wall_obs = [Observation(o.shape, statistics.median(w)) for o, w in zip(obs, walls, strict=True)]
    runner.close()
    rule = backend_group_rule(backend)
    est = VerifyTimeEstimator.fitted(obs_train, group_rule=rule)
    wall_est = VerifyTimeEstimator.fitted(wall_obs[: len(train)], group_rule=rule)
    report = {
        "grid": grid,
        "reps": reps,
        "train_batches": len(obs_train),
        "heldout_batches": len(obs_held),
        "train_mape_pct": round(est.evaluate(obs_train), 2),
        "heldout_mape_pct": round(est.evaluate(obs_held), 2),
        "clock": clock,
        "uncomputed_context": runner.uncomputed,
        "wall_heldout_mape_pct": round(wall_est.evaluate(wall_obs[len(train) :]), 2),
        "profile_s": round(time.perf_counter() - t0, 1),
        "max_context": max_ctx,
        "max_context_capped_from": want_ctx if max_ctx < want_ctx else None,
        "coefficients": dict(zip(est.features, est.coef, strict=True)),
    }
    est.meta.update({k: v for k, v in report.items() if k != "coefficients"})
    est.meta["backend"] = getattr(backend, "name", type(backend).__name__)
    return est, report


def _run(args: argparse.Namespace) -> int:
    import json

    check_model_args(args)
    if args.reps < 1:
        raise WispError("--reps must be at least 1")
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
            f"({clock} clock; wall-clock fit: {report['wall_heldout_mape_pct']:.1f} %)"
        )
        if report["max_context_capped_from"]:
            print(
                f"contexts capped at {report['max_context']} tokens (from {report['max_context_capped_from']}) "
                "to fit the KV pool; a larger --kv-budget-tokens profiles longer ones"
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
        "--reps", type=int, default=5, help="timed passes over the grid; each shape's median is kept"
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
