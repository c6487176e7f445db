"""The SGLang backend against a real SGLang Engine (CPU, tiny Qwen2): lossless verification, exact sampling or a
clean refusal, KV bookkeeping, WISP ordering inside SGLang's queue, and the timing plugin."""

from __future__ import annotations

import time
from collections import deque
from types import SimpleNamespace

import pytest
import torch
from wisp_cloud.acceptance import process_logits
from wisp_cloud.backends.base import Backend, WorkItem
from wisp_cloud.backends.sglang import NO_DEADLINE_PRIORITY, deadline_priority, make_rid, parse_rid
from wisp_cloud.backends.sglang_plugin import reorder, wisp_order_key
from wisp_cloud.estimator import ItemShape, VerifyTimeEstimator
from wisp_sdk.errors import WispError
from wisp_sdk.protocol import SamplingParams


def _open(backend, sid: str, ids: list[int]) -> None:
    """Prefill all but the last context token (as the server does), so the next item is a verify."""
    backend.release(sid)
    res, _ = backend.forward([WorkItem(sid, ids[:-1], n_logits=0, context=ids)])
    assert res[0].argmax == [] and backend.cached_len(sid) == len(ids) - 1


def test_is_a_backend(backend):
    assert isinstance(backend, Backend)
    assert backend.name == "sglang" and backend.vocab_size == 384 and backend.eos_token_ids
    assert backend.max_siblings == 0  # chains only: the server's Welcome then refuses token trees


def _run_order(backend, items) -> list[str]:
    before = len(backend.drain_timings())
    backend.forward(items)
    order = []
    for b in backend.drain_timings()[before:]:
        order += [parse_rid(r)[1] for r in b["rids"] if parse_rid(r)]
    return order


def test_engine_runs_wisp_order(backend, reference):
    """Inside SGLang's own queue: with every request waiting together, the denser verify runs first even though its
    deadline (priority) is later, and a request whose deadline already passed runs last."""
    p = reference["prompts"][2]
    ids = p["ids"]
    names = ["o1", "o2", "o3", "late"]
    for _attempt in range(4):
        for n in names:
            _open(backend, n, ids)
        now = time.monotonic()
        # o1..o3: comfortable deadlines in o1 < o2 < o3 order, but density (n_logits / cost) o3 > o2 > o1.
        items = [
            WorkItem("o1", [ids[-1], *p["greedy"][:1]], n_logits=2, context=ids, deadline=now + 30),
            WorkItem("o2", [ids[-1], *p["greedy"][:4]], n_logits=5, context=ids, deadline=now + 40),
            WorkItem("o3", [ids[-1], *p["greedy"][:8]], n_logits=9, context=ids, deadline=now + 50),
            WorkItem("late", [ids[-1], *p["greedy"][:4]], n_logits=5, context=ids, deadline=now - 5),
        ]
        order = _run_order(backend, items)
        assert sorted(order) == sorted(names)
        batches = [b for b in backend.sglang_batches if any(r.startswith("wisp:") for r in b["rids"])]
        if len(batches) and len(batches[-1]["rids"]) == len(names):
            break  # all four were scheduled in one pass: the order is the queue's order
    else:
        pytest.skip("SGLang never saw the four requests waiting together (arrival race on a loaded machine)")
    assert order == ["o3", "o2", "o1", "late"], order


def test_greedy_verify_equals_hf_for_every_draft_length(backend, reference):
    """A batch of ragged verifies: argmax at each of the k+1 positions equals HF's greedy continuation."""
    prompts = reference["prompts"]
    for i, p in enumerate(prompts):
        _open(backend, f"g{i}", p["ids"])
    items = []
    for i, p in enumerate(prompts):
        k = i + 1  # k = 1..4: a ragged batch
        items.append(WorkItem(f"g{i}", [p["ids"][-1], *p["greedy"][:k]], n_logits=k + 1, context=p["ids"]))
    results, stats = backend.forward(items)
    for i, (res, p) in enumerate(zip(results, prompts, strict=True)):
        assert res.argmax == p["greedy"][: i + 2], f"prompt {i}"
        assert res.probs is None
    assert stats.batch_size == len(items) and stats.forward_s > 0


def test_rejected_tail_and_continuation(backend, reference):
    """A wrong draft: the first mismatch is where HF's greedy differs; after truncate the next round continues."""
    p = reference["prompts"][0]
    ids, greedy = p["ids"], p["greedy"]
    _open(backend, "r", ids)
    wrong = (greedy[1] + 1) % backend.vocab_size
    draft = [greedy[0], wrong, greedy[2]]
    (res,), _ = backend.forward([WorkItem("r", [ids[-1], *draft], n_logits=4, context=ids)])
    assert (
        res.argmax[:2] == greedy[:2]
    )  # draft[0] accepted; the target says greedy[1] where the draft said `wrong`
    # The server keeps ids + greedy[0] + the correction greedy[1]; the KV holds every committed token but the last.
    committed = ids + greedy[:2]
    backend.truncate("r", len(committed) - 1)
    assert backend.cached_len("r") == len(committed) - 1
    (res,), _ = backend.forward([WorkItem("r", [committed[-1], *greedy[2:5]], n_logits=4, context=committed)])
    assert res.argmax == greedy[2:6]


