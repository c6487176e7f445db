"""The paged backend (the GPU verifier's engine) on CPU: exact against HF eager, paging, rollback, budget.

The GPU path (Triton kernels, CUDA graphs) is checked on a GPU by bench/verify_step.py; here, when the triton
package is installed, its kernels also run in Triton's CPU interpreter against the torch path.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from wisp_cloud.backends.base import Backend, WorkItem  # noqa: E402
from wisp_cloud.backends.kv_pages import KVCacheFull, PageTable  # noqa: E402
from wisp_cloud.backends.paged import PagedBackend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _hf(path):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    except TypeError:  # pragma: no cover - older transformers
        model = AutoModelForCausalLM.from_pretrained(
            path, torch_dtype=torch.float32, attn_implementation="eager"
        )
    return model.eval()


@torch.no_grad()
def _hf_logits(model, tokens: list[int]) -> torch.Tensor:
    return model(torch.tensor([tokens])).logits[0]


def _check_against_hf(backend, hf, rng: random.Random, vocab: int, n_seqs: int = 5, rounds: int = 4) -> int:
    """Random ragged batches (prefill chunks next to verifies), random rollbacks; argmax must equal HF's."""
    seqs = {f"s{i}": [] for i in range(n_seqs)}
    checked = 0
    for _ in range(rounds):
        items = []
        for sid in seqs:
            if rng.random() < 0.2:
                continue  # not every sequence in every batch
            n_new = rng.choice([1, 2, 4, 6, rng.randint(7, 40)])
            new = [rng.randrange(vocab) for _ in range(n_new)]
            items.append(WorkItem(sid, new, n_logits=rng.randint(1, n_new)))
        if not items:
            continue
        results, stats = backend.forward(items)
        assert stats.batch_size == len(items)
        assert stats.new_tokens == sum(len(it.new_tokens) for it in items)
        for it, res in zip(items, results, strict=True):
            full = seqs[it.seq_id] + it.new_tokens
            ref = _hf_logits(hf, full).argmax(-1)[len(full) - it.n_logits :].tolist()
            assert res.seq_id == it.seq_id
            assert res.argmax == ref, (it.seq_id, len(full))
            assert res.probs is None
            checked += it.n_logits
            seqs[it.seq_id] = full
            assert backend.cached_len(it.seq_id) == len(full)
            # reject a random draft tail, as the server does after verification
            keep = len(full) - rng.randint(0, min(len(it.new_tokens) - 1, 5))
            backend.truncate(it.seq_id, keep)
            seqs[it.seq_id] = full[:keep]
            assert backend.cached_len(it.seq_id) == keep
    return checked


@pytest.mark.parametrize("fixture", ["tiny_target", "tiny_llama"])
def test_ragged_batches_match_hf_eager(fixture, request):
    path = request.getfixturevalue(fixture)
    backend = PagedBackend(path, "cpu", kv_budget_tokens=2048, page_size=8)
    assert isinstance(backend, Backend)
    assert backend.kernels == "torch" and not backend.cuda_graphs
    hf = _hf(path)
    checked = _check_against_hf(backend, hf, random.Random(hash(fixture) % 1000), backend.vocab_size)
    assert checked > 10


def test_release_frees_pages_and_kv_bytes(tiny_target):
    backend = PagedBackend(tiny_target, "cpu", kv_budget_tokens=256, page_size=16)
    assert backend.kv_bytes() == 0
    backend.forward([WorkItem("a", list(range(20)), n_logits=1), WorkItem("b", list(range(3)), n_logits=1)])
    assert backend.kv_bytes("a") == 2 * 16 * backend.bytes_per_token  # 20 tokens -> 2 pages
    assert backend.kv_bytes("b") == 16 * backend.bytes_per_token
    assert backend.kv_bytes() == backend.kv_bytes("a") + backend.kv_bytes("b")
    backend.truncate("a", 16)
    assert backend.kv_bytes("a") == 16 * backend.bytes_per_token
    backend.release("a")
    backend.release("b")
    assert backend.kv_bytes() == 0 and backend.cached_len("a") == 0
    assert backend.free_tokens() == backend.kv_capacity_tokens == 256
    backend.release("never-seen")  # no error


