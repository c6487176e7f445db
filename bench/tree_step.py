"""Token trees on the GPU: the tree pass is exact (Triton kernels + CUDA graphs), and what a sibling costs a step.

    python3 bench/tree_step.py --out results/tree_step                     # check + timing grid (one H200: ~4 min)
    python3 bench/tree_step.py --device cpu --out /tmp/ts                  # plumbing dry run, tiny model

1. Check (fp32, a small Qwen2 shape): the paged backend with its Triton kernels and CUDA graphs answers a batch
   of tree verifies (pending token, draft of 4, siblings of its first 0-4 tokens) exactly as (a) its torch path and
   (b) each chain alone, prefilled into a fresh sequence (sibling j's row against prefix + draft[:j] + [sibling]).
2. Timing (bf16, random weights of the public configs): one verify step of B sequences with a draft of k = 4 at
   context C, with m = 0, 1, 2, 4 siblings each, as the backend's whole `forward` (graph replay included),
   median of repeats. The marginal cost of a sibling token against a draft token is what the controller's price
   (sched/pricing.py) charges for both.

Writes tree_step.json (and tree_step.png with matplotlib) to --out. Needs torch, transformers, triton.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "cloud"), str(ROOT / "sdk")]

import torch  # noqa: E402
from wisp_cloud.backends.base import WorkItem  # noqa: E402
from wisp_cloud.backends.paged import PagedBackend  # noqa: E402
from wisp_cloud.random_model import load_config  # noqa: E402

SMALL = dict(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=8192,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def _small_config():
    from transformers import Qwen2Config

    return Qwen2Config(**SMALL)


def _backend(cfg, device: str, dtype, kernels: str, graphs: bool, seed: int = 0) -> PagedBackend:
    torch.manual_seed(seed)
    return PagedBackend(
        cfg, device, dtype, kv_budget_tokens=65536, kernels=kernels, cuda_graphs=graphs, capture_after=1
    )


def check(device: str) -> dict:
    """Tree rows of the fast path against its torch path and against each chain alone."""
    cfg = _small_config()
    graphs = device == "cuda"
    fast = _backend(cfg, device, torch.float32, "triton" if graphs else "torch", graphs)
    ref = _backend(cfg, device, torch.float32, "torch", False)
    rng = random.Random(0)
    vocab = cfg.vocab_size
    prefix = {f"s{i}": [rng.randrange(vocab) for _ in range(rng.randint(40, 600))] for i in range(8)}
    for be in (fast, ref):
        be.forward([WorkItem(s, toks[:-1], n_logits=0) for s, toks in prefix.items()])
    rows = same_ref = same_chain = 0
    for rep in range(3):  # the graph path captures after its first use: replays count too
        items, trees = [], {}
        for i, s in enumerate(prefix):
            m = i % 5
            draft = [rng.randrange(vocab) for _ in range(4)]
            sibs = [rng.randrange(vocab) for _ in range(m)]
            trees[s] = (draft, sibs)
            items.append(WorkItem(s, [prefix[s][-1], *draft, *sibs], n_logits=5 + m, siblings=m))
        got, _ = fast.forward(items)
        want, _ = ref.forward(items)
        for it, g, w in zip(items, got, want, strict=True):
            draft, sibs = trees[it.seq_id]
            rows += len(g.argmax)
            same_ref += sum(a == b for a, b in zip(g.argmax, w.argmax, strict=True))
            base = prefix[it.seq_id]
            for j, sib in enumerate(sibs):  # each sibling's chain alone, in a fresh sequence of the fast path
                sid = f"chain{rep}-{it.seq_id}-{j}"
                (alone,), _ = fast.forward([WorkItem(sid, base + draft[:j] + [sib], n_logits=1)])
                same_chain += alone.argmax[0] == g.argmax[5 + j]
                fast.release(sid)
            for be in (fast, ref):
                be.truncate(it.seq_id, len(base) - 1)
    n_sib = 3 * sum(i % 5 for i in range(8))
    return {
        "rows": rows,
        "equal_to_torch_path": same_ref / rows,
        "sibling_rows": n_sib,
        "sibling_equal_to_chain": same_chain / n_sib,
        "graph_stats": fast.graph_stats,
    }


def _step(be: PagedBackend, items: list[WorkItem], seqs: list[str], context: int) -> None:
    be.forward(items)
    for s in seqs:
        be.truncate(s, context)


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def timing(
    model: str, batches: list[int], context: int, sibs: list[int], reps: int, device: str
) -> list[dict]:
    cfg = load_config(model) if device == "cuda" else _small_config()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    be = PagedBackend(
        cfg,
        device,
        dtype,
        kv_budget_tokens=max(batches) * (context + 16) + 4096,
        capture_after=1,
    )
    print(f"{model}: backend built in {time.perf_counter() - t0:.0f}s", flush=True)
    rng = random.Random(1)
    vocab = be.vocab_size
    out = []
    for b in batches:
        seqs = [f"b{b}-{i}" for i in range(b)]
        for s in seqs:
            be.reserve_uncomputed(s, context)
        for m in sibs:
            items = [
                WorkItem(s, [rng.randrange(vocab) for _ in range(5 + m)], n_logits=5 + m, siblings=m)
                for s in seqs
            ]

            step = functools.partial(_step, be, items, seqs, context)
            for _ in range(3):  # capture, then warm replays
                step()
            ms = _median_ms(step, reps)
            out.append({"model": model, "B": b, "k": 4, "siblings": m, "context": context, "step_ms": ms})
            print(f"  B={b:4d} m={m}: {ms:7.2f} ms", flush=True)
        for s in seqs:
            be.release(s)
    del be
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models = sorted({r["model"] for r in res["timing"]})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        rows = [r for r in res["timing"] if r["model"] == model]
        for m in sorted({r["siblings"] for r in rows}):
            pts = sorted((r["B"], r["step_ms"]) for r in rows if r["siblings"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{m} siblings")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sessions per verify step (B), draft k = 4")
        ax.set_ylabel("step ms (forward, graph replay)")
        ax.set_title(f"{model} shape (random bf16), context {rows[0]['context']}")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"Token-tree verify step on {res['gpu']} — {res['date']} (no SLO: step cost only)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="qwen2.5-7b,qwen2.5-32b")
    ap.add_argument("--batches", default="8,32,64,128,256")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--siblings", default="0,1,2,4")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--name", default="tree_step", help="output file stem")
    ap.add_argument("--skip-check", action="store_true", help="timing only")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = args.device == "cpu"
    res: dict = {
        "gpu": "cpu (dry run)" if cpu else torch.cuda.get_device_name(0),
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    res["check"] = None if args.skip_check else check(args.device)
    print("check:", json.dumps(res["check"]), flush=True)
    res["timing"] = []
    models = ["tiny"] if cpu else args.models.split(",")
    batches = [2, 4] if cpu else [int(b) for b in args.batches.split(",")]
    for model in models:
        res["timing"] += timing(
            model,
            batches,
            args.context if not cpu else 64,
            [int(m) for m in args.siblings.split(",")],
            args.reps if not cpu else 2,
            args.device,
        )
        (out / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, out / f"{args.name}.png")
    chk = res["check"]
    ok = chk is None or (chk["sibling_equal_to_chain"] == 1.0 and chk["equal_to_torch_path"] == 1.0)
    print("tree pass exact" if ok else "TREE PASS MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
