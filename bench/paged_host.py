"""Host-side cost of one `PagedBackend.forward` on the CUDA-graph path, measured on a CPU (no GPU needed).

    .venv/bin/python bench/paged_host.py                 # B=8,k=5 and B=64,k=5 at 512 context
    .venv/bin/python bench/paged_host.py --shapes 1x1,8x5,8x9,64x5 --ctx 2048

The backend is built on a tiny config; the CUDA graph of each bucket is replaced by a stand-in whose replay does
nothing (argmax and logits are preallocated tensors), so what is timed is everything `forward` does on the host
around the replay: validation, page bookkeeping, the graph key, packing the int32 metadata into the graph's
input buffer, the copy in (host to host here), reading the argmax back and building the results. The bench's
truncate back to the context (as bench/verify_step.py does after each step) is timed separately. Medians of
--iters steps; on a shared machine, compare runs by their thread CPU time (less disturbed by other tenants).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "cloud"), str(ROOT / "sdk")]

import numpy as np  # noqa: E402
import torch  # noqa: E402


def tiny_config(max_positions: int):
    from verify_step import make_config  # this folder: its CPU dry-run shape

    cfg = make_config("tiny-qwen2")
    cfg.max_position_embeddings = max_positions
    return cfg


def fake_graph(be, key: tuple):
    from wisp_cloud.backends.paged.batch import Batch as _Batch
    from wisp_cloud.backends.paged.batch import views as _views
    from wisp_cloud.backends.paged.graphs import Graph as _Graph

    T, B, tok, W, R, n_tiles = key
    host = torch.zeros(_Batch.size(T, B, W, R, n_tiles), dtype=torch.int32)
    argmax = torch.randint(0, be.vocab_size, (R,))
    logits = torch.zeros(R, be.vocab_size)
    g = _Graph(SimpleNamespace(replay=lambda: None), host, host.numpy(), host.clone(), argmax, logits)
    if hasattr(g, "views"):  # the buffer's field views, made at capture (not in the engine before them)
        g.views = _views(g.host_np, _Batch(g.host_np, T, B, W, R, n_tiles, tok))
    return g


def measure(be, WorkItem, B: int, k: int, ctx: int, iters: int) -> dict:
    seqs = [f"h{B}x{k}s{i}" for i in range(B)]
    for s in seqs:
        be.reserve_uncomputed(s, ctx)
    rng = np.random.default_rng(0)
    items = [WorkItem(s, rng.integers(0, be.vocab_size, k + 1).tolist(), n_logits=k + 1) for s in seqs]
    be.graphs.capture = lambda key, batch, forward_tokens: fake_graph(be, key)  # "captures" a stand-in
    fwd, cpu, pack, trunc = [], [], [], []
    for i in range(iters + 20):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        be.forward(items)
        t1 = time.perf_counter()
        c1 = time.thread_time()
        for s in seqs:
            be.truncate(s, ctx)
        t2 = time.perf_counter()
        if i >= 20:
            fwd.append(t1 - t0)
            cpu.append(c1 - c0)
            trunc.append(t2 - t1)
            pack.append(be.last_timing.get("pack_s", 0.0))
    for s in seqs:
        be.release(s)
    be.graphs.graphs.clear()
    return {
        "forward_us": statistics.median(fwd) * 1e6,
        "forward_cpu_us": statistics.median(cpu) * 1e6,
        "pack_us": statistics.median(pack) * 1e6,
        "truncate_us": statistics.median(trunc) * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1x1,8x5,64x5", help="BxK,... (batch size x draft length)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from wisp_cloud.backends.base import WorkItem
    from wisp_cloud.backends.paged import PagedBackend

    be = PagedBackend(tiny_config(args.ctx + 64), "cpu", torch.float32, kv_budget_tokens=70 * (args.ctx + 64))
    be.cuda_graphs = True  # the graph path, with stand-in graphs
    be.kernels = "triton"  # pack as for the GPU (no per-slot lists for the torch attention)
    for shape in args.shapes.split(","):
        B, k = (int(x) for x in shape.split("x"))
        r = measure(be, WorkItem, B, k, args.ctx, args.iters)
        print(
            f"B={B:3d} k={k} ctx={args.ctx}: forward {r['forward_us']:7.1f} us "
            f"(thread CPU time {r['forward_cpu_us']:7.1f} us) "
            f"(pack {r['pack_us']:6.1f} us), truncate {r['truncate_us']:6.1f} us",
            flush=True,
        )


if __name__ == "__main__":
    main()