def test_long_context_in_chunks_then_decode(backend, reference):
    """Chunked prefill items (n_logits=0) then single-token decodes reproduce HF's greedy continuation."""
    p = reference["prompts"][1]
    ids = p["ids"]
    backend.release("c")
    for lo in range(0, len(ids) - 1, 4):
        backend.forward([WorkItem("c", ids[lo : min(lo + 4, len(ids) - 1)], n_logits=0, context=ids)])
    assert backend.cached_len("c") == len(ids) - 1
    seq = list(ids)
    for _ in range(6):
        (res,), _ = backend.forward([WorkItem("c", [seq[-1]], n_logits=1, context=seq)])
        seq.append(res.argmax[0])
    assert seq[len(ids) :] == p["greedy"][:6]
    backend.release("c")
    assert backend.cached_len("c") == 0 and backend.kv_bytes("c") == 0


def test_radix_cache_reuses_the_prefix(backend, reference):
    p = reference["prompts"][3]
    ids = p["ids"]
    _open(backend, "h", ids)
    before = len(backend.drain_timings())
    backend.forward([WorkItem("h", [ids[-1], *p["greedy"][:3]], n_logits=4, context=ids)])
    batches = [b for b in backend.drain_timings()[before:] if any(r.endswith(":h") for r in b["rids"])]
    assert batches, "the plugin reported no batch for this request"
    i = [r.endswith(":h") for r in batches[-1]["rids"]].index(True)
    new, cached = batches[-1]["items"][i]
    assert cached == len(ids) - 1 and new == 4  # only the last context token and the draft were computed


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=0.7, top_k=20, seed=2),
        SamplingParams(temperature=1.3, top_p=0.8, seed=3),
    ],
    ids=["t1", "t0.7-topk20", "t1.3-topp0.8"],
)
def test_sampling_probs_equal_hf_processed_distribution(backend, reference, sampling, monkeypatch):
    """Full-vocabulary sampling: p at every verified position (incl. the bonus) equals HF logits through the
    warpers."""
    monkeypatch.setattr(backend, "sampling_mode", "full")
    p = reference["prompts"][0]
    seq = p["ids"] + p["greedy"]
    m = len(p["logp_tail"])
    _open(backend, "s", seq[: len(seq) - m + 1])
    ctx = seq[: len(seq) - m + 1]
    (res,), _ = backend.forward(
        [WorkItem("s", seq[len(ctx) - 1 :], n_logits=m, sampling=sampling, context=ctx)]
    )
    want = process_logits(torch.tensor(p["logp_tail"]), sampling)
    got = torch.as_tensor(res.probs)
    assert got.shape == (m, backend.vocab_size)
    assert torch.allclose(got, want, atol=2e-5, rtol=0), (got - want).abs().max()
    assert res.argmax == torch.tensor(p["logp_tail"]).argmax(-1).tolist()


def test_sampling_refusal_is_a_clear_error(backend, reference):
    p = reference["prompts"][0]
    backend.sampling_mode = "refuse"
    try:
        with pytest.raises(WispError, match="refuses sampling"):
            backend.forward([WorkItem("x", p["ids"], n_logits=1, sampling=SamplingParams(temperature=0.8))])
        # greedy still runs on a refusing backend
        (res,), _ = backend.forward([WorkItem("x", p["ids"], n_logits=1)])
        assert res.argmax == p["greedy"][:1]
    finally:
        backend.sampling_mode = "sparse"
        backend.release("x")


def test_bad_items_are_refused(backend):
    with pytest.raises(ValueError):
        backend.forward([WorkItem("y", [], n_logits=0)])
    with pytest.raises(ValueError):
        backend.forward([WorkItem("y", [1, 2], n_logits=3)])
    with pytest.raises(ValueError):
        backend.forward([WorkItem("y", [1], n_logits=1), WorkItem("y", [2], n_logits=1)])


# ---- ordering ----


def test_rid_and_priority_encoding():
    rid = make_rid("sess:with:colons", 7, 5)
    assert parse_rid(rid) == (5, "sess:with:colons")
    assert parse_rid("someone-else") is None
    assert deadline_priority(None) == NO_DEADLINE_PRIORITY
    assert deadline_priority(12.3456) == 12345


