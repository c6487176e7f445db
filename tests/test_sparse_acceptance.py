"""Sparse speculative sampling (sparse_acceptance.py): p known only at q's support plus draws from p.

The target here is exact (a known p per position, drawn with torch.multinomial), so any deviation of the committed
tokens' law from p is the acceptance math's. The SGLang stage (tests/sglang) runs the same math on SGLang's draws.
"""

from __future__ import annotations

import threading

import pytest
import torch
from scipy.stats import chisquare
from wisp_cloud import sparse_acceptance
from wisp_cloud.acceptance import SparseQ, make_generator, sparse_q
from wisp_cloud.backends.base import BatchStats, ItemResult, SparseTarget, WorkItem
from wisp_cloud.jobs import Job, JobKind
from wisp_cloud.planner import plan
from wisp_cloud.runner import Runner
from wisp_cloud.sessions import Session
from wisp_cloud.sparse_acceptance import (
    accept_sampling_sparse,
    first_kept,
    keep_prob,
    sample_residual,
)
from wisp_sdk.protocol import SLO, SamplingParams

V = 8


class ExactTarget(SparseTarget):
    """p [m, V] known exactly; p_at only at the ids the item asked for, as a real backend would answer."""

    def __init__(self, p: torch.Tensor, asked: list[list[int]], gen: torch.Generator) -> None:
        self.p = p
        self.asked = [set(a) for a in asked]
        self.gen = gen
        self.draws = 0
        self.dense_calls = 0
        self.first = [int(torch.multinomial(row, 1, generator=gen)) for row in p]

    def p_at(self, pos: int, token: int) -> float:
        if token not in self.asked[pos]:
            raise KeyError(token)
        return float(self.p[pos, token])

    def sample(self, pos: int) -> int:
        return self.first[pos]

    def draw(self, pos: int, n: int) -> list[int]:
        self.draws += n
        return torch.multinomial(self.p[pos], n, replacement=True, generator=self.gen).tolist()

    def dense(self, pos: int) -> torch.Tensor:
        self.dense_calls += 1
        return self.p[pos]


P0 = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.05, 0.0], dtype=torch.float64)
P1 = torch.tensor([0.05, 0.05, 0.10, 0.40, 0.10, 0.10, 0.10, 0.10], dtype=torch.float64)
# q puts half its mass above p on p's argmax and half where p is 0: mostly rejected, and residual draws of token 0
# are always refused (q(0) > p(0)), so the rejection loop really loops.
Q_IDS, Q_PROBS = [0, 7], [0.5, 0.5]


def _pvalue(counts: torch.Tensor, p: torch.Tensor) -> float:
    keep = p > 0
    assert int(counts[~keep].sum()) == 0, "a token outside p's support was committed"
    n = int(counts.sum())
    return float(chisquare(counts[keep].tolist(), (p[keep] * n).tolist()).pvalue)


def _first_token_counts(n: int, seed: int, **kw: int) -> tuple[torch.Tensor, int, int, int]:
    gen = torch.Generator().manual_seed(seed)
    p = torch.stack([P0, P1])
    counts = torch.zeros(V, dtype=torch.long)
    rejected = draws = dense = 0
    for _ in range(n):
        d = Q_IDS[int(torch.multinomial(torch.tensor(Q_PROBS), 1, generator=gen))]
        target = ExactTarget(p, [Q_IDS], gen)
        dec = accept_sampling_sparse([d], [sparse_q(Q_IDS, Q_PROBS, V, d)], target, gen, **kw)
        counts[d if dec.accepted else dec.next_token] += 1
        rejected += dec.accepted == 0
        draws += target.draws
        dense += target.dense_calls
        # The decision reports the loop's work (the engine counts it in /metrics): the forward's draw plus retries.
        assert dec.dense_fallback == (target.dense_calls == 1)
        assert dec.residual_draws == (0 if dec.accepted else 1 + target.draws)
    return counts, rejected, draws, dense


def test_keep_prob():
    assert keep_prob(0.3, 0.0) == 1.0  # off q's support: always kept, p not needed
    assert keep_prob(0.3, 0.5) == 0.0  # q above p: no residual mass
    assert keep_prob(0.4, 0.1) == pytest.approx(0.75)
    assert keep_prob(0.0, 0.2) == 0.0


def test_first_kept_refuses_where_q_covers_p():
    gen = torch.Generator().manual_seed(0)
    q_of, p_of = {0: 0.5, 7: 0.5}, {0: 0.3, 7: 0.0}
    assert first_kept([0, 0, 3, 1], p_of, q_of, gen) == 3
    assert first_kept([0, 0], p_of, q_of, gen) is None


def test_committed_token_follows_p_through_the_residual():
    counts, rejected, draws, dense = _first_token_counts(8_000, seed=1)
    assert rejected > 4_800 and draws > 0 and dense == 0
    assert _pvalue(counts, P0) > 1e-4, counts


def test_dense_fallback_keeps_it_exact():
    """With one draw allowed, every refused candidate falls back to the dense residual: still exactly p."""
    counts, _rejected, draws, dense = _first_token_counts(8_000, seed=2, max_draws=1)
    assert draws == 0 and dense > 400
    assert _pvalue(counts, P0) > 1e-4, counts


