"""Acceptance rules: HF-identical logits processing, greedy prefix rule, and exact speculative sampling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from wisp_cloud.acceptance import (
    Decision,
    DraftError,
    accept_greedy,
    accept_sampling,
    dense_q,
    make_generator,
    process_logits,
)
from wisp_sdk.protocol import SamplingParams


def _hf_probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """Exactly what generate(do_sample=True) builds: warpers added under the same conditions, same order."""
    warpers = LogitsProcessorList()
    if sp.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sp.temperature))
    if sp.top_k:
        warpers.append(TopKLogitsWarper(sp.top_k))
    if sp.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sp.top_p))
    return warpers(None, logits.clone()).softmax(dim=-1)


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    list(itertools.product([0.3, 1.0, 1.7], [0, 1, 7, 64], [1.0, 0.95, 0.5, 0.01])),
)
def test_process_logits_matches_hf_warpers(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(hash((temperature, top_k, top_p)) & 0xFFFF)
    logits = torch.randn(6, 97, generator=gen) * 3
    logits[0, :10] = 2.5  # ties, including at the top-k boundary
    logits[1] = 0.0  # a flat row
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    ours = process_logits(logits, sp)
    ref = _hf_probs(logits, sp)
    assert torch.equal(ours, ref), float((ours - ref).abs().max())


def test_greedy_rule():
    assert accept_greedy([5, 6, 7], [5, 6, 9, 1]) == Decision(2, 9)
    assert accept_greedy([5, 6, 7], [5, 6, 7, 1]) == Decision(3, 1)
    assert accept_greedy([5], [4, 0]) == Decision(0, 4)
    assert accept_greedy([], [3]) == Decision(0, 3)
    with pytest.raises(ValueError):
        accept_greedy([1, 2], [1, 2])


def test_dense_q_validation():
    q = dense_q([3, 1], [0.25, 0.75], 5, token=1)
    assert q.tolist() == [0, 0.75, 0, 0.25, 0]
    for ids, probs, tok in [
        ([9], [1.0], 9),  # out of vocab
        ([1, 1], [0.5, 0.5], 1),  # repeated id
        ([1, 2], [0.5, 0.2], 1),  # does not sum to 1
        ([1, 2], [1.0, 0.0], 2),  # draft token with q = 0
        ([1, 2], [float("nan"), 1.0], 2),
        ([], [], 1),
    ]:
        with pytest.raises(DraftError):
            dense_q(ids, probs, 5, token=tok)


# ---- exactness of speculative sampling, offline ----

V = 6
P0 = torch.tensor([0.30, 0.05, 0.25, 0.0, 0.30, 0.10], dtype=torch.float64)
# Target's next distribution depends on the first token: p1[x] is p(. | x).
P1 = torch.softmax(torch.arange(V * V, dtype=torch.float64).reshape(V, V).sin() * 2.5, dim=-1)
Q0 = torch.tensor([0.05, 0.40, 0.10, 0.15, 0.10, 0.20], dtype=torch.float64)  # q(3) > 0 = p(3)


def _run(n: int, accept, seed: int = 0):
    gen = make_generator(seed)
    rng = np.random.default_rng(seed)
    first, pairs = [], []
    for _ in range(n):
        x = int(rng.choice(V, p=Q0.numpy()))
        p = torch.stack([P0, P1[x]])
        d = accept([x], [Q0], p, gen)
        y1 = x if d.accepted == 1 else d.next_token
        first.append(y1)
        if d.accepted == 1:
            pairs.append((y1, d.next_token))
    return np.array(first), pairs


def _always_accept(draft, q, p, gen):
    from wisp_cloud.acceptance import sample_token

    return Decision(len(draft), sample_token(p[len(draft)], gen))


def _chi2_pvalue(samples: np.ndarray, probs: torch.Tensor) -> float:
    support = probs > 0
    observed = np.bincount(samples, minlength=V)
    if observed[~support.numpy()].any():
        return 0.0  # a token the target can never produce: as wrong as it gets
    expected = probs.numpy()[support.numpy()] * len(samples)
    return float(chisquare(observed[support.numpy()], expected).pvalue)


def test_speculative_sampling_is_exact():
    first, pairs = _run(20_000, accept_sampling)
    assert _chi2_pvalue(first, P0) > 1e-3
    # The bonus token after an accepted draft follows p(. | accepted token).
    for x in range(V):
        bonus = np.array([b for a, b in pairs if a == x])
        if len(bonus) > 500:
            assert _chi2_pvalue(bonus, P1[x]) > 1e-4  # five tests: a Bonferroni-ish margin


def test_broken_acceptance_is_caught_by_the_same_statistic():
    first, _ = _run(4_000, _always_accept)
    assert _chi2_pvalue(first, P0) < 1e-10


def test_sampling_is_seeded():
    p = torch.stack([P0, P1[1]])
    a = [accept_sampling([1], [Q0], p, make_generator(7)) for _ in range(5)]
    b = [accept_sampling([1], [Q0], p, make_generator(7)) for _ in range(5)]
    assert a == b
