"""Cost of one sampling verify on the SGLang backend: greedy vs full-vocabulary p vs sparse p + draws (CPU).

    .venv-sglang/bin/python bench/sglang_sampling_cost.py --target DIR [--vocab N] [--k 4] [--support 64] [--repeats 7]

Opens one sequence (a 16-token context), then times `backend.forward` of a k-token verify (k+1 positions) in each
sampling mode, median of `--repeats` (after one warm-up each), plus one residual retry (`draw`, 16 draws). Each
draft position asks p at `--support` ids (a full MAX_Q_SUPPORT q). Prints one JSON object. Runs on the CPU with
the test-only stand-ins (tests/sglang/stubs) on PYTHONPATH, as scripts/test_sglang.sh sets them.
`--vocab N` first writes a random copy of the target with an N-token vocabulary (same layers; the tokenizer files
are the target's, which the backend only fingerprints) to show how the cost grows with the vocabulary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def with_vocab(src: Path, vocab: int, out: Path) -> Path:
    """A random model shaped like `src` but with `vocab` tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(src)
    cfg.vocab_size = vocab
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).float().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, type=Path)
    ap.add_argument(
        "--vocab", type=int, default=0, help="use a random copy of the target with this vocabulary"
    )
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--support", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    from wisp_cloud.backends.base import Sampling, WorkItem
    from wisp_cloud.backends.sglang import SGLangBackend

    target = args.target
    if args.vocab:
        target = with_vocab(target, args.vocab, Path(tempfile.mkdtemp(prefix="wisp-vocab-")))
    backend = SGLangBackend(target, device="cpu", seed=0, max_total_tokens=32768)
    try:
        v = backend.vocab_size
        ctx = [(7 * i + 3) % v for i in range(16)]
        draft = [(11 * i + 5) % v for i in range(args.k)]
        support = [sorted({d, *((d + 97 * j) % v for j in range(args.support - 1))}) for d in draft]
        sampling = Sampling(temperature=0.8, top_k=40, top_p=0.95)
        backend.forward([WorkItem("b", ctx[:-1], n_logits=0, context=ctx)])

        def verify(s: Sampling):
            backend.truncate("b", len(ctx) - 1)
            item = WorkItem(
                "b", [ctx[-1], *draft], n_logits=args.k + 1, sampling=s, context=ctx, support=support
            )
            t = time.perf_counter()
            (res,), _ = backend.forward([item])
            return time.perf_counter() - t, res

        out: dict[str, object] = {"vocab": v, "k": args.k, "support": args.support, "repeats": args.repeats}
        for name, mode, s in (
            ("greedy", "sparse", Sampling()),
            ("full", "full", sampling),
            ("sparse", "sparse", sampling),
        ):
            backend.sampling_mode = mode
            verify(s)  # warm-up
            times = [verify(s)[0] for _ in range(args.repeats)]
            out[f"{name}_s"] = round(statistics.median(times), 4)
        backend.sampling_mode = "sparse"
        _t, res = verify(sampling)
        draws = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            res.sparse.draw(0, 16)
            draws.append(time.perf_counter() - t)
        out["draw16_s"] = round(statistics.median(draws), 4)
        m = args.k + 1
        for name in ("full", "sparse"):
            out[f"{name}_extra_per_position_s"] = round((out[f"{name}_s"] - out["greedy_s"]) / m, 4)  # type: ignore[operator]
        print(json.dumps(out))
    finally:
        backend.shutdown()
        if args.vocab:
            shutil.rmtree(target, ignore_errors=True)


if __name__ == "__main__":
    main()
