"""Token trees (one sibling per draft position): each backend's tree pass equals the chains it stands for.

A verify item carries the pending context, a draft and a sibling for each of its first draft tokens. Sibling j
must see exactly what draft token j sees, at draft token j's position; nothing else may see it; and after the
server truncates back to the accepted prefix, the cache must serve the next pass as if no tree had been there.
Checked against HF eager run on each chain alone, in ragged batches next to plain verifies and prefill chunks.
"""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from wisp_cloud.backends.base import WorkItem, check_batch  # noqa: E402
from wisp_cloud.backends.fake import FakeBackend, next_token  # noqa: E402


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@torch.no_grad()
def _argmax_after(model, tokens: list[int]) -> int:
    return int(model(torch.tensor([tokens])).logits[0, -1].argmax())


def _tree_rounds(backend, hf, vocab: int, seed: int, rounds: int = 4) -> int:
    """Random ragged batches of tree verifies, plain verifies and prefills, then random acceptance; returns the
    number of sibling rows checked."""
    rng = random.Random(seed)
    seqs: dict[str, list[int]] = {}
    pending: dict[str, list[int]] = {}  # committed tokens not in the KV yet (context the next pass feeds)
    for i in range(4):
        sid = f"t{i}"
        seqs[sid] = []
        pending[sid] = [rng.randrange(vocab) for _ in range(rng.randint(5, 30))]
    checked = 0
    for _ in range(rounds):
        items, trees = [], {}
        for sid in seqs:
            k = rng.randint(1, 5)
            m = rng.randint(0, k)
            draft = [rng.randrange(vocab) for _ in range(k)]
            sibs = [rng.randrange(vocab) for _ in range(m)]
            trees[sid] = (draft, sibs)
            items.append(WorkItem(sid, pending[sid] + draft + sibs, n_logits=k + 1 + m, siblings=m))
        check_batch(items)
        results, _ = backend.forward(items)
        for it, res in zip(items, results, strict=True):
            draft, sibs = trees[it.seq_id]
            base = seqs[it.seq_id] + pending[it.seq_id]
            chain = [_argmax_after(hf, base + draft[:i]) for i in range(len(draft) + 1)]
            alts = [_argmax_after(hf, base + draft[:j] + [s]) for j, s in enumerate(sibs)]
            assert res.argmax == chain + alts, it.seq_id
            checked += len(sibs)
            # accept a random prefix, maybe a sibling after it: the server's truncation and next pending context
            a = rng.randint(0, len(draft))
            took = a < len(sibs) and rng.random() < 0.5
            committed = draft[:a] + ([sibs[a]] if took else [])
            backend.truncate(it.seq_id, len(base) + a)
            seqs[it.seq_id] = base + draft[:a]
            pending[it.seq_id] = committed[a:] + [rng.randrange(vocab)]
            assert backend.cached_len(it.seq_id) == len(seqs[it.seq_id])
    # a last plain pass reads every cache the trees wrote into
    items = [WorkItem(sid, pending[sid], n_logits=len(pending[sid])) for sid in seqs]
    results, _ = backend.forward(items)
    for it, res in zip(items, results, strict=True):
        full = seqs[it.seq_id] + pending[it.seq_id]
        n = len(pending[it.seq_id])
        assert res.argmax == [_argmax_after(hf, full[: len(full) - n + i + 1]) for i in range(n)]
    return checked


def test_paged_backend_tree_pass_equals_its_chains(tiny_target):
    from wisp_cloud.backends.paged import PagedBackend

    backend = PagedBackend(tiny_target, "cpu", kv_budget_tokens=2048, page_size=8)
    assert _tree_rounds(backend, _hf(tiny_target), backend.vocab_size, seed=1) > 3


def test_native_backend_tree_pass_equals_its_chains(tiny_target):
    from wisp_cloud.backends.native import NativeBackend

    backend = NativeBackend(tiny_target)
    assert _tree_rounds(backend, _hf(tiny_target), backend.vocab_size, seed=2) > 3


def test_fake_backend_answers_siblings_at_their_draft_positions():
    be = FakeBackend(vocab_size=100)
    be.forward([WorkItem("s", [3, 4, 5], n_logits=1)])
    # pending 9 at position 3, draft [1, 2] at 4-5, sibling 7 at position 4
    (res,), _ = be.forward([WorkItem("s", [9, 1, 2, 7], n_logits=4, siblings=1)])
    assert res.argmax == [
        next_token(9, 3, 100),
        next_token(1, 4, 100),
        next_token(2, 5, 100),
        next_token(7, 4, 100),
    ]


def test_bad_tree_items_are_refused():
    for item in [
        WorkItem("s", [1, 2, 3], n_logits=3, siblings=2),  # two siblings for one draft token
        WorkItem("s", [1, 2], n_logits=1, siblings=1),  # no draft at all
    ]:
        with pytest.raises(ValueError, match="siblings"):
            check_batch([item])


# ---- the wire ----


