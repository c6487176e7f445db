"""DraftRunner on a real ONNX export of the tiny draft: KV rollback, parity with torch, drafting."""

from __future__ import annotations

import numpy as np
import pytest
from wisp_sdk.draft_runner import DraftRunner
from wisp_sdk.protocol import SamplingParams

CTX = [5, 17, 42, 99, 7, 230, 64, 12, 8, 150]


@pytest.fixture(scope="module")
def runner(tiny_bundle) -> DraftRunner:
    return DraftRunner(tiny_bundle, threads=1)


def _fresh_logits(bundle, ctx):
    r = DraftRunner(bundle, threads=1, io_binding=False)
    r.sync(ctx)
    return r.next_logits().copy()


def test_rollback_equals_fresh_prefill(runner, tiny_bundle):
    runner.reset()
    drafted = runner.draft(CTX, 6)
    assert runner.cached_len == len(CTX) + 5
    # The verifier accepted 2 drafts and corrected the third: roll back, feed only the new tokens.
    committed = CTX + [d.token for d in drafted[:2]] + [3]
    runner.sync(committed)
    assert runner.tokens == committed
    np.testing.assert_allclose(runner.next_logits(), _fresh_logits(tiny_bundle, committed), atol=1e-4)
    # A rollback to a point inside the prompt works too.
    runner.sync(CTX[:4] + [1, 2])
    np.testing.assert_allclose(runner.next_logits(), _fresh_logits(tiny_bundle, CTX[:4] + [1, 2]), atol=1e-4)


def test_sync_feeds_only_new_tokens(runner):
    runner.reset()
    runner.sync(CTX)
    fed = []
    orig = runner._run

    def spy(tokens, want_all):
        fed.append(list(tokens))
        return orig(tokens, want_all)

    runner._run = spy
    try:
        runner.sync(CTX + [1, 2])
        runner.sync(CTX + [1, 2])  # no-op: already there
        runner.sync(CTX + [1, 9])  # rollback by one, feed one
    finally:
        del runner._run
    assert fed == [[1, 2], [9]]


def test_onnx_logits_match_torch(tiny_bundle, tiny_draft):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_draft, dtype=torch.float32).eval()
    r = DraftRunner(tiny_bundle, threads=1)
    with torch.no_grad():
        ref = model(torch.tensor([CTX])).logits[0].numpy()
    r.sync(CTX[:3])
    got = [r.next_logits().copy()]
    for tok in CTX[3:]:
        r.advance(tok)
        got.append(r.next_logits().copy())
    np.testing.assert_allclose(np.stack(got), ref[2:], atol=1e-3)
    np.testing.assert_allclose(r.teacher_forced_logits(CTX), ref, atol=1e-3)


def test_greedy_draft_matches_torch_greedy(runner, tiny_draft):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_draft, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([CTX]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    runner.reset()
    drafted = runner.draft(CTX, 8)
    assert [d.token for d in drafted] == out[0, len(CTX) :].tolist()
    for d in drafted:
        assert 0.0 < d.top1 <= 1.0 and d.entropy >= 0.0 and d.prob == d.top1 and d.q is None


def test_io_binding_and_plain_run_agree(tiny_bundle):
    a = DraftRunner(tiny_bundle, threads=1, io_binding=True)
    b = DraftRunner(tiny_bundle, threads=1, io_binding=False)
    da = a.draft(CTX, 5)
    db = b.draft(CTX, 5)
    assert [d.token for d in da] == [d.token for d in db]
    np.testing.assert_allclose(a.next_logits(), b.next_logits(), atol=1e-5)


def test_sampling_draft_carries_sparse_q(runner):
    runner.reset()
    rng = np.random.default_rng(0)
    drafted = runner.draft(CTX, 4, SamplingParams(temperature=0.8, top_k=10, top_p=0.9, seed=0), rng)
    for d in drafted:
        assert d.q is not None and 1 <= len(d.q.ids) <= 10
        assert d.token in d.q.ids.tolist()
        assert d.prob == pytest.approx(float(d.q.probs[d.q.ids.tolist().index(d.token)]))
