"""Native backend: a ragged batch in one padded forward equals each sequence run on its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import ws_client  # noqa: F401  (one torch thread: see there)
from wisp_cloud.backends.base import Backend, WorkItem
from wisp_cloud.backends.native import NativeBackend
from wisp_sdk.protocol import SamplingParams

SAMPLING = SamplingParams(temperature=0.9, top_k=50, top_p=0.95)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def backend(request, tiny_target, tiny_llama) -> NativeBackend:
    return NativeBackend(tiny_target if request.param == "qwen2" else tiny_llama)


def full_logits(backend: NativeBackend, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return backend.model(torch.tensor([tokens])).logits[0].float()


def test_is_a_backend(backend):
    assert isinstance(backend, Backend)
    assert backend.eos_token_ids and backend.vocab_size == 384


def test_ragged_batch_equals_per_sequence(backend):
    rng = np.random.default_rng(0)
    seqs = {f"r{i}": rng.integers(3, 380, size=int(rng.integers(5, 60))).tolist() for i in range(9)}
    # Step 1: ragged prefill of different-length prefixes (one sequence gets a long chunk: grouping kicks in).
    cut = {sid: max(1, len(t) - int(rng.integers(1, 8))) for sid, t in seqs.items()}
    items = [WorkItem(sid, t[: cut[sid]], n_logits=1) for sid, t in seqs.items()]
    results, stats = backend.forward(items)
    assert stats.batch_size == 9 and stats.new_tokens == sum(cut.values()) and stats.context_tokens == 0
    # Step 2: verify-like items over different cached lengths, several logits each, greedy and sampling mixed.
    items = [
        WorkItem(
            sid, t[cut[sid] :], n_logits=len(t) - cut[sid], sampling=SAMPLING if i % 2 else SamplingParams()
        )
        for i, (sid, t) in enumerate(seqs.items())
    ]
    results, stats = backend.forward(items)
    assert stats.context_tokens == sum(cut.values()) and stats.max_context == max(cut.values())
    for it, res in zip(items, results, strict=True):
        ref = full_logits(backend, seqs[it.seq_id])[cut[it.seq_id] :]
        assert res.seq_id == it.seq_id
        assert res.argmax == ref.argmax(-1).tolist()
        if not it.sampling.greedy:
            from wisp_cloud.acceptance import process_logits

            torch.testing.assert_close(res.probs, process_logits(ref, SAMPLING), atol=1e-5, rtol=1e-4)
        assert backend.cached_len(it.seq_id) == len(seqs[it.seq_id])
    for sid in seqs:
        backend.release(sid)
        assert backend.cached_len(sid) == 0


def test_truncate_then_continue_matches(backend):
    tokens = list(range(10, 50))
    backend.forward([WorkItem("t", tokens[:30] + [7, 7, 7], n_logits=4)])  # a draft tail to reject
    assert backend.cached_len("t") == 33
    backend.truncate("t", 30)
    assert backend.kv_bytes("t") == 30 * backend.bytes_per_token
    # Alone and in a batch with a fresh sequence: same answer as the full forward.
    results, _ = backend.forward(
        [WorkItem("t", tokens[30:], n_logits=10), WorkItem("u", tokens[:5], n_logits=5)]
    )
    assert results[0].argmax == full_logits(backend, tokens)[30:].argmax(-1).tolist()
    assert results[1].argmax == full_logits(backend, tokens[:5]).argmax(-1).tolist()
    backend.release("t")
    backend.release("u")


def test_chunked_prefill_equals_one_pass(backend):
    tokens = list(range(3, 120))
    for start in range(0, 100, 25):
        res, _ = backend.forward([WorkItem("c", tokens[start : start + 25], n_logits=0)])
        assert res[0].argmax == []
    res, stats = backend.forward([WorkItem("c", tokens[100:], n_logits=3, context=tokens)])
    assert res[0].argmax == full_logits(backend, tokens)[-3:].argmax(-1).tolist()
    assert stats.cache_misses == 1  # still building its context: a prefill, not a warm verify
    backend.truncate("c", len(tokens) - 1)
    _, stats = backend.forward([WorkItem("c", tokens[-1:] + [5, 6], n_logits=3, context=tokens)])
    assert stats.cache_misses == 0
    backend.release("c")


def test_bad_items_are_refused(backend):
    with pytest.raises(ValueError):
        backend.forward([WorkItem("x", [])])
    with pytest.raises(ValueError):
        backend.forward([WorkItem("x", [1, 2], n_logits=3)])
    with pytest.raises(ValueError):
        backend.forward([WorkItem("x", [1]), WorkItem("x", [2])])
