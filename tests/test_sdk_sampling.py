"""The draft's sparse q: HF warper semantics, support cut, and sampling from exactly what is sent."""

from __future__ import annotations

import numpy as np
import pytest
from wisp_sdk.sampling import MAX_Q_SUPPORT, hf_reference_probs, sample_sparse, sparse_q


def _hf_warped(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    scores = procs(torch.zeros(1, 1, dtype=torch.long), torch.tensor(logits[None], dtype=torch.float32))
    return torch.softmax(scores.double(), -1)[0].numpy()


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 20, 1.0), (0.9, 50, 0.8), (2.0, 0, 0.5)]
)
def test_reference_matches_hf_warpers(temperature, top_k, top_p):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(1000) * 3).astype(np.float32)
    np.testing.assert_allclose(
        hf_reference_probs(logits, temperature, top_k, top_p),
        _hf_warped(logits, temperature, top_k, top_p),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (0.9, 20, 0.95), (1.0, 5, 1.0)]
)
def test_sparse_q_is_warped_distribution_cut_and_renormalized(temperature, top_k, top_p):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal(5000) * 4).astype(np.float32)
    q = sparse_q(logits, temperature, top_k, top_p)
    dense = hf_reference_probs(logits, temperature, top_k, top_p)
    order = np.argsort(-dense, kind="stable")
    support = order[: min(MAX_Q_SUPPORT, int((dense > 0).sum()))]
    assert len(q.ids) <= MAX_Q_SUPPORT
    assert q.probs.dtype == np.float32
    assert set(q.ids.tolist()) == set(support.tolist())
    expect = dense[q.ids] / dense[q.ids].sum()
    np.testing.assert_allclose(q.probs, expect, rtol=1e-5, atol=1e-7)
    assert abs(float(q.probs.sum()) - 1.0) < 1e-5
    assert np.all(np.diff(q.probs) <= 1e-7)  # descending


def test_sample_sparse_frequencies():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    q = sparse_q(logits, 1.0)
    rng = np.random.default_rng(2)
    n = 20000
    counts = np.bincount([sample_sparse(q, rng) for _ in range(n)], minlength=4)
    np.testing.assert_allclose(counts / n, [0.5, 0.3, 0.15, 0.05], atol=0.015)


def test_greedy_needs_no_q():
    with pytest.raises(ValueError):
        sparse_q(np.zeros(10, dtype=np.float32), 0.0)