def test_wisp_order_unit():
    """Urgent-and-feasible first (least slack), then density, then hopeless; foreign requests keep their order last."""
    est = VerifyTimeEstimator.default()
    now = 100.0

    def req(name, deadline, n_logits=5, total=40, prefix=35):
        return SimpleNamespace(
            rid=make_rid(name, 0, n_logits),
            priority=deadline_priority(deadline),
            origin_input_ids=[0] * total,
            prefix_indices=[0] * prefix,
        )

    cost = est.predict([ItemShape(5, 35)])
    queue = [
        SimpleNamespace(rid="foreign-1", priority=0, origin_input_ids=[0] * 4, prefix_indices=[]),
        req("comfy-dense", now + 100, n_logits=9, total=44, prefix=35),
        req("hopeless", now - 1.0),
        req("urgent-b", now + 2.5 * cost),
        req("comfy-sparse", now + 50, n_logits=1, total=36, prefix=35),
        req("urgent-a", now + 1.5 * cost),
        req("no-deadline", None),
    ]
    queue[-1].priority = NO_DEADLINE_PRIORITY
    reorder(queue, now=now)
    names = [parse_rid(r.rid)[1] if parse_rid(r.rid) else r.rid for r in queue]
    assert names == [
        "urgent-a",
        "urgent-b",
        "comfy-dense",
        "comfy-sparse",
        "hopeless",
        "no-deadline",
        "foreign-1",
    ]
    assert wisp_order_key(now, now + 1.5 * cost, 5, 35, 5, est)[0] == 0


# ---- the timing plugin ----


def test_plugin_reports_sglang_batches_to_the_estimator(backend, reference):
    p = reference["prompts"][1]
    ids = p["ids"]
    est = VerifyTimeEstimator.default()
    backend.attach_estimator(est)
    try:
        _open(backend, "t", ids)
        seen = len(est._recent)
        backend.forward([WorkItem("t", [ids[-1], *p["greedy"][:3]], n_logits=4, context=ids)])
        assert len(est._recent) > seen, "no SGLang batch timing reached the estimator"
        last = backend.sglang_batches[-1]
        assert last["mode"] in ("EXTEND", "MIXED", "DECODE") and last["forward_s"] > 0
        assert all(len(it) == 2 for it in last["items"]) and len(last["items"]) == len(last["rids"])
    finally:
        backend.attach_estimator(None)


def test_timings_file_is_read_incrementally_and_rotated(tmp_path, monkeypatch):
    """The backend's side of the plugin channel, without an engine: whole lines only, fed to the estimator, and the
    file truncated once it grows past the rotation size."""
    import json

    import wisp_cloud.backends.sglang as mod

    b = object.__new__(mod.SGLangBackend)
    b._timings_path = tmp_path / "t.jsonl"
    b._timings_pos = 0
    b.sglang_batches = deque(maxlen=10)
    b.estimator = VerifyTimeEstimator.default()
    rec = {"t": 1.0, "mode": "EXTEND", "items": [[5, 30], [3, 12]], "rids": ["wisp:5:0:a", "wisp:3:1:b"]}
    line = json.dumps({**rec, "forward_s": 0.01}) + "\n"
    b._timings_path.write_text(line + line[:10])  # one whole line and a partial one
    assert len(b.drain_timings()) == 1 and len(b.estimator._recent) == 1
    with b._timings_path.open("a") as f:
        f.write(line[10:])
    assert len(b.drain_timings()) == 2
    monkeypatch.setattr(mod, "_TIMINGS_ROTATE_BYTES", 10)
    with b._timings_path.open("a") as f:
        f.write(line)
    assert len(b.drain_timings()) == 3
    assert b._timings_pos == 0 and b._timings_path.stat().st_size == 0
    with b._timings_path.open("a") as f:
        f.write(line)
    assert len(b.drain_timings()) == 4 and len(b.estimator._recent) == 4


# ---- sparse exact sampling (--sglang-sampling sparse, the default) ----


SPARSE = SamplingParams(temperature=0.7, top_k=20, top_p=0.9)


