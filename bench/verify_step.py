"""Verify-step time of the paged backend on a GPU, against the memory/compute bound and HF transformers.

    python3 bench/verify_step.py --out results/verify_step        # full grid (~2.5 min on one H200)
    python3 bench/verify_step.py --quick --out /tmp/vs            # the 8B shape at 6 points (~1 min)
    python3 bench/verify_step.py --attn-sweep --out /tmp/vs       # attention launch configs alone
    python3 bench/verify_step.py --device cpu --quick --out /tmp/vs  # dry run of the plumbing, tiny model
    python3 bench/verify_step.py --models llama-3-8b:512,qwen2.5-7b:512/2048 --name part --out /tmp/vs
    python3 bench/verify_step.py --fp32-only --fp32-check llama-3-8b --out /tmp/vs   # argmax check, fp32 vs bf16

For each model shape (Qwen2.5-1.5B, Qwen2.5-7B, Llama-3-8B; configs from wisp_cloud.random_model, random bf16 weights, no hub),
batch size B, draft length k and context length, one verification step (B sequences x (k+1) new tokens, all
k+1 logits) is timed as the backend's whole `forward` call (host packing, copy in, CUDA-graph replay, argmax
back to the host), median over repeats after warm-up, and also as the bare graph replay (CUDA events).

bound = max((weight bytes + KV bytes) / copy bandwidth measured in this run, FLOPs / 800 TFLOP/s).

Also: HF transformers (eager PyTorch, its default SDPA attention, DynamicCache) on a subset; on fresh random
inputs, whether the paged path's argmax equals HF's (prefill chunks + a verify; bf16 near-ties can flip, so the
rate and the logit gaps at disagreements are reported); chunked-prefill TTFT against one HF forward; and a
torch.profiler kernel summary of the Llama-8B shape at B=1,k=1 and B=64,k=5 (the graph-less path, so kernels
show up by name). The HF comparisons, the argmax check, TTFT and the profile run for models whose contexts
include 512. Writes NAME.json (--name, default results; rewritten after every context, so a run cut short keeps
what it measured) and NAME.png if matplotlib is there (unless --no-plot) to --out.

--fp32-check MODELS: the argmax check on the same random weights in fp32 (IEEE fp32 dots in the Triton kernels,
no TF32 in cuBLAS, HF in fp32) and then rounded to bf16, on the same inputs: whether the bf16 disagreements are
rounding (fp32 should agree everywhere) or a kernel bug. Runs after the grid (default qwen2.5-1.5b on a full
CUDA run), or alone with --fp32-only.

Needs only torch, transformers and triton (no pydantic/websockets: the paged backend falls back to local
dataclasses when wisp_sdk cannot be imported).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "cloud"), str(ROOT / "sdk")]

import torch  # noqa: E402
from wisp_cloud.random_model import CONFIGS, load_config  # noqa: E402

# the public architecture configs `wisp serve/profile --random-config` use (random bf16 weights, no hub)
MODELS = {name: CONFIGS[name] for name in ("qwen2.5-1.5b", "qwen2.5-7b", "llama-3-8b")}
# A tiny shape for `--device cpu` dry runs of this script's plumbing (no GPU numbers).
MODELS_DRY = {
    "tiny-qwen2": dict(
        arch="qwen2",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
}
PEAK_FLOPS = 800e12
DEV = "cuda"


def make_config(name: str):
    from transformers import LlamaConfig, Qwen2Config

    if name in MODELS:
        return load_config(name)
    spec = dict(MODELS_DRY[name])
    arch = spec.pop("arch")
    cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    return cls(**spec)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def median_wall(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_events(fn, iters: int, warmup: int = 2) -> float:
    if DEV != "cuda":
        return median_wall(fn, iters, warmup)
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends, strict=False):
        s.record()
        fn()
        e.record()
    sync()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=False)) / 1e3


def measure_copy_bw() -> float:
    n = 1 << 30 if DEV == "cuda" else 1 << 20  # 2 GiB of bf16
    x = torch.randn(n, dtype=torch.bfloat16, device=DEV)
    y = torch.empty_like(x)
    t = median_events(lambda: y.copy_(x), 15, 3)
    return 2 * n * 2 / t  # bytes read + written


def measure_matmul() -> float:
    n = 8192 if DEV == "cuda" else 256
    a = torch.randn(n, n, dtype=torch.bfloat16, device=DEV)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=DEV)
    t = median_events(lambda: a @ b, 10, 3)
    return 2 * n**3 / t


def step_bound(be, B: int, k: int, ctx: int, bw: float) -> dict:
    T = B * (k + 1)
    kv = B * (ctx + k + 1) * be.bytes_per_token
    w = be.weight_bytes_per_step()
    layers, hq, d = be.n_layers, be.n_q_heads, be.head_dim
    attn_flops = sum(4 * (ctx + i + 1) * hq * d * layers for i in range(k + 1)) * B
    flops = 2 * T * be.matmul_params() + attn_flops
    mem_s, flop_s = (w + kv) / bw, flops / PEAK_FLOPS
    return {
        "bound_s": max(mem_s, flop_s),
        "mem_s": mem_s,
        "flop_s": flop_s,
        "weight_bytes": w,
        "kv_bytes": kv,
        "flops": flops,
    }


def rand_tokens(gen, n: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


def time_paged(be, WorkItem, B: int, k: int, ctx: int, gen, iters: int) -> dict:
    seqs = [f"b{B}k{k}c{ctx}s{i}" for i in range(B)]
    for s in seqs:
        be.reserve_uncomputed(s, ctx)
    items = [WorkItem(s, rand_tokens(gen, k + 1, be.vocab_size), n_logits=k + 1) for s in seqs]

    timings = []

    def step():
        be.forward(items)
        timings.append(dict(be.last_timing))
        for s in seqs:
            be.truncate(s, ctx)

    be.capture_after = 1  # capture on first sight: the first step below times the capture
    before = set(be.graph_buckets())
    t_cap = time.perf_counter()
    step()  # captures the bucket's graph
    capture_s = time.perf_counter() - t_cap
    wall = median_wall(step, iters)
    gpu = None
    new = [k for k in be.graph_buckets() if k not in before]
    if be.cuda_graphs and new:
        graph = be.graphs.graphs[new[0]].graph
        gpu = median_events(graph.replay, iters)
    for s in seqs:
        be.release(s)
    host = {k: statistics.median(t[k] for t in timings[1:]) for k in timings[-1]}
    return {"wall_s": wall, "gpu_s": gpu, "capture_s": capture_s, **host}


def hf_model_call(model, **kw):
    return model(**kw)


def time_hf(model, B: int, k: int, ctx: int, vocab: int, gen, iters: int) -> float | None:
    ids = torch.randint(0, vocab, (B, ctx), generator=gen).to(DEV)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        del out
        if not hasattr(cache, "crop"):
            return None
        new = torch.randint(0, vocab, (B, k + 1), generator=gen).to(DEV)

        def step():
            model(input_ids=new, past_key_values=cache, use_cache=True)
            cache.crop(ctx)

        t = median_wall(step, iters)
    return t


def agreement(be, WorkItem, model, gen, n_seqs: int, k: int, chunk: int) -> dict:
    """Paged path (chunked prefill, then one verify of k+1 tokens through the graph path) vs one HF forward."""
    vocab = be.vocab_size
    lens = torch.randint(64, 600, (n_seqs,), generator=gen).tolist()
    prompts = [rand_tokens(gen, n, vocab) for n in lens]
    drafts = [rand_tokens(gen, k + 1, vocab) for _ in range(n_seqs)]
    seqs = [f"agree{i}" for i in range(n_seqs)]
    prefill_argmax: dict[str, int] = {}
    done = [0] * n_seqs
    while any(d < n for d, n in zip(done, lens, strict=False)):
        items = []
        for i, s in enumerate(seqs):
            if done[i] < lens[i]:
                part = prompts[i][done[i] : done[i] + chunk]
                items.append(WorkItem(s, part, n_logits=1))
                done[i] += len(part)
        res, _ = be.forward(items)
        for r in res:
            prefill_argmax[r.seq_id] = r.argmax[-1]
    res, _ = be.forward([WorkItem(s, d, n_logits=k + 1) for s, d in zip(seqs, drafts, strict=False)])
    total = agree = 0
    gaps = []
    margins = []
    match = []
    with torch.inference_mode():
        for i, s in enumerate(seqs):
            ids = torch.tensor([prompts[i] + drafts[i]], device=DEV)
            logits = model(input_ids=ids, logits_to_keep=k + 2).logits[0].float()  # last prompt pos + k+1
            ref = logits.argmax(-1).tolist()
            ours = [prefill_argmax[s]] + res[i].argmax
            top2 = logits.topk(2, dim=-1).values
            margins += (top2[:, 0] - top2[:, 1]).tolist()
            for j, (a, b) in enumerate(zip(ours, ref, strict=False)):
                total += 1
                match.append(a == b)
                if a == b:
                    agree += 1
                else:
                    gaps.append(float(logits[j, b] - logits[j, a]))
            be.release(s)
    return {
        "positions": total,
        "agree": agree,
        "disagreement_rate": 1 - agree / total,
        "hf_logit_gap_at_disagreements": gaps,
        "median_top2_margin_hf": statistics.median(margins),
        "p10_top2_margin_hf": sorted(margins)[len(margins) // 10],
        "match": match,
    }


def fp32_check(name: str, WorkItem, n_seqs: int, k: int = 5, chunk: int = 256) -> dict:
    """The argmax check (paged vs HF eager) on one set of random weights in fp32, then rounded to bf16, on the
    same inputs: fp32 should agree everywhere; bf16 flips are then rounding at near-ties."""
    from wisp_cloud.backends.paged import PagedBackend

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    budget = n_seqs * (600 + k + 32) + 4096
    model = None
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        t0 = time.time()
        if model is None:
            be = PagedBackend(make_config(name), DEV, dtype, kv_budget_tokens=budget)
            model = be.model
        else:
            model = model.to(dtype)  # the fp32 weights, rounded
            be = PagedBackend(model, DEV, dtype, kv_budget_tokens=budget)
        gen = torch.Generator().manual_seed(4321)  # the same prompts and drafts for both dtypes
        a = agreement(be, WorkItem, model, gen, n_seqs, k, chunk)
        tag = str(dtype).removeprefix("torch.")
        out[tag] = a
        print(
            f"{name:13s} {tag:8s} argmax vs HF {tag}: {a['agree']}/{a['positions']} agree "
            f"(HF logit gap at disagreements <= {max(a['hf_logit_gap_at_disagreements'], default=0):.3f}; "
            f"HF top-2 margin median {a['median_top2_margin_hf']:.3f}) in {time.time() - t0:.0f}s",
            flush=True,
        )
        del be
    both = list(zip(out["float32"]["match"], out["bfloat16"]["match"], strict=True))
    out["bf16_only_flips"] = sum(1 for m32, m16 in both if m32 and not m16)
    out["fp32_only_flips"] = sum(1 for m32, m16 in both if m16 and not m32)
    del model
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return out


def ttft(be, WorkItem, model, gen, n: int, chunks: list[int], iters: int) -> dict:
    prompt = rand_tokens(gen, n, be.vocab_size)
    out = {"prompt": n}
    for chunk in chunks:

        def run(chunk=chunk):
            for lo in range(0, n, chunk):
                be.forward([WorkItem("ttft", prompt[lo : lo + chunk], n_logits=1)])
            be.release("ttft")

        out[f"paged_chunk{chunk}_s"] = median_wall(run, iters, 1)
    ids = torch.tensor([prompt], device=DEV)

    def hf():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)

    out["hf_s"] = median_wall(hf, iters, 1)
    return out


def profile(be, WorkItem, gen, B: int, k: int, ctx: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    seqs = [f"prof{i}" for i in range(B)]
    for s in seqs:
        be.reserve_uncomputed(s, ctx)
    items = [WorkItem(s, rand_tokens(gen, k + 1, be.vocab_size), n_logits=k + 1) for s in seqs]
    graphs = be.cuda_graphs
    be.cuda_graphs = False  # kernels by name: the eager launch sequence of what the graph replays

    def step():
        be.forward(items)
        for s in seqs:
            be.truncate(s, ctx)

    step()
    sync()
    n = 5
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        sync()
    be.cuda_graphs = graphs
    for s in seqs:
        be.release(s)
    cats: dict[str, float] = {}
    kernels = []
    for ev in prof.key_averages():
        dt = getattr(ev, "self_device_time_total", None)
        if dt is None:
            dt = getattr(ev, "self_cuda_time_total", 0)
        if not dt or getattr(ev, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        name = ev.key
        low = name.lower()
        if "paged_attn" in low:
            cat = "attention (paged, Triton)"
        elif "rope_kv" in low:
            cat = "rotary + KV write"
        elif "rmsnorm" in low:
            cat = "add + RMSNorm"
        elif "silu" in low:
            cat = "SiLU*up"
        elif any(t in low for t in ("gemm", "gemv", "cutlass", "xmma", "nvjet", "matmul", "splitk")):
            cat = "GEMM (cuBLAS)"
        elif "memcpy" in low or "memset" in low:
            cat = "copies"
        else:
            cat = "other"
        per = dt / n / 1e3  # ms per step
        cats[cat] = cats.get(cat, 0.0) + per
        kernels.append((per, ev.count // n, name[:90]))
    kernels.sort(reverse=True)
    return {
        "B": B,
        "k": k,
        "ctx": ctx,
        "ms_by_category": cats,
        "top_kernels": [{"ms": p, "launches": c, "name": nm} for p, c, nm in kernels[:15]],
    }


ATTN_CONFIGS = [  # (block_n, num_warps, num_stages, waves, split_tokens); the first is the engine's default
    (64, None, 2, 2.0, 128),
    (64, 4, 3, 2.0, 128),
    (128, 4, 2, 2.0, 128),
    (128, 8, 2, 2.0, 256),
    (32, 4, 3, 2.0, 128),
    (64, 4, 2, 4.0, 128),
    (64, 4, 2, 1.0, 128),
    (128, 4, 3, 4.0, 256),
]


def attn_sweep(be, WorkItem, gen, save=None) -> list[dict]:
    """Time one layer's paged attention alone under several launch configurations (`save(rows)` after each
    shape)."""
    from wisp_cloud.backends.paged import kernels as pk
    from wisp_cloud.backends.paged.batch import views as _views

    out_rows = []
    for B, k, ctx in ((1, 1, 512), (1, 9, 2048), (8, 5, 512), (8, 9, 512), (64, 5, 512), (64, 5, 2048)):
        seqs = [f"sw{i}" for i in range(B)]
        for s in seqs:
            be.reserve_uncomputed(s, ctx + k + 1)
        items = [WorkItem(s, rand_tokens(gen, k + 1, be.vocab_size), n_logits=k + 1) for s in seqs]
        key = be._graph_key(items)
        batch = be.packer.pack(items, [ctx] * B, key)
        v = _views(torch.from_numpy(batch.host).to(DEV), batch)
        q = torch.randn(batch.T, be.n_q_heads, be.head_dim, dtype=be.dtype, device=DEV)
        out = torch.empty_like(q)
        kc, vc = be.kv[0, 0], be.kv[0, 1]
        kv_bytes = B * (ctx + k + 1) * 2 * be.n_kv_heads * be.head_dim * be.dtype.itemsize
        row = {"B": B, "k": k, "ctx": ctx, "kv_bytes_per_layer": kv_bytes, "us": {}}
        for cfg in ATTN_CONFIGS:
            bn, nw, ns, waves, st = cfg
            be.attn.waves, be.attn.split_tokens = waves, st
            splits = be.attn.splits(batch.n_tiles, batch.W)

            run = functools.partial(
                pk.paged_attention,
                *(q, kc, vc, out, v["tile_seq"], v["tile_t0"], v["q_start"], v["q_len"], v["kv_len"]),
                *(v["sib_n"], v["sib_at"]),
                *(v["block_table"], be.scaling, batch.tok, be.page_size, splits),
                block_n=bn,
                num_warps=nw,
                num_stages=ns,
            )
            try:
                run()  # compile
                if DEV == "cuda":  # time 10 launches inside a graph: kernel time, not Python launch time
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        for _ in range(10):
                            run()
                    t = median_events(graph.replay, 20, 3) / 10
                else:
                    t = median_events(run, 3, 1)
                row["us"][str(cfg)] = t * 1e6
            except Exception as e:  # a config that does not compile (shared memory) is skipped
                row["us"][str(cfg)] = None
                print(f"attn config {cfg} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
        for s in seqs:
            be.release(s)
        cells = " ".join(f"{(u or float('nan')):7.1f}" for u in row["us"].values())
        print(
            f"attn B={B:2d} k={k} ctx={ctx:5d} ({kv_bytes / 1e6:6.1f} MB/layer, "
            f"{kv_bytes / 4.28e12 * 1e6:5.1f} us at 4.28 TB/s): {cells}",
            flush=True,
        )
        out_rows.append(row)
        if save is not None:
            save(out_rows)
    be.attn.waves, be.attn.split_tokens = ATTN_CONFIGS[0][3], ATTN_CONFIGS[0][4]
    return out_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/verify_step")
    ap.add_argument("--quick", action="store_true", help="the 8B shape at a few points")
    ap.add_argument(
        "--models",
        default=None,
        help="comma-separated subset of "
        + ",".join(MODELS)
        + "; NAME:CTX[/CTX...] picks that model's contexts",
    )
    ap.add_argument(
        "--name", default=None, help="stem of the results file in --out: NAME.json (results; attn_sweep)"
    )
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument(
        "--fp32-check",
        default=None,
        help="models for the fp32-vs-bf16 argmax check after the grid (default: qwen2.5-1.5b on a full CUDA "
        "run with HF; none: skip)",
    )
    ap.add_argument("--fp32-only", action="store_true", help="only the --fp32-check models' argmax check")
    ap.add_argument("--fp32-seqs", type=int, default=12, help="sequences of the fp32 argmax check")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the plumbing on a tiny shape")
    ap.add_argument("--attn-sweep", action="store_true", help="only time attention launch configs (8B shape)")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    args.name = args.name or ("attn_sweep" if args.attn_sweep else "results")

    from wisp_cloud.backends.base import WorkItem
    from wisp_cloud.backends.paged import PagedBackend

    assert DEV != "cuda" or torch.cuda.is_available(), "bench/verify_step.py needs a CUDA GPU"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    t_start = time.time()

    import transformers

    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        dev_name, n_sm = props.name, props.multi_processor_count
    else:
        dev_name, n_sm = platform.processor() or "cpu", 0
    bw = measure_copy_bw()
    mm = measure_matmul()
    meta = {
        "device": dev_name,
        "sm": n_sm,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "copy_bandwidth_Bps": bw,
        "matmul_bf16_flops": mm,
        "peak_flops_for_bound": PEAK_FLOPS,
        "quick": args.quick,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    print(f"# {dev_name}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s", flush=True)

    if args.attn_sweep:
        name = "llama-3-8b" if DEV == "cuda" else "tiny-qwen2"
        be = PagedBackend(
            make_config(name),
            DEV,
            torch.bfloat16 if DEV == "cuda" else torch.float32,
            kv_budget_tokens=64 * 2100 + 4096,
        )
        with torch.inference_mode():
            be.kv.normal_()
        print("configs (block_n, warps, stages, waves, split_tokens):", ATTN_CONFIGS, flush=True)

        def save_sweep(rows) -> None:
            (out_dir / f"{args.name}.json").write_text(
                json.dumps({"meta": meta, "configs": ATTN_CONFIGS, "rows": rows})
            )

        save_sweep(attn_sweep(be, WorkItem, gen, save_sweep))
        return
    fp32_models = [m for m in (args.fp32_check or "").split(",") if m and m != "none"]
    if args.fp32_check is None and not (args.quick or args.models or args.no_hf or args.fp32_only):
        fp32_models = ["qwen2.5-1.5b"]
    if DEV != "cuda":
        fp32_models = ["tiny-qwen2"] if args.fp32_only else []

    def save(rows, extras) -> None:
        result = {"meta": meta, "rows": rows, "extras": extras, "elapsed_s": time.time() - t_start}
        (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1))

    if args.fp32_only:
        extras = {}
        for name in fp32_models:
            try:
                extras[f"fp32_check_{name}"] = fp32_check(name, WorkItem, args.fp32_seqs)
            except Exception as e:
                extras[f"fp32_check_{name}"] = {"error": f"{type(e).__name__}: {e}"}
                print(f"fp32 check of {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            save([], extras)
        print(f"total {time.time() - t_start:.0f}s")
        return
    if args.quick:
        models = ["llama-3-8b"]
        grid_b, grid_k, grid_ctx = [1, 8, 64], [1, 5], [512]
        hf_points = [(1, 1, 512), (8, 5, 512)]
        iters = 10
    else:
        models = list(MODELS)
        grid_b, grid_k, grid_ctx = [1, 8, 32, 64], [1, 5, 9], [512, 2048]
        hf_points = [(1, 1, 512), (1, 5, 512), (8, 5, 512), (32, 5, 512), (64, 5, 512)]
        iters = args.iters
    ctx_of = {}
    if args.models:
        models = []
        for spec in args.models.split(","):
            name, _, ctxs = spec.partition(":")
            models.append(name)
            if ctxs:
                ctx_of[name] = [int(c) for c in ctxs.split("/")]
    if DEV != "cuda":
        models, iters = ["tiny-qwen2"], 3

    rows, extras = [], {}
    for name in models:
        t_model = time.time()
        model_ctx = ctx_of.get(name, grid_ctx)
        max_ctx = max(model_ctx)
        budget = max(grid_b) * (max_ctx + 32) + 16 * 700 + 4096
        dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
        be = PagedBackend(make_config(name), DEV, dtype, kv_budget_tokens=budget)
        with torch.inference_mode():
            be.kv.normal_()  # never time on zeros
        print(
            f"## {name}: {be.weight_bytes_per_step() / 1e9:.2f} GB weights read/step, "
            f"KV pool {be.kv.numel() * be.kv.element_size() / 1e9:.1f} GB, built in {time.time() - t_model:.0f}s",
            flush=True,
        )
        for ctx in model_ctx:
            for B in grid_b:
                for k in grid_k:
                    r = time_paged(be, WorkItem, B, k, ctx, gen, iters)
                    bd = step_bound(be, B, k, ctx, bw)
                    row = {
                        "model": name,
                        "B": B,
                        "k": k,
                        "ctx": ctx,
                        **r,
                        **bd,
                        "ratio": r["wall_s"] / bd["bound_s"],
                        "gpu_ratio": (r["gpu_s"] / bd["bound_s"]) if r["gpu_s"] else None,
                    }
                    rows.append(row)
                    print(
                        f"{name:13s} B={B:3d} k={k} ctx={ctx:5d} pack {r['pack_s'] * 1e3:.2f} "
                        f"launch {r['launch_s'] * 1e3:.2f} wait {r['wait_s'] * 1e3:.2f}  step {r['wall_s'] * 1e3:7.2f} ms  "
                        f"(graph {(r['gpu_s'] or 0) * 1e3:7.2f})  bound {bd['bound_s'] * 1e3:6.2f} ms  "
                        f"x{row['ratio']:.2f}",
                        flush=True,
                    )
            be.clear_graphs()
            save(rows, extras)
        ex = {}
        b0, k0, c0 = grid_b[0], grid_k[0], model_ctx[0]
        again = time_paged(be, WorkItem, b0, k0, c0, gen, iters)
        first = next(r for r in rows if (r["model"], r["B"], r["k"], r["ctx"]) == (name, b0, k0, c0))
        ex["repeat_first_point"] = {"B": b0, "k": k0, "ctx": c0, "first_wall_s": first["wall_s"], **again}
        print(
            f"{name:13s} repeat B={b0} k={k0} ctx={c0}: {again['wall_s'] * 1e3:.2f} ms "
            f"(first {first['wall_s'] * 1e3:.2f}); graph {(again['gpu_s'] or 0) * 1e3:.2f}",
            flush=True,
        )
        be.clear_graphs()
        extras[name] = ex
        save(rows, extras)
        at_512 = 512 in model_ctx or DEV != "cuda"  # the HF comparisons and the profile are at 512 context
        if not args.no_hf and at_512:
            hf = []
            for B, k, ctx in hf_points:
                t = time_hf(be.model, B, k, ctx, be.vocab_size, gen, max(5, iters // 2))
                paged = next(
                    (r for r in rows if (r["model"], r["B"], r["k"], r["ctx"]) == (name, B, k, ctx)), None
                )
                hf.append(
                    {"B": B, "k": k, "ctx": ctx, "hf_s": t, "paged_s": paged["wall_s"] if paged else None}
                )
                print(
                    f"{name:13s} HF B={B} k={k} ctx={ctx}: {t * 1e3 if t else float('nan'):.2f} ms",
                    flush=True,
                )
            ex["hf"] = hf
            try:
                ex["agreement"] = agreement(be, WorkItem, be.model, gen, 8 if args.quick else 12, 5, 256)
                a = ex["agreement"]
                print(
                    f"{name:13s} argmax vs HF: {a['agree']}/{a['positions']} agree "
                    f"(disagreement {a['disagreement_rate']:.3f}; HF top-2 margin median {a['median_top2_margin_hf']:.3f})",
                    flush=True,
                )
                ex["ttft"] = ttft(be, WorkItem, be.model, gen, 2048, [512, 2048], 3)
                print(
                    f"{name:13s} TTFT 2048: {json.dumps({k: round(v, 4) for k, v in ex['ttft'].items()})}",
                    flush=True,
                )
            except Exception as e:  # keep the timing grid even if a check breaks
                ex["error"] = f"{type(e).__name__}: {e}"
                print(f"{name:13s} agreement/TTFT failed: {ex['error'][:300]}", flush=True)
        if not args.no_profile and at_512 and (name == "llama-3-8b" or args.quick):
            ex["profile"] = [
                profile(be, WorkItem, gen, b, k, 512) for b, k in ((1, 1), (1, 5), (8, 5), (64, 5))
            ]
            for p in ex["profile"]:
                cats = ", ".join(
                    f"{c} {v:.2f}" for c, v in sorted(p["ms_by_category"].items(), key=lambda x: -x[1])
                )
                print(f"{name:13s} profile B={p['B']} k={p['k']}: {cats} (ms/step)", flush=True)
        ex["graph_buckets"] = [list(k) for k in be.graph_buckets()]
        del be
        if DEV == "cuda":
            torch.cuda.empty_cache()
        print(f"## {name} done in {time.time() - t_model:.0f}s", flush=True)
        save(rows, extras)

    for name in fp32_models:
        try:
            extras[f"fp32_check_{name}"] = fp32_check(name, WorkItem, args.fp32_seqs)
        except Exception as e:
            print(f"fp32 check of {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        save(rows, extras)
    save(rows, extras)
    if not args.no_plot:
        plot(rows, out_dir, args.name)

    print("\n| model | ctx | B | k | step ms | graph ms | bound ms | step/bound |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['ctx']} | {r['B']} | {r['k']} | {r['wall_s'] * 1e3:.2f} | "
            f"{(r['gpu_s'] or 0) * 1e3:.2f} | {r['bound_s'] * 1e3:.2f} | {r['ratio']:.2f} |"
        )
    print(f"total {time.time() - t_start:.0f}s")


def plot(rows: list[dict], out_dir: Path, name: str = "results") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models, strict=False):
        for ctx in sorted({r["ctx"] for r in rows}):
            for k in sorted({r["k"] for r in rows}):
                pts = sorted(
                    (r["B"], r["ratio"]) for r in rows if r["model"] == m and r["ctx"] == ctx and r["k"] == k
                )
                if pts:
                    ax.plot(*zip(*pts, strict=False), marker="o", label=f"k={k} ctx={ctx}")
        ax.axhline(1.5, color="grey", ls="--", lw=0.8)
        ax.axhline(2.0, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(m)
        ax.set_xlabel("batch size B")
        ax.set_ylabel("step time / bound")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=110)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
