"""Draft speed on this device: ms per drafted token for a bundle, with and without IO binding.

    python bench/draft_speed.py --draft BUNDLE [--threads N] [--tokens 64] [--prompt-len 128] [--out FILE]

Measures: prefill of a prompt, per-token decode (forward + greedy proposal), the sampling proposal alone
(temperature/top-k/top-p + sparse q), and a rollback + one-token re-feed (what a rejection costs). Writes
JSON to bench/results/ (default: draft_speed-<bundle>-t<threads>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sdk"))

from wisp_sdk.draft_runner import DraftRunner  # noqa: E402
from wisp_sdk.protocol import SamplingParams  # noqa: E402


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def measure(bundle: str, threads: int, tokens: int, prompt_len: int, io_binding: bool, repeats: int) -> dict:
    runner = DraftRunner(bundle, threads=threads, io_binding=io_binding)
    rng = np.random.default_rng(0)
    vocab = runner.vocab_size
    prompt = rng.integers(10, min(vocab, 30000), prompt_len).tolist()
    greedy = SamplingParams()
    sampling = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=0)
    runner.draft(prompt[:8], 4)  # warm-up: ORT allocates and optimizes on the first runs
    prefill, decode, propose_s, rollback = [], [], [], []
    for _ in range(repeats):
        runner.reset()
        t0 = time.perf_counter()
        runner.sync(prompt)
        prefill.append(_ms(t0))
        for _ in range(tokens):
            t0 = time.perf_counter()
            tok = runner.propose(greedy)
            runner.advance(tok.token)
            decode.append(_ms(t0))
        for _ in range(16):
            t0 = time.perf_counter()
            runner.propose(sampling, rng)
            propose_s.append(_ms(t0))
        for back in (1, 4, 8):
            ctx = runner.tokens[: len(runner.tokens) - back] + [7]
            t0 = time.perf_counter()
            runner.sync(ctx)
            rollback.append(_ms(t0))
            runner.sync(ctx + [8] * back)  # grow back
    return {
        "io_binding": io_binding,
        "prefill_ms": round(statistics.median(prefill), 3),
        "prefill_tokens": prompt_len,
        "ms_per_token": round(statistics.median(decode), 3),
        "ms_per_token_mean": round(statistics.fmean(decode), 3),
        "ms_per_token_p90": round(float(np.percentile(decode, 90)), 3),
        "tokens_per_s": round(1000.0 / statistics.median(decode), 1),
        "sampling_proposal_ms": round(statistics.median(propose_s), 3),
        "rollback_refeed_ms": round(statistics.median(rollback), 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", required=True, help="draft bundle folder")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per repeat")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from wisp_sdk.bundle import load_manifest

    manifest = load_manifest(args.draft)
    runs = [
        measure(args.draft, args.threads, args.tokens, args.prompt_len, io, args.repeats)
        for io in (True, False)
    ]
    result = {
        "bundle": str(args.draft),
        "model_type": manifest.model_type,
        "num_layers": manifest.num_layers,
        "vocab_size": manifest.vocab_size,
        "quantization": manifest.quantization.method,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on the machine skews timings
        "runs": runs,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = (
        args.out
        or Path(__file__).parent / "results" / f"draft_speed-{Path(args.draft).name}-t{args.threads}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in runs:
        print(
            f"io_binding={r['io_binding']!s:5} {r['ms_per_token']:.2f} ms/token ({r['tokens_per_s']} tok/s), "
            f"prefill {r['prefill_tokens']} tokens {r['prefill_ms']:.1f} ms, "
            f"sampling proposal {r['sampling_proposal_ms']:.2f} ms, rollback+refeed {r['rollback_refeed_ms']:.2f} ms"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
