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
    SparseQ,
    accept_greedy,
    accept_sampling,
    check_siblings,
    make_generator,
    process_logits,
    sample_token,
    sparse_q,
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


def test_sparse_q_validation():
    q = sparse_q([3, 1], [0.25, 0.75], 5, token=1)
    assert q.ids.tolist() == [3, 1] and q.probs.tolist() == [0.25, 0.75] and q.drafted == 0.75
    assert sparse_q([0, 1], [0.5, 0.5005], 5, token=0).drafted == pytest.approx(0.5 / 1.0005)  # renormalized
    for ids, probs, tok in [
        ([9], [1.0], 9),  # out of vocab
        ([1, 1], [0.5, 0.5], 1),  # repeated id
        ([1, 2], [0.5, 0.2], 1),  # does not sum to 1
        ([1, 2], [1.0, 0.0], 2),  # draft token with q = 0
        ([1, 2], [1.0, 0.0], 3),  # draft token off q's support
        ([1, 2], [float("nan"), 1.0], 2),
        ([], [], 1),
    ]:
        with pytest.raises(DraftError):
            sparse_q(ids, probs, 5, token=tok)


def _as_sparse(q: torch.Tensor, token: int) -> SparseQ:
    ids = q.nonzero().flatten()
    return sparse_q(ids.tolist(), q[ids].tolist(), q.numel(), token)


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
        d = accept([x], [_as_sparse(Q0, x)], p, gen)
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
    a = [accept_sampling([1], [_as_sparse(Q0, 1)], p, make_generator(7)) for _ in range(5)]
    b = [accept_sampling([1], [_as_sparse(Q0, 1)], p, make_generator(7)) for _ in range(5)]
    assert a == b


# ---- sparse q: the same decisions as the dense maths, without vocabulary-sized host arrays ----


