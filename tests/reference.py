"""The reference every lossless test compares with: the target model alone, in transformers.

Greedy continuations (`generate`, memoized per prompt and length) and the exact distribution of sampled
continuations, with the pooling that makes a chi-square test of observed counts against it sound.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from wisp_sdk.protocol import SamplingParams


def load_target(path: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model: PreTrainedModel, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    x = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


class GreedyReference:
    """`hf_greedy` of one model, memoized per (prompt, length): many tests compare against the same prompts."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self._cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def __call__(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt_ids), max_new_tokens)
        if key not in self._cache:
            self._cache[key] = hf_greedy(self.model, prompt_ids, max_new_tokens)
        return list(self._cache[key])


def target_tree(
    model: PreTrainedModel, prompt: list[int], depth: int, sp: SamplingParams
) -> dict[tuple[int, ...], float]:
    """Exact probability of every continuation of `depth` tokens under the target's processed sampling."""
    from test_cloud_acceptance import _hf_probs

    probs: dict[tuple[int, ...], float] = {}

    def walk(prefix: tuple[int, ...], mass: float) -> None:
        if len(prefix) == depth:
            probs[prefix] = mass
            return
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + list(prefix)])).logits[0, -1:].float()
        p = _hf_probs(logits, sp)[0]
        for tok in torch.nonzero(p).flatten().tolist():
            walk(prefix + (tok,), mass * float(p[tok]))

    walk((), 1.0)
    return probs


def pooled_counts(
    observed: dict, expected: dict, n: int, min_expected: float = 5.0
) -> tuple[np.ndarray, np.ndarray]:
    """Observed/expected count vectors, cells with expected < min_expected pooled (plus unexpected ones)."""
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for cell, prob in expected.items():
        if prob * n >= min_expected:
            obs.append(observed.get(cell, 0))
            exp.append(prob * n)
        else:
            pool_o += observed.get(cell, 0)
            pool_e += prob * n
    pool_o += sum(c for cell, c in observed.items() if cell not in expected)
    obs.append(pool_o)
    exp.append(pool_e)
    expected_counts = np.array(exp)
    return np.array(obs), expected_counts * n / expected_counts.sum()