def test_budget_exhaustion_is_a_clear_error_and_changes_nothing(tiny_target):
    backend = PagedBackend(tiny_target, "cpu", kv_budget_tokens=64, page_size=16)
    backend.forward([WorkItem("a", list(range(40)), n_logits=1)])  # 3 of 4 pages
    free = backend.free_tokens()
    with pytest.raises(KVCacheFull, match="KV cache full"):
        backend.forward(
            [WorkItem("a", list(range(10)), n_logits=1), WorkItem("b", list(range(20)), n_logits=1)]
        )
    assert backend.cached_len("a") == 40 and backend.cached_len("b") == 0
    assert backend.free_tokens() == free
    # after freeing, the same batch fits
    backend.truncate("a", 8)
    results, _ = backend.forward([WorkItem("a", list(range(10)), n_logits=2), WorkItem("b", list(range(20)))])
    assert [len(r.argmax) for r in results] == [2, 1]


def test_budget_from_bytes_and_bad_items(tiny_target):
    probe = PagedBackend(tiny_target, "cpu", kv_budget_tokens=16)
    backend = PagedBackend(tiny_target, "cpu", kv_budget_bytes=100 * probe.bytes_per_token, page_size=16)
    assert backend.kv_capacity_tokens == 96
    with pytest.raises(ValueError):
        backend.forward([WorkItem("a", [], n_logits=0)])
    with pytest.raises(ValueError):
        backend.forward([WorkItem("a", [1, 2], n_logits=3)])
    with pytest.raises(ValueError):
        backend.forward([WorkItem("a", [1]), WorkItem("a", [2])])
    assert backend.kv_bytes() == 0
    with pytest.raises(ValueError):
        PagedBackend(tiny_target, "cpu", kv_budget_tokens=4, page_size=16)


def test_sampling_probs_are_processed_target_probs(tiny_target):
    from wisp_cloud.acceptance import process_logits
    from wisp_sdk.protocol import SamplingParams

    backend = PagedBackend(tiny_target, "cpu", kv_budget_tokens=512)
    hf = _hf(tiny_target)
    sampling = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=1)
    prompt = [5, 17, 33, 2, 9, 41]
    (res,), _ = backend.forward([WorkItem("s", prompt, n_logits=3, sampling=sampling)])
    assert res.probs is not None and tuple(res.probs.shape) == (3, backend.vocab_size)
    ref = process_logits(_hf_logits(hf, prompt)[-3:], sampling)
    torch.testing.assert_close(torch.as_tensor(res.probs), ref, atol=1e-5, rtol=1e-4)


def test_from_config_random_weights_and_metadata(tiny_target):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_target)
    backend = PagedBackend(config, "cpu", kv_budget_tokens=128)
    assert backend.vocab_size == config.vocab_size
    assert backend.tokenizer_fingerprint == ""
    (res,), stats = backend.forward([WorkItem("x", [1, 2, 3], n_logits=2)])
    assert len(res.argmax) == 2 and stats.context_tokens == 0
    from_dir = PagedBackend(tiny_target, "cpu", kv_budget_tokens=128)
    assert from_dir.tokenizer_fingerprint.startswith("sha256:")
    assert from_dir.eos_token_ids
    # what the benchmark reads
    assert from_dir.weight_bytes_per_step() > 0 and from_dir.matmul_params() > 0


def test_cache_misses_counted(tiny_target):
    backend = PagedBackend(tiny_target, "cpu", kv_budget_tokens=256)
    _, stats = backend.forward([WorkItem("a", [1, 2, 3, 4], n_logits=1, context=[1, 2, 3, 4])])
    assert stats.cache_misses == 1  # nothing was cached: a rebuild
    _, stats = backend.forward([WorkItem("a", [5, 6], n_logits=2, context=[1, 2, 3, 4, 5])])
    assert stats.cache_misses == 0 and stats.context_tokens == 4


def test_page_table_bookkeeping():
    pt = PageTable(num_pages=4, page_size=4)
    pt.reserve({"a": 5, "b": 4})
    assert pt.used_pages("a") == 2 and pt.used_pages("b") == 1 and pt.free_pages() == 1
    pt.set_length("a", 5)
    assert pt.slots("a", 3, 5) == [pt.pages["a"][0] * 4 + 3, pt.pages["a"][1] * 4]
    with pytest.raises(KVCacheFull):
        pt.reserve({"a": 9, "c": 4})
    assert pt.used_pages("a") == 2 and "c" not in pt.pages  # all or nothing
    pt.truncate("a", 4)
    assert pt.used_pages("a") == 1 and pt.free_pages() == 2
    pt.release("a")
    pt.release("b")
    assert pt.free_pages() == 4 and 0 not in pt._free  # page 0 is the scratch page, never handed out


