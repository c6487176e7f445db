"""Record what the JVM end-to-end test needs, from the Python side, against a running `wisp serve`.

    python android_demo/tools/record_e2e.py --server ws://127.0.0.1:PORT --draft BUNDLE --out recording.json

1. Runs the Python SDK (`wisp_sdk.EdgeClient`, greedy, `fixed:K`) on a chat prompt and keeps its token ids and
   per-round drafted/accepted counts.
2. Runs the bundle's ONNX draft (the SDK's `DraftRunner`, so the same file and the same runtime) over every
   committed context of that run, and for each one over its greedy draft continuation up to `--max-draft`
   tokens, recording the logits at each step.

The Kotlin `ReplayDraftModel` serves those logits, so the JVM client drafts exactly what the ONNX model drafts
from any context a correct client can reach, and its greedy output must be token-identical to the Python SDK's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "Write a function that returns the sum of a list of numbers."
SAMPLE_TEXT = "def f(x):\n    return x * 2  # it's   done!\n\n\tCafé 123 naïve — ok's?"


def _short(v: np.ndarray) -> list[float]:
    # The shortest decimal that round-trips each float32: a much smaller file, and the JVM parses the same floats.
    return [float(np.format_float_positional(x, unique=True, trim="-")) for x in v.astype(np.float32)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", required=True)
    ap.add_argument("--draft", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--fixed-k", type=int, default=4)
    ap.add_argument(
        "--max-draft", type=int, default=8, help="longest draft continuation recorded per context"
    )
    args = ap.parse_args()

    from wisp_sdk.bundle import load_manifest
    from wisp_sdk.client import EdgeClient
    from wisp_sdk.draft_runner import DraftRunner

    manifest = load_manifest(args.draft)
    t0 = time.perf_counter()
    with EdgeClient(args.server, args.draft, controller=f"fixed:{args.fixed_k}") as client:
        messages = [{"role": "user", "content": args.prompt}]
        chat_text = client.tokenizer.apply_chat_template(messages)
        prompt_ids = client._client.encode_prompt(messages)
        # Strings the Kotlin BpeTokenizer must encode exactly as the bundle's tokenizer does.
        samples = [args.prompt, chat_text, SAMPLE_TEXT]
        sample_ids = [client.tokenizer.encode(t) for t in samples]
        res = client.generate(prompt_ids, max_new_tokens=args.max_new_tokens)
        # The Wisp controller must give the same greedy output (a sanity check of the Python side itself).
        res_wisp = client.generate(prompt_ids, max_new_tokens=args.max_new_tokens, controller="wisp")
    if res_wisp.token_ids != res.token_ids:
        print("python SDK: fixed and wisp controllers disagree on greedy output", file=sys.stderr)
        return 1
    tokens = list(res.token_ids)
    from wisp_sdk.tokenizer import DraftTokenizer

    client_text = DraftTokenizer(args.draft).decode(tokens)
    print(
        f"python SDK: {len(tokens)} tokens in {len(res.stats.rounds)} rounds, "
        f"acceptance {res.stats.acceptance_rate:.2f} ({res.finish_reason}); {res.text!r}"
    )

    runner = DraftRunner(args.draft, threads=1)
    seq = list(prompt_ids) + tokens
    contexts: dict[tuple[int, ...], list[float]] = {}
    for end in range(len(prompt_ids) + 1, len(seq) + 1):
        ctx = seq[:end]
        runner.sync(ctx)
        for _ in range(args.max_draft):
            key = tuple(ctx)
            logits = runner.next_logits()
            contexts.setdefault(key, _short(logits))
            tok = int(np.argmax(logits))
            ctx = ctx + [tok]
            runner.advance(tok)
    vocab = len(next(iter(contexts.values())))

    out = {
        "server": args.server,
        "prompt": args.prompt,
        "prompt_ids": list(prompt_ids),
        "max_new_tokens": args.max_new_tokens,
        "stop_token_ids": sorted(manifest.eos_token_ids),
        "tokenizer_fingerprint": manifest.tokenizer_fingerprint,
        "predictor": manifest.predictor,
        "fixed_k": args.fixed_k,
        "max_draft": args.max_draft,
        "vocab_size": vocab,
        "python_tokens": tokens,
        "python_text": res.text,
        "python_text_decoded": client_text,
        "chat_text": chat_text,
        "tokenizer_json": str((args.draft / "tokenizer.json").resolve()),
        "tokenizer_samples": [{"text": t, "ids": i} for t, i in zip(samples, sample_ids, strict=True)],
        "python_finish_reason": res.finish_reason,
        "python_rounds": [{"drafted": r.drafted, "accepted": r.accepted} for r in res.stats.rounds],
        "contexts": [{"context": list(k), "logits": v} for k, v in contexts.items()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, separators=(",", ":")))
    print(
        f"recorded {len(contexts)} draft contexts (vocab {vocab}) to {args.out} "
        f"({args.out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
