"""Acceptance traces from a real draft/target pair: `wisp bench trace`.

For each prompt of a prompt set the target continues greedily (transformers, KV-cached); then the draft bundle
(the ONNX model the edge runs, through `DraftRunner`) reads prompt + continuation teacher-forced in one pass.
At every generated position j we record the draft's confidence there (top-1 probability and entropy of its
softmax) and whether its greedy token equals the target's token j: exactly the greedy acceptance test of a
draft token proposed after a correct prefix, and whether its second choice does (`second`: a token tree's sibling
would be committed where the first choice is rejected). Emulated devices (`emulated.py`) replay these records.
`add_second` adds `second` to a trace recorded before it, from the target tokens the trace keeps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from wisp_sdk.sampling import second_choice

from wisp_cloud.fleet.workload import load_prompts, workload_provenance


def _confidence(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row: argmax, top-1 probability, entropy (nats) of the softmax, and the second choice."""
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    ent = -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=-1)
    first = p.argmax(axis=-1)
    return first, p.max(axis=-1), ent, second_choice(logits, first)


def _draft_rows(runner: Any, ids: list[int], cont: list[int]) -> dict[str, list]:
    """The draft's records over a target continuation `cont` of prompt `ids`, teacher-forced in one pass."""
    logits = runner.teacher_forced_logits(ids + cont)  # row r predicts token r+1
    rows = logits[len(ids) - 1 : len(ids) - 1 + len(cont)]
    arg, top1, ent, second = _confidence(rows)
    return {
        "top1": [round(float(x), 5) for x in top1],
        "entropy": [round(float(x), 5) for x in ent],
        "accepted": [int(a == t) for a, t in zip(arg.tolist(), cont, strict=True)],
        "second": [int(s == t) for s, t in zip(second.tolist(), cont, strict=True)],
    }


def make_trace(
    bundle: str | Path,
    target: str | Path,
    prompts: str | Path,
    out: str | Path,
    max_new_tokens: int = 64,
    limit: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    partial: bool = True,
    command: str = "",
) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM
    from wisp_sdk.draft_runner import DraftRunner
    from wisp_sdk.tokenizer import DraftTokenizer

    if threads:
        torch.set_num_threads(threads)
    tok = DraftTokenizer(bundle)
    runner = DraftRunner(bundle, threads=threads)
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
    model.eval()
    eos = set(runner.manifest.eos_token_ids)
    items = load_prompts(prompts)[: limit or None]
    extra = {"command": command, "prompts_provenance": workload_provenance(prompts)}
    seqs = []
    t0 = time.perf_counter()
    for i, item in enumerate(items):
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": item["prompt"]}]))
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([ids]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=sorted(eos),
                pad_token_id=sorted(eos)[0],
            )
        cont = gen[0, len(ids) :].tolist()
        rec = _draft_rows(runner, ids, cont)
        acc = rec["accepted"]
        seqs.append(
            {
                "prompt_index": i,
                "prompt_tokens": len(ids),
                "target_tokens": cont,
                "finish": "eos" if cont and cont[-1] in eos else "length",
                **rec,
            }
        )
        if partial:  # keep what is done so far: a long CPU run can be stopped and still leaves a trace
            _write(out, _doc(bundle, runner, target, prompts, max_new_tokens, seqs, extra))
        if progress:
            print(
                f"  trace {i + 1}/{len(items)}: {len(cont)} tokens, accept {np.mean(acc):.2f} "
                f"({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    trace = _doc(bundle, runner, target, prompts, max_new_tokens, seqs, extra)
    _write(out, trace)
    return trace


def _write(out: str | Path, trace: dict[str, Any]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(out) + ".tmp")
    tmp.write_text(json.dumps(trace) + "\n")
    tmp.replace(out)


def _doc(
    bundle: Any,
    runner: Any,
    target: Any,
    prompts: Any,
    max_new_tokens: int,
    seqs: list,
    extra: dict[str, Any],
) -> dict[str, Any]:
    return {
        "kind": "wisp-acceptance-trace",
        "format": 1,
        "draft": str(bundle),
        "draft_quantization": runner.manifest.quantization.model_dump(),
        "target": str(target),
        "prompts": str(prompts),
        "max_new_tokens": max_new_tokens,
        **extra,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sequences": seqs,
        "summary": summarize(seqs),
    }


def add_second(path: str | Path, bundle: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Add `second` to a trace from its kept target tokens (the draft alone: no target model). Checks that the
    draft reproduces the trace's own records (prompt length, acceptance); returns the agreement it found."""
    from wisp_sdk.draft_runner import DraftRunner
    from wisp_sdk.tokenizer import DraftTokenizer

    trace = json.loads(Path(path).read_text())
    tok = DraftTokenizer(bundle)
    runner = DraftRunner(bundle)
    items = load_prompts(trace["prompts"])
    same = total = 0
    for seq in trace["sequences"]:
        item = items[seq["prompt_index"]]
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": item["prompt"]}]))
        if len(ids) != seq["prompt_tokens"]:
            raise ValueError(
                f"prompt {seq['prompt_index']}: {len(ids)} tokens, the trace has {seq['prompt_tokens']}"
            )
        rec = _draft_rows(runner, ids, seq["target_tokens"])
        same += sum(a == b for a, b in zip(rec["accepted"], seq["accepted"], strict=True))
        total += len(rec["accepted"])
        seq["second"] = rec["second"]
    trace["summary"] = summarize(trace["sequences"])
    trace["second_added"] = {"draft": str(bundle), "accepted_agreement": same / max(1, total)}
    _write(out or path, trace)
    return trace


def summarize(seqs: list[dict[str, Any]]) -> dict[str, float]:
    acc = [a for s in seqs for a in s["accepted"]]
    # mean accepted run length of a k=4 round started at every position (the quantity FixedK cares about)
    runs = []
    for s in seqs:
        a = s["accepted"]
        for j in range(len(a)):
            n = 0
            while n < 4 and j + n < len(a) and a[j + n]:
                n += 1
            runs.append(n)
    out = {
        "positions": float(len(acc)),
        "alpha": float(np.mean(acc)) if acc else 0.0,
        "mean_accepted_k4": float(np.mean(runs)) if runs else 0.0,
    }
    if seqs and all("second" in s for s in seqs):
        # where the draft's first choice is rejected, how often its second is the target's token
        miss = [b for s in seqs for a, b in zip(s["accepted"], s["second"], strict=True) if not a]
        out["second_given_reject"] = float(np.mean(miss)) if miss else 0.0
    return out


def load_trace(path: str | Path) -> dict[str, Any]:
    from wisp_sdk.errors import WispError

    p = Path(path)
    if not p.is_file():
        raise WispError(f"no trace at {path}; make one with `wisp bench trace`")
    data = json.loads(p.read_text())
    if data.get("kind") != "wisp-acceptance-trace" or not data.get("sequences"):
        raise WispError(f"{path} is not an acceptance trace")
    return data