def _ref_pack(be, items, cached, graph_key):
    """The packing as first written (one Python pass per item): the reference for the vectorised `_pack`."""
    import numpy as np
    from wisp_cloud.backends.paged.batch import Batch as _Batch

    q_lens = [len(it.new_tokens) for it in items]
    t_real = sum(q_lens)
    r_real = sum(it.n_logits for it in items)
    pages_needed = max(len(be.pages.pages[it.seq_id]) for it in items)
    if graph_key is not None:
        T, B, tok, W, R, n_tiles = graph_key
    else:
        tok = be._tile_tokens(max(q_lens))
        # the engine rounds the block-table width up to a multiple of 16 (one Triton specialisation)
        T, B, W, R = t_real, len(items), max(16, -(-pages_needed // 16) * 16), max(1, r_real)
        n_tiles = sum(-(-q // tok) for q in q_lens)
    batch = _Batch(np.zeros(_Batch.size(T, B, W, R, n_tiles), dtype=np.int32), T, B, W, R, n_tiles, tok)
    v = {name: batch.host[off : off + n] for name, off, n in batch.fields()}
    n, ps = len(items), be.page_size
    ql = np.asarray(q_lens, dtype=np.int64)
    c = np.asarray(cached, dtype=np.int64)
    nl = np.asarray([it.n_logits for it in items], dtype=np.int64)
    start = np.cumsum(ql) - ql
    bt = v["block_table"].reshape(B, W)
    for b, it in enumerate(items):
        pages = be.pages.pages[it.seq_id]
        bt[b, : len(pages)] = pages
    v["ids"][:t_real] = [t for it in items for t in it.new_tokens]
    seq_of = np.repeat(np.arange(n), ql)
    pos = np.arange(t_real) - np.repeat(start, ql) + np.repeat(c, ql)
    v["pos"][:t_real] = pos
    v["slots"][:t_real] = bt[seq_of, pos // ps].astype(np.int64) * ps + pos % ps
    v["q_start"][:n] = start
    v["q_len"][:n] = ql
    v["kv_len"][:n] = c + ql
    v["tile_seq"][:] = -1
    if tok >= ql.max():
        v["tile_seq"][:n] = np.arange(n)
    else:
        per = -(-ql // tok)
        v["tile_seq"][: per.sum()] = np.repeat(np.arange(n), per)
        v["tile_t0"][: per.sum()] = (np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)) * tok
    r = int(nl.sum())
    v["rows"][:r] = np.repeat(start + ql - nl, nl) + np.arange(r) - np.repeat(np.cumsum(nl) - nl, nl)
    return batch.host


def test_pack_matches_reference_under_random_paging(tiny_target):
    """`_pack` (block tables from the mirrored rows, vectorised fields) writes exactly what the per-item
    reference writes, eager and padded to the graph bucket, into fresh and reused buffers, while sequences
    grow, roll back, are released and come back (mirror rows reused, grown in rows and columns)."""
    import numpy as np
    from wisp_cloud.backends.paged.batch import Batch as _Batch

    be = PagedBackend(tiny_target, "cpu", kv_budget_tokens=4096, page_size=4, prefill_tile_rows=8)
    be.max_positions = 10**6  # positions are not computed here
    rng = random.Random(5)
    names = [f"q{i}" for i in range(90)]  # more than the mirror's first 64 rows
    bufs: dict[tuple, tuple] = {}
    for step in range(150):
        live = [s for s in names if s in be.pages.pages]
        for s in rng.sample(live, min(len(live), rng.randint(0, 3))):
            if rng.random() < 0.4:
                be.release(s)
            else:
                be.truncate(s, rng.randint(0, be.cached_len(s)))
        batch_ids = rng.sample(names, rng.randint(1, 12))
        items, cached = [], []
        for s in batch_ids:
            q = rng.choice([1, 2, 6, 10, rng.randint(11, 40)])
            items.append(WorkItem(s, [rng.randrange(300) for _ in range(q)], n_logits=rng.randint(0, q)))
            cached.append(be.cached_len(s))
        totals = {it.seq_id: c + len(it.new_tokens) for it, c in zip(items, cached, strict=True)}
        if step % 25 == 7:  # a long sequence: the mirror grows columns
            totals[batch_ids[0]] += 300
            cached[0] += 300
        try:
            be.pages.reserve(totals)
        except KVCacheFull:
            for s in list(be.pages.pages):
                be.release(s)
            continue
        for s, n in totals.items():
            be.pages.set_length(s, n)
        for key in (None, be._graph_key(items, force=True)):
            want = _ref_pack(be, items, cached, key)
            got = be.packer.pack(items, cached, key)
            assert np.array_equal(got.host, want), (step, key)
            if key is not None:  # into a reused (dirty) buffer through cached views, as on the graph path
                if key not in bufs:
                    T, B, tok, W, R, n_tiles = key
                    buf = np.full_like(got.host, 7)
                    bufs[key] = (buf, _Batch(buf, T, B, W, R, n_tiles, tok).host_views())
                buf, views = bufs[key]
                be.packer.pack(items, cached, key, out=buf, views=views)
                assert np.array_equal(buf, want), (step, key)
    assert be.packer.bt.shape[0] > 64 and be.packer.bt.shape[1] > 64


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import random, sys
    sys.path[:0] = [{cloud!r}, {sdk!r}]
    import torch
    from wisp_cloud.backends.base import WorkItem
    from wisp_cloud.backends.paged import PagedBackend

    ref = PagedBackend({path!r}, "cpu", kv_budget_tokens=1024)
    tri = PagedBackend({path!r}, "cpu", kv_budget_tokens=1024, kernels="triton", cuda_graphs=False,
                       prefill_tile_rows=32)
    tri.n_sm = 8          # small GPU: exercises split-KV and the merge kernel
    tri.pad_eager = True  # the CUDA-graph path's padded buckets
    rng = random.Random(0)
    seqs = {{f"s{{i}}": [] for i in range(3)}}
    for step in range(3):
        items = []
        for sid in seqs:
            n = rng.choice([rng.randint(20, 50), 1, 5])
            items.append(WorkItem(sid, [rng.randrange(300) for _ in range(n)], n_logits=rng.randint(1, n)))
        a, _ = ref.forward(items)
        b, _ = tri.forward(items)
        assert [r.argmax for r in a] == [r.argmax for r in b], step
    # token trees: pending token, a draft of 4 and siblings of its first 1-3 tokens (base.py's convention)
    items = [
        WorkItem(sid, [rng.randrange(300) for _ in range(5 + m)], n_logits=5 + m, siblings=m)
        for sid, m in zip(seqs, (1, 2, 3))
    ]
    a, _ = ref.forward(items)
    b, _ = tri.forward(items)
    assert [r.argmax for r in a] == [r.argmax for r in b], "tree"
    p = ref.page_size  # page 0 is scratch: the padded path writes padding tokens there
    err = (ref.kv[:, :, p:] - tri.kv[:, :, p:]).abs().max().item()
    assert err < 1e-4, err
    print("OK")
    """
)


def test_triton_kernels_in_interpreter(tiny_target):
    """The GPU kernels (attention with split-KV merge, rotary + KV write, add+RMSNorm, SiLU) on CPU."""
    pytest.importorskip("triton")
    if os.environ.get("WISP_SKIP_TRITON_INTERPRETER"):
        pytest.skip("WISP_SKIP_TRITON_INTERPRETER set")
    script = _INTERPRETER_SCRIPT.format(
        cloud=str(ROOT / "cloud"), sdk=str(ROOT / "sdk"), path=str(tiny_target)
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0 and "only 0-dimensional arrays" in proc.stderr:
        pytest.skip("this triton's interpreter does not run with this numpy")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout


def test_startup_keys_cover_every_decode_and_verify_batch(tiny_target):
    """Every decode or verify batch within the server's limits finds its graph among the start-up buckets, so a
    fleet's steady state replays graphs from its first step (keys only: capture needs CUDA)."""
    be = PagedBackend(tiny_target, "cpu", kv_budget_tokens=4096, page_size=16)
    be.max_graph_q, be.max_graph_batch, be.max_graph_tokens = 16, 64, 1024
    max_batch, max_q, max_context = 48, 40, 3000  # items: decodes, verifies and prefill chunks up to 40
    keys = be.startup_keys(max_batch, max_q, max_context)
    assert len(keys) == len(set(keys))
    have = set(keys)
    rng = random.Random(7)
    for _ in range(3000):
        n = rng.randint(1, max_batch)
        q_cap = 1 if rng.random() < 0.3 else rng.randint(2, 9) if rng.random() < 0.6 else max_q
        q_lens = [rng.randint(1, q_cap) for _ in range(n)]
        q_lens[0] = q_cap
        if sum(q_lens) > be.max_graph_tokens:
            continue
        pages = [[0] * rng.randint(1, -(-max_context // 16)) for _ in range(n)]
        key = be._key_of(q_lens, q_lens, pages, force=True)
        assert key in have, (q_lens, key)
    # padding stays bounded: at most 1/8 of the real tokens from 128 on (the 12.5 %)
    for t in range(128, 4097):
        key = be._key(t, 1, 2, t, 1)
        assert t <= key[0] <= t * 1.125
