"""Parity: the exported ONNX model against the PyTorch source, step by step through the KV cache.

Both models are fed the same tokens: the prompt, then PyTorch's greedy token at every step (teacher forcing), so
one early disagreement does not derail the rest. Compared are the prefill's last logits and `steps` cached decode
steps, i.e. `steps + 1` positions. The first position where the argmaxes differ is also the length of the greedy
continuation on which the two models agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from wisp_sdk.bundle import ParityReport
from wisp_sdk.errors import WispError

from wisp_export.hf import quiet_transformers
from wisp_export.onnx_lm import OnnxCausalLM
from wisp_export.progress import bar

PARITY_PROMPT = "Write a Python function that checks whether a number is prime.\n\ndef is_prime(n):"

# Pass criteria per quantization. fp32 must match closely; weight-only quantization moves logits by design, so
# only the ranking is checked (MODELS.md: q8 keeps 98.5 % argmax agreement on the real 0.5B, q4 90.8 %).
MAX_DIFF_LIMIT = {"none": 1e-3}
MIN_AGREEMENT = {"none": 0.99, "q8": 0.90, "q4": 0.75}


@dataclass
class ParityResult:
    report: ParityReport
    greedy_prefix: int  # leading positions on which the argmaxes agree
    positions: int
    quant: str
    passed: bool
    reason: str = ""


def measure(
    hf_dir: Path, onnx_path: Path, steps: int, quant: str, prompt: str = PARITY_PROMPT
) -> ParityResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise WispError("the parity prompt tokenizes to nothing; is the tokenizer broken?")
    pt = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    # One thread each: torch and ORT alternate in this process, and their idle workers busy-wait; with two
    # threads each they fight over the cores (measured 3-4x slower per step on a loaded 2-core machine).
    ort_lm = OnnxCausalLM(onnx_path, threads=1, spin=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compare(pt, ort_lm, ids, steps, quant, prompt)
    finally:
        torch.set_num_threads(threads)
        del pt


def _compare(pt, ort_lm: OnnxCausalLM, ids: list[int], steps: int, quant: str, prompt: str) -> ParityResult:
    import torch

    diffs: list[float] = []
    means: list[float] = []
    agree: list[bool] = []
    with torch.no_grad(), bar(steps + 1, desc="parity", unit="step") as pbar:
        out = pt(input_ids=torch.tensor([ids]), use_cache=True)
        past = out.past_key_values
        ref = out.logits[0, -1].float().numpy()
        got = ort_lm.forward(ids)[-1]
        for step in range(steps + 1):
            if ref.shape != got.shape:
                raise WispError(
                    f"ONNX logits have shape {got.shape}, PyTorch {ref.shape}: the export is broken"
                )
            delta = np.abs(ref - got)
            diffs.append(float(delta.max()))
            means.append(float(delta.mean()))
            agree.append(int(ref.argmax()) == int(got.argmax()))
            pbar.update(1)
            if step == steps:
                break
            nxt = int(ref.argmax())
            out = pt(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            ref = out.logits[0, -1].float().numpy()
            got = ort_lm.forward([nxt])[-1]

    prefix = next((i for i, ok in enumerate(agree) if not ok), len(agree))
    report = ParityReport(
        steps=steps,
        max_abs_logit_diff=float(np.max(diffs)) if np.all(np.isfinite(diffs)) else float("inf"),
        argmax_agreement=float(np.mean(agree)),
        prompt=prompt,
        mean_abs_logit_diff=float(np.mean(means)),
        greedy_prefix=prefix,
    )
    passed, reason = judge(report, quant)
    return ParityResult(report, prefix, len(agree), quant, passed, reason)


def judge(report: ParityReport, quant: str) -> tuple[bool, str]:
    if not np.isfinite(report.max_abs_logit_diff):
        return False, "ONNX logits are not finite"
    limit = MAX_DIFF_LIMIT.get(quant)
    if limit is not None and report.max_abs_logit_diff > limit:
        return False, f"max logit diff {report.max_abs_logit_diff:.3g} > {limit:g} for an unquantized export"
    need = MIN_AGREEMENT.get(quant, 0.0)
    if report.argmax_agreement < need:
        return False, f"argmax agreement {report.argmax_agreement:.1%} < {need:.0%} for --quant {quant}"
    return True, ""


def format_table(result: ParityResult) -> str:
    r = result.report
    limit = MAX_DIFF_LIMIT.get(result.quant)
    rows = [
        ("metric", "value", "pass if"),
        ("max |logit diff|", f"{r.max_abs_logit_diff:.3g}", f"<= {limit:g}" if limit is not None else "-"),
        ("mean |logit diff|", f"{r.mean_abs_logit_diff:.3g}", "-"),
        ("argmax agreement", f"{r.argmax_agreement:.1%}", f">= {MIN_AGREEMENT.get(result.quant, 0):.0%}"),
        ("greedy prefix identical", f"{result.greedy_prefix}/{result.positions}", "-"),
        ("result", "PASS" if result.passed else "FAIL", ""),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    head = (
        f"parity: ONNX ({result.quant}) vs PyTorch fp32 over {result.positions} positions "
        f"(prefill + {r.steps} cached decode steps)"
    )
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join([head, *lines])