def test_round_and_verdict_frames_carry_trees():
    from wisp_sdk.errors import ProtocolError
    from wisp_sdk.protocol import (
        PROTOCOL_VERSION,
        Round,
        Verdict,
        decode_round,
        decode_verdict,
        encode_round,
        encode_verdict,
        new_session_id,
    )

    assert PROTOCOL_VERSION == 5
    sid = new_session_id()
    plain = Round(session_id=sid, round=2, committed_len=9, draft_ids=[4, 5, 6])
    tree = plain.model_copy(update={"sibling_ids": [7, 8]})
    sampled = tree.model_copy(
        update={"q_ids": [[4, 7], [5, 8], [6]], "q_probs": [[0.5, 0.5], [0.75, 0.25], [1.0]]}
    )
    for msg in (plain, tree, sampled):
        assert decode_round(encode_round(msg)) == msg
    assert len(encode_round(tree)) == len(encode_round(plain)) + 2 + 4 * 2  # n_sib and the tokens
    frame = encode_round(tree)
    for cut in (frame[:-1], frame[:-8]):  # truncated in the siblings
        with pytest.raises(ProtocolError, match="sibling"):
            decode_round(cut)
    v = Verdict(session_id=sid, round=2, committed_len=12, accepted=1, next_token=3, sibling=True)
    assert decode_verdict(encode_verdict(v)) == v
    assert not decode_verdict(encode_verdict(v.model_copy(update={"sibling": False}))).sibling


# ---- the server: bad trees are one typed error, and the session goes on ----


def test_bad_siblings_are_refused_and_the_session_goes_on():
    import asyncio

    from wisp_cloud.backends.fake import FAKE_FINGERPRINT
    from wisp_cloud.config import ServerConfig
    from wisp_cloud.server import WispServer
    from wisp_sdk.protocol import Hello, Open, Round, Verdict
    from ws_client import Client

    async def main():
        server = WispServer(FakeBackend(1000), ServerConfig(port=0, max_siblings=2))
        await server.start()
        try:
            c = await Client.connect(server.url)
            welcome = await c.request(Hello(tokenizer_fingerprint=FAKE_FINGERPRINT))
            opened = await c.request(Open(prompt_ids=[1, 2]))
            sid, ctx = opened.session_id, [1, 2, opened.next_token]
            truth = [next_token(ctx[-1], len(ctx) - 1, 1000)]
            truth.append(next_token(truth[0], len(ctx), 1000))
            wrong = (truth[0] + 1) % 1000

            def rnd(n: int, draft: list[int], sibs: list[int]) -> Round:
                return Round(
                    session_id=sid, round=n, committed_len=len(ctx), draft_ids=draft, sibling_ids=sibs
                )

            errors = [
                await c.request(rnd(1, [wrong, 5], [1, 2, 3])),  # more siblings than draft tokens
                await c.request(rnd(1, [wrong, 5, 6], [1, 2, 3])),  # more than max_siblings
                await c.request(rnd(1, [wrong], [1000])),  # outside the vocabulary
            ]
            # the same round, now valid: the wrong draft token's sibling is the target's token
            verdict = await c.request(rnd(1, [wrong, 5], [truth[0]]))
            await c.aclose()
            return welcome, errors, verdict, truth
        finally:
            await server.stop()

    welcome, errors, verdict, truth = asyncio.run(main())
    assert welcome.limits.max_siblings == 2
    assert [e.code.value for e in errors] == ["bad_request"] * 3, errors
    assert (
        "siblings" in errors[0].message
        and "limit 2" in errors[1].message
        and "sibling_ids" in errors[2].message
    )
    assert isinstance(verdict, Verdict) and verdict.sibling and verdict.accepted == 0
    assert verdict.next_token == truth[1] and verdict.committed_len == 3 + 2


def test_a_sampling_sibling_outside_q_is_refused():
    import asyncio

    from wisp_cloud.backends.fake import FAKE_FINGERPRINT
    from wisp_cloud.config import ServerConfig
    from wisp_cloud.server import WispServer
    from wisp_sdk.protocol import Hello, Open, Round, SamplingParams
    from ws_client import Client

    async def main():
        server = WispServer(FakeBackend(1000), ServerConfig(port=0))
        await server.start()
        try:
            c = await Client.connect(server.url)
            await c.request(Hello(tokenizer_fingerprint=FAKE_FINGERPRINT))
            opened = await c.request(
                Open(prompt_ids=[1, 2], sampling=SamplingParams(temperature=1.0, seed=3))
            )
            msg = Round(
                session_id=opened.session_id,
                round=1,
                committed_len=3,
                draft_ids=[7],
                q_ids=[[7, 8]],
                q_probs=[[0.5, 0.5]],
                sibling_ids=[9],
            )
            err = await c.request(msg)
            ok = await c.request(msg.model_copy(update={"sibling_ids": [8]}))
            await c.aclose()
            return err, ok
        finally:
            await server.stop()

    err, ok = asyncio.run(main())
    assert err.code.value == "bad_request" and "support" in err.message
    assert ok.round == 1  # a Verdict (an Error has no round number here)
