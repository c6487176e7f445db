"""GPU check of the paged engine's start-up CUDA graphs: replays give the eager path's tokens, and a fleet's steady
state runs no eager pass.

    python3 bench/graph_check.py --config qwen2.5-1.5b --out /tmp/gc      # on a CUDA machine (~1 min)

Two backends over the same random model (--stable-argmax, so bf16 rounding cannot flip a near-tie): one captures
every decode/verify bucket at start-up (`capture_graphs(startup_keys(...))`, as `wisp serve` does), the other runs
eagerly. Random ragged batches of decodes and verifies (and a few prefill chunks) go through both; the report counts
argmax disagreements (goal 0), eager passes and mid-run captures of the graph backend on decode/verify batches
(goal 0), and the start-up capture's graphs and seconds. Writes graph_check.json under --out.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from wisp_cloud.backends.base import WorkItem
from wisp_cloud.backends.paged import PagedBackend
from wisp_cloud.random_model import build_random_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="qwen2.5-1.5b")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-q", type=int, default=9)
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--out", default="runs/graph_check")
    args = ap.parse_args()
    model = build_random_model(args.config, "cuda", "bfloat16", seed=0, stable_argmax=True)
    kv = 2 * args.max_batch * args.max_context + 4096
    graphs = PagedBackend(model, "cuda", "bfloat16", kv_budget_tokens=kv)
    t0 = time.perf_counter()
    keys = graphs.startup_keys(args.max_batch, args.max_q, args.max_context)
    captured = graphs.capture_graphs(keys, args.budget_s)
    capture_s = time.perf_counter() - t0
    eager = PagedBackend(model, "cuda", "bfloat16", kv_budget_tokens=kv, cuda_graphs=False)
    rng = random.Random(0)
    vocab = min(graphs.vocab_size, 30000)
    ctx: dict[str, int] = {}
    mismatches = checked = 0
    eager_dv = 0
    start_stats = dict(graphs.graph_stats)
    for step in range(args.steps):
        n = rng.randint(1, args.max_batch)
        ids = rng.sample(range(args.max_batch * 2), n)
        items = []
        prefill_step = step % 25 == 0
        for i in ids:
            sid = f"s{i}"
            have = ctx.get(sid, 0)
            if have == 0 or have > args.max_context - 64:
                graphs.release(sid)
                eager.release(sid)
                q = rng.randint(20, 200) if prefill_step else rng.randint(1, args.max_q)
                have = 0
            else:
                q = rng.randint(1, args.max_q)
            toks = [rng.randrange(vocab) for _ in range(q)]
            items.append(WorkItem(sid, toks, n_logits=q))
            ctx[sid] = have + q
        before = graphs.graph_stats["eager"] + graphs.graph_stats["captures"]
        a, _ = graphs.forward(items)
        b, _ = eager.forward(items)
        if max(len(it.new_tokens) for it in items) <= graphs.max_graph_q:
            eager_dv += graphs.graph_stats["eager"] + graphs.graph_stats["captures"] - before
        for ra, rb in zip(a, b, strict=True):
            checked += len(ra.argmax)
            mismatches += sum(x != y for x, y in zip(ra.argmax, rb.argmax, strict=True))
        # reject a random tail in both, as the server does
        for it in items:
            keep = ctx[it.seq_id] - rng.randint(0, len(it.new_tokens) - 1)
            graphs.truncate(it.seq_id, keep)
            eager.truncate(it.seq_id, keep)
            ctx[it.seq_id] = keep
    report = {
        "gpu": torch.cuda.get_device_name(),
        "config": args.config,
        "startup_keys": len(keys),
        "startup_captured": captured,
        "startup_capture_s": round(capture_s, 1),
        "steps": args.steps,
        "tokens_checked": checked,
        "argmax_mismatches": mismatches,
        "eager_or_capture_on_decode_verify_steps": eager_dv,
        "graph_stats_after_startup": start_stats,
        "graph_stats_end": dict(graphs.graph_stats),
        "gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "graph_check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