def _sparse_setup(backend, reference, sampling):
    """The context of prompt 0 and HF's p after it (the reference, not SGLang), processed for `sampling`."""
    p = reference["prompts"][0]
    seq = p["ids"] + p["greedy"]
    m = len(p["logp_tail"])
    ctx = seq[: len(seq) - m + 1]
    want = process_logits(torch.tensor(p["logp_tail"]), sampling)
    return ctx, seq[len(ctx)], want


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=1.3, top_p=0.8), SPARSE],
    ids=["t1", "t1.3-topp0.8", "t0.7-topk20-topp0.9"],
)
def test_sparse_p_at_support_equals_hf(backend, reference, sampling):
    """The sparse path's p at the asked ids (every 5th token, both positions) equals HF's processed p: the HFWarpers
    processor reproduces HF's top-k/top-p (whose combined rule differs from SGLang's own sampler's)."""
    assert backend.sampling_mode == "sparse"
    ctx, nxt, want = _sparse_setup(backend, reference, sampling)
    _open(backend, "sp", ctx)
    support = [list(range(0, backend.vocab_size, 5))]
    (res,), _ = backend.forward(
        [WorkItem("sp", [ctx[-1], nxt], n_logits=2, sampling=sampling, context=ctx, support=support)]
    )
    assert res.probs is None and res.sparse is not None
    got = torch.tensor([res.sparse.p_at(0, x) for x in support[0]], dtype=torch.float64)
    assert torch.allclose(got, want[0, support[0]].double(), atol=2e-6, rtol=0), (
        (got - want[0, support[0]]).abs().max()
    )
    for pos in (0, 1):  # the forward's own draws lie in p's support
        assert want[pos, res.sparse.sample(pos)] > 0
    with pytest.raises(KeyError):
        res.sparse.p_at(0, 1)  # not asked for
    dense = res.sparse.dense(0)  # the fallback: the full-vocabulary row
    assert torch.allclose(dense, want[0], atol=2e-6, rtol=0)


def _chi2(counts: dict[int, int], p: torch.Tensor, n: int) -> float:
    """Chi-square p-value of token counts against p (tokens expected < 5 times lumped into one bin)."""
    from scipy.stats import chisquare

    big = [x for x in range(p.numel()) if float(p[x]) * n >= 5]
    obs = [counts.get(x, 0) for x in big]
    exp = [float(p[x]) * n for x in big]
    rest_obs, rest_exp = n - sum(obs), n - sum(exp)
    if rest_exp >= 1:
        obs.append(rest_obs)
        exp.append(rest_exp)
    scale = sum(obs) / sum(exp)
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)


def test_sparse_sampling_is_distribution_exact(backend, reference):
    """End to end on the real engine: a one-token draft from a q that is mostly rejected (half its mass on a token
    p filters out, half on p's argmax, above p there), so the first committed token comes from the residual
    norm(max(0, p − q)) by rejection on SGLang's own draws most of the time, and the residual loop refuses
    candidates (every draw of the argmax) and asks for more. The committed token's distribution must be HF's p
    (chi-square). The same draws pushed through the wrong residual (resample p on rejection, the classic bug)
    must fail the same test: the test has the power to see it."""
    from wisp_cloud.acceptance import sparse_q
    from wisp_cloud.sparse_acceptance import accept_sampling_sparse

    sampling = SPARSE
    ctx, _nxt, want = _sparse_setup(backend, reference, sampling)
    p0 = want[0]
    top = int(p0.argmax())
    out_of_support = int((p0 == 0).nonzero()[0, 0])
    q_ids, q_probs = [top, out_of_support], [0.5, 0.5]
    assert float(p0[top]) < 0.5
    gen = torch.Generator().manual_seed(7)
    n_items, rounds = 100, 4
    right: dict[int, int] = {}
    wrong: dict[int, int] = {}
    rejected = 0
    draws_before = backend.residual_draws
    for r in range(rounds):
        sids = [f"x{r}-{i}" for i in range(n_items)]
        backend.forward(
            [WorkItem(sid, ctx[:-1], n_logits=0, context=ctx) for sid in sids]
        )  # prefill (cached)
        items, drafts = [], []
        for sid in sids:
            d = q_ids[int(torch.multinomial(torch.tensor(q_probs), 1, generator=gen))]
            drafts.append(d)
            items.append(
                WorkItem(sid, [ctx[-1], d], n_logits=2, sampling=sampling, context=ctx, support=[q_ids])
            )
        results, _ = backend.forward(items)
        for d, res in zip(drafts, results, strict=True):
            q = [sparse_q(q_ids, q_probs, backend.vocab_size, d)]
            # Same acceptance uniform for both rules: a copy of the generator's state.
            state = gen.get_state()
            dec = accept_sampling_sparse([d], q, res.sparse, gen)
            tok = d if dec.accepted else dec.next_token
            right[tok] = right.get(tok, 0) + 1
            alt = torch.Generator()
            alt.set_state(state)
            accepted = float(torch.rand((), generator=alt, dtype=torch.float64)) * 0.5 < res.sparse.p_at(0, d)
            bad = d if accepted else res.sparse.sample(0)
            wrong[bad] = wrong.get(bad, 0) + 1
            rejected += 0 if dec.accepted else 1
        for sid in sids:
            backend.release(sid)
    n = n_items * rounds
    assert rejected > n // 2, "the draft should mostly be rejected"
    assert backend.residual_draws > draws_before, "the residual loop never asked SGLang for more draws"
    assert _chi2(right, p0, n) > 1e-4, (right, p0)
    assert _chi2(wrong, p0, n) < 1e-6, "the chi-square test cannot tell the wrong residual apart"
