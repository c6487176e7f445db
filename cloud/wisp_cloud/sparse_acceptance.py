"""Speculative sampling when the target p is known only at a few ids, plus draws from p (no [V] row of p).

The SGLang backend cannot afford p over the whole vocabulary (full-vocabulary logprobs cost ~0.4 s per position
at 152k tokens), but it can cheaply give, per verified position i: p at named ids (the drafted token and q's
sparse support) and independent samples drawn from p by SGLang's own sampler. That is enough for exact
speculative sampling:

* **Acceptance** of draft token x needs p(x) and q(x) only: accept when u·q(x) < p(x) (u ~ U[0, 1)), exactly as
  `acceptance.accept_sampling`.
* **Bonus** after k acceptances: a draw from p at position k, as is.
* **Residual** r = norm(max(0, p − q)) on the first rejection, by rejection sampling with p as the proposal:
  draw X ~ p and keep it with probability a(X) = max(0, p(X) − q(X)) / p(X), else draw again. Off q's support
  q(X) = 0, so a(X) = 1 and no p is needed there; on q's support p(X) was asked for with the forward.

Why this is exactly the residual: write m(x) = max(0, p(x) − q(x)) and β = Σ_x m(x) > 0 (β = 0 would mean
p = q, and then the draft is never rejected). One trial returns x with probability p(x)·a(x) = m(x) and fails
with probability 1 − β. Trials are independent, so the first kept draw is x with probability
Σ_{t≥0} (1 − β)^t · m(x) = m(x) / β. Bounded: after `max_draws` failed trials (probability (1 − β)^max_draws)
the caller's fallback samples r from the dense row of p; then P(x) = Σ_{t<n} (1 − β)^t m(x) + (1 − β)^n m(x)/β
= m(x)/β, still exact, since the fallback draws independently of the failed trials. The expected number of
draws at a rejected position is 1/β; a rejection happens with probability β, so on average a verified position
costs one extra draw, and the fallback happens at a position with probability β(1 − β)^n ≤ 1/(e·n).
"""

from __future__ import annotations

import torch

from wisp_cloud.acceptance import Decision, SparseQ, residual
from wisp_cloud.backends.base import SparseTarget

# Draws per retry request and the bound before the dense fallback (with the forward's own draw: 1 + 3·16 = 49).
RETRY_BATCH = 16
MAX_DRAWS = 49


def _uniform(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen, dtype=torch.float64))


def keep_prob(p_x: float, q_x: float) -> float:
    """Probability of keeping a draw x ~ p as a residual sample: max(0, p(x) − q(x)) / p(x); 1 off q's support."""
    if q_x <= 0.0:
        return 1.0
    if p_x <= 0.0:
        return 0.0  # never drawn from p; kept out so rounding cannot put residual mass where p has none
    return max(0.0, p_x - q_x) / p_x


def q_map(q: SparseQ) -> dict[int, float]:
    """q on its support as token -> probability (at most MAX_Q_SUPPORT entries)."""
    return dict(zip(q.ids.tolist(), q.probs.tolist(), strict=True))


def first_kept(
    candidates: list[int], p_of: dict[int, float], q_of: dict[int, float], gen: torch.Generator
) -> int | None:
    """The first draw kept by the residual test, or None when all are refused (one uniform per draw tested).

    `p_of` must hold p at every candidate on q's support (off it, nothing is needed).
    """
    for x in candidates:
        q_x = q_of.get(x, 0.0)
        if q_x <= 0.0:
            return x
        if _uniform(gen) < keep_prob(p_of[x], q_x):
            return x
    return None


def sample_residual(
    pos: int,
    q: SparseQ,
    target: SparseTarget,
    gen: torch.Generator,
    *,
    retry_batch: int = RETRY_BATCH,
    max_draws: int = MAX_DRAWS,
) -> tuple[int, int, bool]:
    """One exact sample of norm(max(0, p − q)) at `pos`: (token, draws used, fell back to the dense row)."""
    q_of = q_map(q)
    p_of = {x: target.p_at(pos, x) for x in q_of}
    candidates = [target.sample(pos)]
    used = 0
    while True:
        kept = first_kept(candidates, p_of, q_of, gen)
        used += len(candidates)
        if kept is not None:
            return kept, used, False
        if used >= max_draws:
            break
        candidates = target.draw(pos, min(retry_batch, max_draws - used))
    dense = torch.as_tensor(target.dense(pos))
    row = residual(dense, q)
    return int(torch.multinomial(row.float().cpu(), 1, generator=gen).item()), used, True


def accept_sampling_sparse(
    draft: list[int],
    q: list[SparseQ],
    target: SparseTarget,
    gen: torch.Generator,
    *,
    retry_batch: int = RETRY_BATCH,
    max_draws: int = MAX_DRAWS,
) -> Decision:
    """Speculative sampling over a `SparseTarget`: same decisions in law as `acceptance.accept_sampling`."""
    k = len(draft)
    if len(q) != k:
        raise ValueError("need one q per draft token")
    for i in range(k):
        if _uniform(gen) * q[i].drafted < target.p_at(i, draft[i]):  # u < p/q without dividing
            continue
        token, used, fell_back = sample_residual(
            i, q[i], target, gen, retry_batch=retry_batch, max_draws=max_draws
        )
        return Decision(i, token, used, fell_back)
    return Decision(k, target.sample(k))
