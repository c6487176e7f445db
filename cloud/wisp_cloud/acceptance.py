"""Lossless acceptance of a draft against the target: greedy and speculative sampling, backend-independent.

Greedy: accept the longest draft prefix equal to the target's argmax, then commit the target's own token.
Sampling (Leviathan et al. / Chen et al.): accept draft token x with probability min(1, p(x)/q(x)); on the
first rejection sample from norm(max(0, p - q)); if every token is accepted, sample a bonus token from p.
The committed tokens are then distributed exactly as the target's own sampling, for any q.

Siblings (a small token tree: one alternative per draft position, verified in the same pass). Greedy: when the
draft token at i is rejected and the sibling at i is the target's token there, commit it and the target's token
after it. Sampling: the sibling at i is a second draw from the same q_i, independent of the first, so on the
first token's rejection the recursive rejection rule of SpecInfer (Miao et al. 2024, multi-step speculative
sampling) applies: accept the sibling with probability min(1, r(x)/q(x)) under the residual r = norm(max(0, p - q)),
else sample from norm(max(0, r - q)). Exact for candidates drawn i.i.d. from q (tested: chi-square).

p is the target's distribution after Hugging Face's warpers in their generate() order: temperature, top-k,
top-p (min_tokens_to_keep=1). `process_logits` reimplements them bit-for-bit so the server needs no
transformers import on this path (and an SGLang backend can reuse it on returned logprobs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from wisp_sdk.protocol import Round, SamplingParams
from wisp_sdk.sampling import MAX_Q_SUPPORT  # entries of q per draft position

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
    # The sibling at `accepted` was committed after draft[:accepted], then `next_token` (the target's after it).
    sibling: bool = False


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


def accept_greedy(draft: list[int], argmax: list[int], siblings: list[int] | None = None) -> Decision:
    """`argmax[i]` is the target's token after context + draft[:i] (i <= len(draft)), then for each sibling j
    the target's token after context + draft[:j] + [siblings[j]]: len(argmax) == len(draft) + 1 + len(siblings)."""
    sibs = siblings or []
    k = len(draft)
    if len(argmax) != k + 1 + len(sibs) or len(sibs) > k:
        raise ValueError(f"need {k + 1 + len(sibs)} target positions, got {len(argmax)}")
    n = 0
    while n < k and draft[n] == argmax[n]:
        n += 1
    if n < len(sibs) and sibs[n] == argmax[n]:
        return Decision(n, int(argmax[k + 1 + n]), sibling=True)
    return Decision(n, int(argmax[n]))


@dataclass(frozen=True)
class SparseQ:
    """One draft position's q on its support (at most MAX_Q_SUPPORT entries): never a vocabulary-sized tensor."""

    ids: torch.Tensor  # long [m], distinct, in [0, vocab)
    probs: torch.Tensor  # float64 [m], normalized as the edge sampled
    drafted: float  # q at the drafted token (> 0)

    def prob_of(self, token: int) -> float:
        """q(token): 0 off the support."""
        return _prob_at(self.ids, self.probs, token)


def _prob_at(ids: torch.Tensor, probs: torch.Tensor, token: int) -> float:
    at = (ids == token).nonzero()
    return float(probs[at[0, 0]]) if at.numel() else 0.0


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
    drafted = _prob_at(ids, probs, token)
    if drafted <= 0:
        raise DraftError(f"draft token {token} has q = 0: it cannot have been sampled from q")
    return SparseQ(ids, probs, drafted)


def accept_sampling(
    draft: list[int],
    q: list[SparseQ],
    p: torch.Tensor,
    gen: torch.Generator,
    siblings: list[int] | None = None,
) -> Decision:
    """Speculative sampling. `q[i]` sparse draft distribution at i, `p` [len(draft)+1+len(siblings), V] target
    probabilities (rows as `accept_greedy`'s argmax); `siblings[j]` a second draw from q[j].

    Runs on q's support: the acceptance test needs q only at the drafted token, and the residual
    max(0, p − q) equals p off the support, so only the rejected position's row of p is copied (float64) and
    corrected on q's ids. The test ratios of the whole round are gathered at once.
    """
    sibs = siblings or []
    k = len(draft)
    if p.shape[0] != k + 1 + len(sibs) or len(q) != k or len(sibs) > k:
        raise ValueError("need one q per draft token and len(draft)+1+len(siblings) target distributions")
    dev = p.device  # p may stay where the backend computed it: only q's few entries move, and one row back
    if k:
        rows, cols = torch.arange(k, device=dev), torch.tensor(draft, dtype=torch.long, device=dev)
        px = p[rows, cols].to(torch.float64).tolist()  # the round's test ratios in one gather (one sync)
    for i in range(k):
        qx = q[i].drafted
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        if u * qx < px[i]:  # u < p/q without dividing; always true when p >= q
            continue
        res = residual(p[i], q[i])
        if i < len(sibs):
            return _try_sibling(i, sibs[i], res, q[i], p[k + 1 + i], gen)
        return Decision(i, _sample(res, gen))
    return Decision(k, _sample(p[k], gen))


def _try_sibling(
    i: int, sib: int, res: torch.Tensor, q: SparseQ, p_after: torch.Tensor, gen: torch.Generator
) -> Decision:
    """The second candidate at position i after the first was rejected: recursive rejection on the residual."""
    q_sib = q.prob_of(sib)
    if q_sib <= 0:
        raise DraftError(f"sibling token {sib} has q = 0: it cannot have been sampled from q")
    r = res / res.sum()
    u = float(torch.rand((), generator=gen, dtype=torch.float64))
    if u * q_sib < float(r[sib]):
        return Decision(i, _sample(p_after, gen), sibling=True)
    return Decision(i, _sample(residual(r, q), gen))


def round_q(msg: Round, vocab: int, greedy: bool) -> list[SparseQ] | None:
    """A sampling round's draft distributions, validated (None for a greedy session or an empty draft)."""
    if greedy or not msg.draft_ids:
        return None
    if msg.q_ids is None or msg.q_probs is None:
        raise DraftError("a sampling session's round needs the draft distribution q")
    if len(msg.q_ids) != len(msg.draft_ids) or len(msg.q_probs) != len(msg.draft_ids):
        raise DraftError("q_ids and q_probs need one entry per draft token")
    if any(len(ids) > MAX_Q_SUPPORT for ids in msg.q_ids):
        raise DraftError(f"q has more than {MAX_Q_SUPPORT} entries for a draft position")
    return [
        sparse_q(ids, probs, vocab, tok)
        for ids, probs, tok in zip(msg.q_ids, msg.q_probs, msg.draft_ids, strict=True)
    ]


def check_siblings(siblings: list[int], draft: list[int], q: list[SparseQ] | None, limit: int) -> None:
    """A round's siblings the verifier can use: at most `limit` and one per draft token, and (sampling) each a
    draw from its position's q. Raises DraftError otherwise."""
    if len(siblings) > min(limit, len(draft)):
        raise DraftError(f"{len(siblings)} siblings for {len(draft)} draft tokens (limit {limit})")
    for j, (sib, qj) in enumerate(zip(siblings, q or [], strict=False)):
        if qj.prob_of(sib) <= 0:
            raise DraftError(f"sibling {sib} at {j} is outside q's support: it cannot have been drawn from q")


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