def test_wrong_residual_is_detected(monkeypatch):
    """The same test fails when rejection keeps every draw (resampling p on rejection: the classic bug)."""
    monkeypatch.setattr(sparse_acceptance, "keep_prob", lambda p_x, q_x: 1.0)
    counts, *_ = _first_token_counts(8_000, seed=3)
    assert _pvalue(counts, P0) < 1e-6


def test_two_positions_commit_independent_draws_of_p():
    """A two-token draft: the first two committed tokens (accepted draft, residual or bonus) follow p0 x p1."""
    gen = torch.Generator().manual_seed(4)
    p = torch.stack([P0, P1, P0])
    q1_ids, q1_probs = [3, 0], [0.2, 0.8]
    q0 = torch.zeros(V, dtype=torch.float64)
    q0[Q_IDS] = torch.tensor(Q_PROBS, dtype=torch.float64)
    q1 = torch.zeros(V, dtype=torch.float64)
    q1[q1_ids] = torch.tensor(q1_probs, dtype=torch.float64)
    n = 12_000
    counts = torch.zeros(V * V, dtype=torch.long)
    for _ in range(n):
        d = [int(torch.multinomial(q0, 1, generator=gen)), int(torch.multinomial(q1, 1, generator=gen))]
        qs: list[SparseQ] = [sparse_q(Q_IDS, Q_PROBS, V, d[0]), sparse_q(q1_ids, q1_probs, V, d[1])]
        dec = accept_sampling_sparse(d, qs, ExactTarget(p, [Q_IDS, q1_ids], gen), gen)
        committed = d[: dec.accepted] + [dec.next_token]
        if len(committed) < 2:  # rejected at 0: the second token would be drawn in the next round, from p1
            committed.append(int(torch.multinomial(P1, 1, generator=gen)))
        counts[committed[0] * V + committed[1]] += 1
    assert _pvalue(counts, torch.outer(P0, P1).flatten()) > 1e-4


def test_residual_returns_draw_count_and_bad_input_is_refused():
    gen = torch.Generator().manual_seed(5)
    target = ExactTarget(torch.stack([P0]), [[3]], gen)
    q = sparse_q([3], [1.0], V, 3)
    token, used, fell_back = sample_residual(0, q, target, gen)
    assert token != 3 and used >= 1 and not fell_back
    with pytest.raises(ValueError):
        accept_sampling_sparse([3, 4], [q], target, gen)


# ---- the runner settles sparse decisions side by side ----


class SparseBackend:
    """A backend whose sampling answers are `ExactTarget`s whose retries must meet: `draw` waits at a barrier that
    only opens when two sessions ask at once, so a runner settling decisions one by one fails the test."""

    name = "sparse-test"
    vocab_size = V
    eos_token_ids: list[int] = []
    tokenizer_fingerprint = "test"

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=20)
        self.gen = torch.Generator().manual_seed(8)

    def forward(self, items: list[WorkItem]) -> tuple[list[ItemResult], BatchStats]:
        backend = self
        # Every draw of token 0 is refused (q(0) > p(0)), and the forward's own draw is token 0: a retry is certain.
        p = torch.tensor([[0.5, 0.5] + [0.0] * (V - 2)] * 2, dtype=torch.float64)

        class MeetingTarget(ExactTarget):
            def draw(self, pos: int, n: int) -> list[int]:
                backend.barrier.wait()
                return [1] * n

        results = []
        for it in items:
            target = MeetingTarget(p, it.support or [], self.gen)
            target.first = [0, 0]
            results.append(ItemResult(it.seq_id, [], sparse=target))
        return results, BatchStats.of(items, [0] * len(items), 0.0)

    def cached_len(self, seq_id: str) -> int:
        return 0

    def truncate(self, seq_id: str, length: int) -> None:
        pass

    def release(self, seq_id: str) -> None:
        pass

    def kv_bytes(self, seq_id: str | None = None) -> int:
        return 0


def test_runner_settles_sparse_decisions_side_by_side():
    backend = SparseBackend()
    planned = []
    for i in range(2):
        session = Session(
            id=f"{i:032x}",
            owner="anon",
            tokens=[1, 2, 3],
            prompt_len=3,
            max_new_tokens=8,
            sampling=SamplingParams(temperature=1.0, seed=i),
            slo=SLO(),
            mode="speculative",
            stop_ids=frozenset(),
            gen=make_generator(i),
        )
        # Draft token 7 (p = 0): always rejected; q(0) = 0.9 > p(0) = 0.5, so the forward's draw (0) is refused.
        q = [sparse_q([0, 7], [0.9, 0.1], V, 7)]
        job = Job(session, JobKind.round, round=1, draft=[7], q=q)
        session.pending = job
        planned.append(plan(job, backend, default_chunk=64))
    assert planned[0].item.support == [[0, 7]]
    outcomes, _stats = Runner(backend).run(planned)
    for out in outcomes:
        assert out.error is None, out.error
        assert (out.accepted, out.next_token) == (0, 1)
        assert out.residual_draws >= 2 and not out.dense_fallback