def _accept_dense(draft: list[int], q: list[torch.Tensor], p: torch.Tensor, gen: torch.Generator) -> Decision:
    """The textbook rule on dense q [V] (the server's implementation before q stayed sparse): the reference."""
    p64 = p.to(torch.float64)
    for i, x in enumerate(draft):
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        if u * float(q[i][x]) < float(p64[i, x]):
            continue
        residual = (p64[i] - q[i]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:
            residual = p64[i]
        return Decision(i, int(torch.multinomial(residual.float(), 1, generator=gen).item()))
    return Decision(len(draft), int(torch.multinomial(p64[len(draft)].float(), 1, generator=gen).item()))


def _random_round(
    k: int, vocab: int, support: int, seed: int
) -> tuple[list[int], list[SparseQ], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(k + 1, vocab, generator=g) * 4, dim=-1)
    draft, qs = [], []
    for i in range(k):
        ids = torch.randperm(vocab, generator=g)[:support]
        # q overlaps p's mass on half its support: both acceptances and rejections happen
        ids[: support // 2] = torch.topk(p[i], support // 2).indices
        ids = ids.unique()
        probs = torch.rand(ids.numel(), generator=g, dtype=torch.float64) + 1e-3
        probs = (probs / probs.sum()).to(torch.float32)
        x = int(ids[int(torch.multinomial(probs, 1, generator=g))])
        draft.append(x)
        qs.append(sparse_q(ids.tolist(), probs.tolist(), vocab, x))
    return draft, qs, p


def _dense(q: SparseQ, vocab: int) -> torch.Tensor:
    d = torch.zeros(vocab, dtype=torch.float64)
    d[q.ids] = q.probs
    return d


def test_sparse_and_dense_paths_agree_exactly():
    rejected = 0
    for seed in range(200):
        draft, qs, p = _random_round(k=1 + seed % 8, vocab=97, support=1 + seed % 64, seed=seed)
        dense = [_dense(q, 97) for q in qs]
        ours = accept_sampling(draft, qs, p, make_generator(seed))
        ref = _accept_dense(draft, dense, p, make_generator(seed))
        assert ours == ref, seed
        rejected += ours.accepted < len(draft)
    assert 20 < rejected < 195  # both branches (a rejection, the bonus token) exercised


def test_a_sampling_round_at_152k_vocab_allocates_no_vocab_by_k_array():
    """Host memory torch allocates inside one rejected 32-token round: about two rows of the vocabulary (the
    residual, its float32 copy for sampling), never k of them. The dense maths allocated ~2 × k rows."""
    vocab, k = 151_936, 32
    draft, qs, p = _random_round(k=k, vocab=vocab, support=64, seed=3)
    # reject at the last position: the path that touches the most of p
    p[: k - 1, :] = 0.0
    p[torch.arange(k - 1), torch.tensor(draft[: k - 1])] = 1.0
    p[k - 1, draft[k - 1]] = 0.0
    p[k - 1] /= p[k - 1].sum()

    def allocated(fn) -> int:
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            fn()
        return sum(max(0, e.self_cpu_memory_usage) for e in prof.events())

    ours = allocated(lambda: accept_sampling(draft, qs, p, make_generator(0)))
    dense = allocated(lambda: _accept_dense(draft, [_dense(q, vocab) for q in qs], p, make_generator(0)))
    assert accept_sampling(draft, qs, p, make_generator(0)).accepted == k - 1
    row = vocab * 8
    assert ours <= 3 * row, f"{ours / row:.1f} float64 vocabulary rows allocated"
    assert dense >= k * row  # the measure sees the dense path's per-position arrays


# ---- token trees: one sibling per draft position ----


def test_greedy_siblings_take_the_target_token_and_the_one_after_it():
    # rows: after context, after draft[0], after draft[1], after sibling 0, after sibling 1
    draft, sibs = [5, 6], [7, 8]
    assert accept_greedy(draft, [7, 1, 2, 40, 41], sibs) == Decision(0, 40, sibling=True)
    assert accept_greedy(draft, [5, 8, 2, 40, 41], sibs) == Decision(1, 41, sibling=True)
    assert accept_greedy(draft, [5, 9, 2, 40, 41], sibs) == Decision(1, 9)  # sibling wrong too
    assert accept_greedy(draft, [5, 6, 3, 40, 41], sibs) == Decision(2, 3)  # every draft token taken
    assert accept_greedy(draft, [5, 1, 3, 40], [7]) == Decision(1, 1)  # no sibling at position 1
    with pytest.raises(ValueError):
        accept_greedy(draft, [5, 6, 3], sibs)  # siblings without their rows


def _run_tree(n: int, seed: int = 0, sibling_rule=None):
    """One draft token and one sibling, both drawn from Q0; returns first tokens and (first, second) pairs."""
    gen = make_generator(seed)
    rng = np.random.default_rng(seed)
    first, pairs, took = [], [], 0
    for _ in range(n):
        x, s = (int(t) for t in rng.choice(V, size=2, p=Q0.numpy()))
        p = torch.stack([P0, P1[x], P1[s]])
        if sibling_rule is None:
            d = accept_sampling([x], [_as_sparse(Q0, x)], p, gen, [s])
        else:
            d = sibling_rule(x, s, p, gen)
        y = [x] if d.accepted == 1 else [s] if d.sibling else []
        took += d.sibling
        y.append(d.next_token)
        first.append(y[0])
        if len(y) == 2:
            pairs.append((y[0], y[1]))
    return np.array(first), pairs, took


def test_tree_sampling_is_exact():
    """Recursive rejection over a draft token and an i.i.d. sibling: the first committed token follows p, and
    the token after a committed draft or sibling follows p given it."""
    first, pairs, took = _run_tree(20_000)
    assert took > 1_000  # the sibling path is exercised
    assert _chi2_pvalue(first, P0) > 1e-3
    for x in range(V):
        after = np.array([b for a, b in pairs if a == x])
        if len(after) > 500:
            assert _chi2_pvalue(after, P1[x]) > 1e-4


def test_a_sibling_tested_against_p_instead_of_the_residual_is_caught():
    """The naive rule (accept the sibling with min(1, p/q), as if it were the first candidate) biases the output:
    the same statistic rejects it."""

    def naive(x, s, p, gen):
        q = _as_sparse(Q0, x)
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        if u * float(Q0[x]) < float(P0[x]):
            return Decision(1, sample_token(p[1], gen))
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        if u * float(Q0[s]) < float(P0[s]):
            return Decision(0, sample_token(p[2], gen), sibling=True)
        from wisp_cloud.acceptance import residual

        return Decision(0, sample_token(residual(P0, q), gen))

    first, _, _ = _run_tree(20_000, sibling_rule=naive)
    assert _chi2_pvalue(first, P0) < 1e-6


def test_sibling_validation():
    q = [_as_sparse(Q0, 1)]
    check_siblings([2], [1], q, limit=4)
    check_siblings([3], [1], None, limit=4)  # greedy: any token
    zero = sparse_q([1, 2], [1.0, 0.0], V, token=1)
    for sibs, draft, qs, limit in [
        ([2, 3], [1], q, 4),  # more siblings than draft tokens
        ([2], [1], q, 0),  # the server verifies none
        ([2], [1], [sparse_q([1, 4], [0.5, 0.5], V, token=1)], 4),  # off q's support
    ]:
        with pytest.raises(DraftError):
            check_siblings(sibs, draft, qs, limit)
    with pytest.raises(DraftError):  # on the support with q = 0: cannot have been drawn
        accept_sampling(
            [1], [zero], torch.stack([torch.eye(V, dtype=torch.float64)[3]] * 3), make_generator(0), [2]
        )
