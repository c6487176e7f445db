"""Lossless acceptance of a draft against the target: greedy and speculative sampling, backend-independent.

Greedy: accept the longest draft prefix equal to the target's argmax, then commit the target's own token.
Sampling (Leviathan et al. / Chen et al.): accept draft token x with probability min(1, p(x)/q(x)); on the
first rejection sample from norm(max(0, p - q)); if every token is accepted, sample a bonus token from p.
The committed tokens are then distributed exactly as the target's own sampling, for any q.

p is the target's distribution after Hugging Face's warpers in their generate() order: temperature, top-k,
top-p (min_tokens_to_keep=1). `process_logits` reimplements them bit-for-bit so the server needs no
transformers import on this path (and an SGLang backend can reuse it on returned logprobs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from wisp_sdk.protocol import SamplingParams

from wisp_cloud.backends.base import Sampling

# q's probabilities are float32 as the edge sampled them; a sum this far from 1 is a broken client, not rounding.
Q_SUM_TOLERANCE = 1e-3


class DraftError(ValueError):
    """A draft distribution the verifier cannot use (the server answers `bad_request`)."""


@dataclass
class Decision:
    accepted: int  # number of draft tokens accepted
    next_token: int  # the correction (on rejection) or the bonus token (all accepted)
    residual_draws: int = 0  # sparse sampling: draws from p the residual's rejection loop used
    dense_fallback: bool = False  # sparse sampling: the loop ran out and the dense row of p was fetched


def warp_scores(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """HF TemperatureLogitsWarper -> TopK -> TopP on logits [n, V]: the scaled scores, -inf where filtered.

    Mirrors transformers' warpers exactly, including which ones generate() adds (temperature only when != 1,
    top-k only when > 0, top-p only when < 1) and their tie behaviour (top-k keeps every token equal to the
    k-th score). Shared by `process_logits` and the SGLang backend's logit processor, so both define one p.
    """
    scores = logits.float()
    if scores.dim() == 1:
        scores = scores.unsqueeze(0)
    if temperature != 1.0:
        scores = scores / temperature
    if top_k > 0:
        k = min(top_k, scores.size(-1))
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
        scores = scores.masked_fill(remove, -math.inf)
    return scores


def process_logits(logits: torch.Tensor, sampling: Sampling | SamplingParams) -> torch.Tensor:
    """Target probabilities [n, V] from logits [n, V]: HF TemperatureLogitsWarper -> TopK -> TopP -> softmax."""
    return warp_scores(logits, sampling.temperature, sampling.top_k, sampling.top_p).softmax(dim=-1)


def make_generator(seed: int | None) -> torch.Generator:
    """A per-session CPU generator; an unseeded session gets a fresh random seed."""
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return gen


def _sample(probs: torch.Tensor, gen: torch.Generator) -> int:
    return int(torch.multinomial(probs.float().cpu(), 1, generator=gen).item())


def accept_greedy(draft: list[int], argmax: list[int]) -> Decision:
    """`argmax[i]` is the target's token after context + draft[:i]; len(argmax) == len(draft) + 1."""
    if len(argmax) != len(draft) + 1:
        raise ValueError(f"need {len(draft) + 1} target positions, got {len(argmax)}")
    n = 0
    while n < len(draft) and draft[n] == argmax[n]:
        n += 1
    return Decision(n, int(argmax[n]))


@dataclass(frozen=True)
class SparseQ:
    """One draft position's q on its support (at most MAX_Q_SUPPORT entries): never a vocabulary-sized tensor."""

    ids: torch.Tensor  # long [m], distinct, in [0, vocab)
    probs: torch.Tensor  # float64 [m], normalized as the edge sampled
    drafted: float  # q at the drafted token (> 0)


def sparse_q(q_ids: list[int], q_probs: list[float], vocab: int, token: int) -> SparseQ:
    """Validate one sparse draft distribution; normalized as the edge sampled it."""
    if len(q_ids) != len(q_probs) or not q_ids:
        raise DraftError("each draft position needs a non-empty q with one probability per id")
    ids = torch.tensor(q_ids, dtype=torch.long)
    probs = torch.tensor(q_probs, dtype=torch.float64)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise DraftError(f"q ids must lie in [0, {vocab})")
    if ids.unique().numel() != ids.numel():
        raise DraftError("q ids repeat")
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()):
        raise DraftError("q probabilities must be finite and >= 0")
    total = float(probs.sum())
    if abs(total - 1.0) > Q_SUM_TOLERANCE:
        raise DraftError(f"q probabilities sum to {total:.6f}, not 1")
    probs = probs / total
    at = (ids == token).nonzero()
    drafted = float(probs[at[0, 0]]) if at.numel() else 0.0
    if drafted <= 0:
        raise DraftError(f"draft token {token} has q = 0: it cannot have been sampled from q")
    return SparseQ(ids, probs, drafted)


def accept_sampling(
    draft: list[int],
    q: list[SparseQ],
    p: torch.Tensor,
    gen: torch.Generator,
) -> Decision:
    """Speculative sampling. `q[i]` sparse draft distribution at i, `p` [len(draft)+1, V] target probabilities.

    Runs on q's support: the acceptance test needs q only at the drafted token, and the residual
    max(0, p − q) equals p off the support, so only the rejected position's row of p is copied (float64) and
    corrected on q's ids. The test ratios of the whole round are gathered at once.
    """
    k = len(draft)
    if p.shape[0] != k + 1 or len(q) != k:
        raise ValueError("need one q per draft token and len(draft)+1 target distributions")
    dev = p.device  # p may stay where the backend computed it: only q's few entries move, and one row back
    if k:
        rows, cols = torch.arange(k, device=dev), torch.tensor(draft, dtype=torch.long, device=dev)
        px = p[rows, cols].to(torch.float64).tolist()  # the round's test ratios in one gather (one sync)
    for i in range(k):
        qx = q[i].drafted
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        if u * qx < px[i]:  # u < p/q without dividing; always true when p >= q
            continue
        return Decision(i, _sample(residual(p[i], q[i]), gen))
    return Decision(k, _sample(p[k], gen))


def residual(p: torch.Tensor, q: SparseQ) -> torch.Tensor:
    """max(0, p - q) over the vocabulary (float64, unnormalized) for one row p [V]; only q's ids change."""
    res = p.to(torch.float64, copy=True)
    ids = q.ids.to(p.device)
    res[ids] = (res[ids] - q.probs.to(p.device)).clamp_min(0.0)
    if float(res.sum()) <= 0.0:
        # Only reachable through rounding when p == q on the support: then p is the exact residual.
        res = p.to(torch.float64)
    return res


def sample_token(p: torch.Tensor, gen: torch.Generator) -> int:
    """One token from a processed distribution (first token after prefill, centralized decode)."""
    return _sample(p.to(torch.float64), gen)
