"""The draft's sampling distribution q, in numpy: temperature -> top-k -> top-p, then cut to a sparse support.

Why the cut: the Round frame carries q per draft position, and a dense vocab-sized q (150k floats) per token
would dwarf the token itself. Speculative sampling is exact for *any* q as long as the edge samples from exactly
the q it sends, so the edge keeps at most `MAX_Q_SUPPORT` of the most likely tokens, renormalizes them in
float32, samples from those very float32 numbers and sends them unchanged.

Since only the top `MAX_Q_SUPPORT` tokens survive, the top-p filter needs no full-vocabulary sort: a token at
descending rank r is removed by Hugging Face's `TopPLogitsWarper` iff the probability mass strictly above it is
already >= top_p, which the partial top-n sort gives directly. That keeps a sampling step O(vocab).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_Q_SUPPORT = 64


@dataclass(frozen=True)
class SparseQ:
    """A sparse distribution: token ids (descending probability) and their float32 probabilities (sum ~ 1)."""

    ids: np.ndarray  # int64
    probs: np.ndarray  # float32

    def prob_of(self, token: int) -> float:
        hit = np.nonzero(self.ids == token)[0]
        return float(self.probs[hit[0]]) if hit.size else 0.0


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax in float64 (float32 logits lose mass in the tail otherwise)."""
    x = logits.astype(np.float64, copy=False)
    e = np.exp(x - x.max())
    return e / e.sum()


def entropy(probs: np.ndarray) -> float:
    p = probs[probs > 0]
    return float(-(p * np.log(p)).sum())


def confidence(logits: np.ndarray) -> tuple[int, float, float]:
    """(argmax, top-1 probability, entropy in nats) of softmax(logits), in one exp pass over the vocabulary.

    With e = exp(x - max) and Z = sum(e): top1 = 1/Z and H = log Z - sum(e * (x - max)) / Z.
    """
    x = np.asarray(logits, dtype=np.float32)
    idx = int(np.argmax(x))
    shifted = x - x[idx]
    e = np.exp(shifted)
    z = float(e.sum(dtype=np.float64))
    ent = math.log(z) - float(np.dot(e, shifted)) / z  # float32 dot: plenty for a feature
    return idx, 1.0 / z, max(0.0, ent)


def second_choice(logits: np.ndarray, first: np.ndarray | int) -> np.ndarray:
    """Per row of `logits` ([V] or [n, V]), the largest-scoring token other than `first` (that row's argmax): a
    greedy draft's sibling (`DraftRunner.propose(alt=True)`), and what acceptance traces record as `second`."""
    top2 = np.argpartition(logits, -2, axis=-1)[..., -2:]
    return np.where(top2[..., 1] == first, top2[..., 0], top2[..., 1])


def sparse_q(
    logits: np.ndarray,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    max_support: int = MAX_Q_SUPPORT,
) -> SparseQ:
    """The processed draft distribution at one position, cut to <= `max_support` entries and renormalized."""
    if temperature <= 0:
        raise ValueError("sparse_q needs temperature > 0 (temperature 0 is greedy: take the argmax)")
    x = np.asarray(logits, dtype=np.float32)
    vocab = x.shape[-1]
    k = top_k if 0 < top_k < vocab else vocab
    n = min(max_support, k)
    # One O(vocab) partition finds the top-k set (for top-k's normalizer) and, within it, the support.
    cut = np.argpartition(-x, k - 1)[:k] if k < vocab else None
    if cut is None:
        top = np.argpartition(-x, n - 1)[:n] if n < vocab else np.arange(vocab)
    else:
        top = cut[np.argpartition(-x[cut], n - 1)[:n]] if n < len(cut) else cut
    top = top[np.argsort(-x[top], kind="stable")]
    # Normalizer of the tempered softmax over the kept set, in float64 from float32 exponentials.
    m = float(x[top[0]])
    kept = x[cut] if cut is not None else x
    z = float(np.exp((kept - m) / np.float32(temperature)).sum(dtype=np.float64))
    probs = np.exp((x[top].astype(np.float64) - m) / temperature) / z
    # HF's top-k keeps every token tying with the k-th logit; cutting ties away only shrinks q's tail, which
    # is harmless: q need not equal HF's exactly, it only has to be what the edge sampled from and sends.
    if top_p < 1.0:
        mass_above = np.concatenate(([0.0], np.cumsum(probs)[:-1]))
        keep = mass_above < top_p
        keep[0] = True  # min_tokens_to_keep = 1
        top, probs = top[keep], probs[keep]
    q = probs.astype(np.float32)
    q /= q.sum(dtype=np.float32)
    return SparseQ(ids=top.astype(np.int64), probs=q)


def sample_sparse(q: SparseQ, rng: np.random.Generator) -> int:
    """Sample from exactly the float32 numbers in `q` (their float64 cumulative sum, scaled to its total)."""
    cum = np.cumsum(q.probs, dtype=np.float64)
    u = rng.random() * cum[-1]
    idx = int(np.searchsorted(cum, u, side="right"))
    return int(q.ids[min(idx, len(q.ids) - 1)])


def hf_reference_probs(
    logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> np.ndarray:
    """Dense processed probabilities exactly as HF's warpers compute them (for tests and the verifier's p)."""
    scores = logits.astype(np.float64) / temperature
    if top_k > 0:
        k = min(top_k, scores.shape[-1])
        kth = np.sort(scores)[-k]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p < 1.0:
        order = np.argsort(scores, kind="stable")  # ascending, as HF
        p_sorted = softmax(scores[order])
        cum = np.cumsum(p_sorted)
        remove = cum <= (1 - top_p)
        remove[-1] = False
        scores = scores.copy()
        scores[order[remove]] = -np.inf
    return softmax(scores)
