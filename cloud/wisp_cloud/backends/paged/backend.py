"""Paged backend: the fast GPU verifier. Generic over transformers decoder LMs (Qwen2, Llama and kin).

It reuses the model's own modules (embedding, projections, norms, MLP, rotary tables, lm_head) and replaces
only what batching needs: attention and the KV cache.

- **Paged KV.** One pool of pages per layer ([slots, kv_heads, head_dim] for K and V, a slot being
  page * page_size + offset), sized from a token or byte budget. Each sequence owns a block table of pages
  (`kv_pages.PageTable`); truncating a rejected draft tail returns whole pages, releasing returns all.
  Page 0 is scratch: padding tokens write there.
- **Ragged batches.** Every item's new tokens are packed into one [T, hidden] activation (no padding to the
  longest context or draft): the linear layers see T rows, and attention runs per (tile, KV head) over each
  sequence's own pages (`paged_kernels.paged_attention`). A verify of k+1 tokens is one tile; a prefill chunk
  is cut into tiles of about 128 query rows.
- **CUDA graphs.** Every batch of at most `max_graph_tokens` packed tokens runs as the replay of a graph captured
  per bucket (packed tokens rounded up, batch size to a power of two, tokens per attention tile, block-table
  width, logit rows): verifies and decodes (one tile per sequence) and prefill chunks alike. Everything that
  changes from step to step is one int32 buffer copied in before replay. At most `max_graphs` are kept; other
  shapes run the same code eagerly.
- **dtype.** bf16 on CUDA, fp32 on CPU by default.

On CPU (the tests' machine) the same packing and page bookkeeping run with plain torch in place of the Triton
kernels, and the math is HF's own (module calls, eager attention per sequence), so greedy argmax equals HF eager.
"""

from __future__ import annotations

import logging
import operator
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wisp_cloud.backends.base import BatchStats, ItemResult, WorkItem, check_batch
from wisp_cloud.backends.kv_pages import PageTable
from wisp_cloud.backends.paged import kernels as pk
from wisp_cloud.backends.paged.attention import Attention
from wisp_cloud.backends.paged.batch import Batch, Packer, bucket, buckets_between, views, width_bucket
from wisp_cloud.backends.paged.graphs import GraphCache, GraphOutputs
from wisp_cloud.backends.paged.loader import (
    from_config,
    from_pretrained,
    fuse,
    norm_eps,
    resolve_dtype,
    resolve_modules,
)

log = logging.getLogger("wisp_cloud.backends.paged")


class PagedBackend:
    """Backend over a paged KV cache with ragged batching; CUDA graphs and Triton kernels on GPU.

    `model`: an HF model folder, a transformers config (random weights, for benchmarks) or a loaded
    `PreTrainedModel`. The KV pool holds `kv_budget_tokens` tokens, or as many as fit in `kv_budget_bytes`
    (default: most of the free GPU memory on CUDA, 16384 tokens on CPU).
    """

    name = "paged"
    max_siblings = 16

    def __init__(
        self,
        model: Any,
        device: str | torch.device | None = None,
        dtype: Any = None,
        kv_budget_tokens: int | None = None,
        kv_budget_bytes: int | None = None,
        *,
        page_size: int = 16,
        cuda_graphs: bool | None = None,
        kernels: str | None = None,
        max_graph_q: int = 16,
        max_graph_batch: int = 512,
        max_graph_tokens: int = 4096,
        max_graphs: int = 2048,
        capture_after: int = 2,
        warmup: bool = True,
        prefill_tile_rows: int = 128,
        tokenizer_fingerprint: str | None = None,
    ) -> None:
        from transformers import PretrainedConfig

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = resolve_dtype(dtype, self.device)
        folder: Path | None = None
        if isinstance(model, torch.nn.Module):
            self.model = model
        elif isinstance(model, PretrainedConfig):
            self.model = from_config(model, self.dtype, self.device)
        else:
            folder = Path(model)
            self.model = from_pretrained(folder, self.dtype, self.device)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        cfg = self.model.config
        cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
        self.config = cfg

        self.tokenizer_fingerprint = tokenizer_fingerprint or ""
        if not tokenizer_fingerprint and folder is not None and (folder / "tokenizer.json").is_file():
            try:
                from wisp_sdk.bundle import tokenizer_fingerprint as fp

                self.tokenizer_fingerprint = fp(folder / "tokenizer.json")
            except ImportError:  # pragma: no cover - no pydantic on the GPU image
                pass
        parts = resolve_modules(self.model)
        self.embed, self.final_norm, self.lm_head, self.rotary = (
            parts.embed,
            parts.final_norm,
            parts.lm_head,
            parts.rotary,
        )
        self.layers = parts.layers
        self.n_layers = len(parts.layers)
        self.n_q_heads, self.n_kv_heads, self.hidden = parts.n_q_heads, parts.n_kv_heads, parts.hidden
        self.head_dim, self.scaling = parts.head_dim, parts.scaling
        self.vocab_size = int(self.lm_head.weight.shape[0])
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = getattr(cfg, "eos_token_id", None)
        self.eos_token_ids = [
            int(e) for e in ([] if eos is None else eos if isinstance(eos, list) else [eos])
        ]

        # ---- kernels and graphs ----
        if kernels is None:
            kernels = "triton" if (self.device.type == "cuda" and pk.HAVE_TRITON) else "torch"
        if kernels == "triton" and not pk.HAVE_TRITON:
            raise RuntimeError("kernels='triton' needs the triton package")
        d = self.head_dim
        if kernels == "triton" and not (
            d >= 16 and d & (d - 1) == 0 and self.n_q_heads % self.n_kv_heads == 0
        ):
            log.warning("paged backend: model shape unsupported by the Triton kernels; using torch ops")
            kernels = "torch"
        self.kernels = kernels
        self.cuda_graphs = (
            (self.device.type == "cuda" and kernels == "triton") if cuda_graphs is None else cuda_graphs
        )
        if self.cuda_graphs and (self.device.type != "cuda" or kernels != "triton"):
            raise ValueError("CUDA graphs need a CUDA device and the Triton kernels")
        if self.kernels == "triton":
            with torch.no_grad():
                for layer in self.layers:
                    fuse(layer)
        self.max_graph_q = max_graph_q
        self.max_graph_batch = max_graph_batch
        self.max_graph_tokens = max_graph_tokens
        self.prefill_tile_rows = prefill_tile_rows

        # ---- rotary tables: the model's own rotary module, evaluated once for every position ----
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 0) or 32768)
        with torch.inference_mode():
            pos = torch.arange(self.max_positions, device=self.device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = self.rotary(probe, pos)
        self.cos = cos[0].contiguous()
        self.sin = sin[0].contiguous()
        if self.cos.shape[-1] != self.head_dim:
            raise NotImplementedError("partial rotary embeddings are not supported by the paged backend")

        # ---- KV pool ----
        self.page_size = int(page_size)
        self.bytes_per_token = 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.dtype.itemsize
        if kv_budget_tokens is None:
            if kv_budget_bytes is None:
                if self.device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info(self.device)
                    kv_budget_bytes = int(max(0, free - (6 << 30)) * 0.9)
                else:
                    kv_budget_bytes = 16384 * self.bytes_per_token
            kv_budget_tokens = int(kv_budget_bytes) // self.bytes_per_token
        num_pages = int(kv_budget_tokens) // self.page_size
        if num_pages < 1:
            raise ValueError(f"a KV budget of {kv_budget_tokens} tokens holds no page of {self.page_size}")
        self.pages = PageTable(num_pages, self.page_size)
        n_slots = (num_pages + 1) * self.page_size  # + scratch page 0
        shape = (self.n_layers, 2, n_slots, self.n_kv_heads, self.head_dim)
        self.kv = torch.zeros(shape, dtype=self.dtype, device=self.device)
        n_sm = (
            torch.cuda.get_device_properties(self.device).multi_processor_count
            if self.device.type == "cuda"
            else 8
        )
        self.attn = Attention(
            self.kv,
            self.cos,
            self.sin,
            self.n_q_heads,
            self.n_kv_heads,
            self.head_dim,
            self.scaling,
            self.page_size,
            n_sm,
        )
        self.packer = Packer(
            self.pages, self.page_size, self._tile_tokens, torch_path=self.kernels != "triton"
        )
        self.graphs = GraphCache(self.device, max_graphs, capture_after)
        # logits and argmax outputs shared by every CUDA graph (a plain bias-free lm_head only)
        self.graph_out: GraphOutputs | None = None
        if self.cuda_graphs and isinstance(self.lm_head, torch.nn.Linear) and self.lm_head.bias is None:
            self.graph_out = GraphOutputs(
                torch.empty((max_graph_tokens, self.vocab_size), dtype=self.dtype, device=self.device),
                torch.empty((max_graph_tokens,), dtype=torch.int64, device=self.device),
            )
        self.graph_stats = self.graphs.stats  # replays, captures (and their seconds), eager runs
        self.last_timing: dict[str, float] = {}
        self.pad_eager = False
        if warmup and self.kernels == "triton" and self.device.type == "cuda":
            self.warmup_kernels()
        log.info(
            "backend=paged device=%s dtype=%s kernels=%s graphs=%s layers=%d heads=%d/%d head_dim=%d "
            "kv=%d pages x %d tokens (%.2f GiB)",
            self.device,
            str(self.dtype).removeprefix("torch."),
            self.kernels,
            self.cuda_graphs,
            self.n_layers,
            self.n_q_heads,
            self.n_kv_heads,
            self.head_dim,
            num_pages,
            self.page_size,
            self.kv.numel() * self.kv.element_size() / 2**30,
        )

    # ------------------------------------------------------------------ contract: KV bookkeeping

    def cached_len(self, seq_id: str) -> int:
        return self.pages.length(seq_id)

    def truncate(self, seq_id: str, length: int) -> None:
        self.pages.truncate(seq_id, length)

    def release(self, seq_id: str) -> None:
        self.pages.release(seq_id)
        self.packer.release(seq_id)

    def kv_bytes(self, seq_id: str | None = None) -> int:
        """KV memory held (whole pages), by one sequence or by all."""
        return self.pages.used_pages(seq_id) * self.page_size * self.bytes_per_token

    @property
    def kv_capacity_tokens(self) -> int:
        return self.pages.num_pages * self.page_size

    def free_tokens(self) -> int:
        return self.pages.free_pages() * self.page_size

    def reserve_uncomputed(self, seq_id: str, length: int) -> None:
        """Benchmarks only: claim `length` cached tokens for `seq_id` without computing them (the pages keep
        whatever values they hold). Lets a step-time benchmark skip prefilling thousands of contexts."""
        self.pages.reserve({seq_id: length})
        self.pages.set_length(seq_id, length)

    # ------------------------------------------------------------------ contract: forward

    @torch.inference_mode()
    def forward(self, items: list[WorkItem]) -> tuple[list[ItemResult], BatchStats]:
        start = time.perf_counter()
        if not items:
            return [], BatchStats(0, 0, 0, 0, 0, 0.0)
        seq_ids = [it.seq_id for it in items]
        q_lens = [len(it.new_tokens) for it in items]
        n_logits = [it.n_logits for it in items]
        ok = min(q_lens) > 0 and min(n_logits) >= 0 and all(map(operator.le, n_logits, q_lens))
        if not ok or len(set(seq_ids)) != len(items):
            check_batch(items)  # vectorized above on the hot path; this names the item that breaks it
        pages = self.pages
        cached = [pages.lengths.get(s, 0) for s in seq_ids]
        totals = list(map(operator.add, cached, q_lens))
        if max(totals) > self.max_positions:
            s, n = next((s, n) for s, n in zip(seq_ids, totals, strict=True) if n > self.max_positions)
            raise ValueError(f"{s}: {n} tokens exceed the model's {self.max_positions} positions")
        known = [s in pages.pages for s in seq_ids]
        pages.reserve(dict(zip(seq_ids, totals, strict=True)))  # all or nothing: KVCacheFull
        try:
            pages.lengths.update(zip(seq_ids, totals, strict=True))
            r_real = sum(n_logits)
            argmax_t, logits = self._launch(items, cached, seq_ids, q_lens, n_logits, r_real)
            stats = BatchStats.of(items, cached, 0.0)  # host work while the GPU runs
            t2 = time.perf_counter()
            argmax = argmax_t[:r_real].tolist()  # waits for the GPU
            self.last_timing["wait_s"] = time.perf_counter() - t2
        except BaseException:
            for s, c, k in zip(seq_ids, cached, known, strict=True):
                if k:
                    pages.truncate(s, c)
                else:
                    self.release(s)
            raise
        results = []
        lo = 0
        for it, nl in zip(items, n_logits, strict=True):
            hi = lo + nl
            probs = None
            sampling = it.sampling
            if nl and sampling is not None and not sampling.greedy:
                from wisp_cloud.acceptance import process_logits

                # p stays on the device: acceptance gathers the k test ratios in one read and copies back at
                # most one row (the residual's or the bonus token's), not [k+1, V] floats per item
                probs = process_logits(logits[lo:hi].float(), sampling)
            results.append(ItemResult(it.seq_id, argmax[lo:hi], probs))
            lo = hi
        stats.forward_s = time.perf_counter() - start
        return results, stats

    def _tile_tokens(self, max_q: int) -> int:
        """Query tokens per attention tile: a whole verify in one tile, prefill chunks in ~128-row tiles."""
        g = self.n_q_heads // self.n_kv_heads
        # verifies: a power of two, as in the graph keys (the tile size is a kernel constant: every new one is
        # a Triton compile, and a fleet's draft lengths take every value)
        tok = pk.next_pow2(max_q) if max_q <= self.max_graph_q else max_q
        return tok if tok * g <= self.prefill_tile_rows else max(1, self.prefill_tile_rows // g)

    def _graph_key(self, items: list[WorkItem], force: bool = False) -> tuple | None:
        """(T, B, tok, W, R, n_tiles) of the CUDA graph that can run this batch, or None (run eagerly)."""
        q_lens = [len(it.new_tokens) for it in items]
        n_logits = [it.n_logits for it in items]
        return self._key_of(q_lens, n_logits, [self.pages.pages[it.seq_id] for it in items], force)

    def _key_of(
        self, q_lens: list[int], n_logits: list[int], page_lists: list[list[int]], force: bool = False
    ) -> tuple | None:
        if not (self.cuda_graphs or force) or len(q_lens) > self.max_graph_batch:
            return None
        t = sum(q_lens)
        if t > self.max_graph_tokens:
            return None
        return self._key(t, len(q_lens), max(q_lens), sum(n_logits), max(map(len, page_lists)))

    def _key(self, t: int, n: int, max_q: int, n_logits: int, pages: int) -> tuple:
        """The bucket of a batch of `n` items, `t` tokens: few values per dimension, so that the buckets a
        fleet uses can be captured at start-up (`capture_graphs`)."""
        T = bucket(t)
        B = pk.next_pow2(n)
        W = width_bucket(pages)
        if max_q == 1:  # decodes: one query row per sequence
            return (T, B, 1, W, T, B)
        tok = self.max_graph_q
        g = self.n_q_heads // self.n_kv_heads
        if tok * g <= self.prefill_tile_rows:
            # verifies and prefill chunks alike: tiles of `tok` query tokens (a verify fills one, a chunk
            # several), room for every tile the T tokens can need, and logits for every row. So a fleet's
            # mixed steps (new sessions' prompts riding with verifies) have as few keys as its verifies.
            return (T, B, tok, W, T, -(-T // tok) + B)
        tok = self._tile_tokens(max_q)  # wide GQA groups: the tile holds fewer tokens
        R = T if max_q <= tok else min(T, max(8, pk.next_pow2(n_logits)))
        return (T, B, tok, W, R, -(-T // tok) + B)

    def _launch(
        self,
        items: list[WorkItem],
        cached: list[int],
        seq_ids: list[str],
        q_lens: list[int],
        n_logits: list[int],
        r_real: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pack and start the batch (graph replay, or the eager launches); returns (argmax, logits) on the
        device, the first `r_real` rows being the items' logit rows in order (not waited for)."""
        t0 = time.perf_counter()
        page_lists = [self.pages.pages[s] for s in seq_ids]
        lists = (seq_ids, q_lens, n_logits, page_lists)
        key = self._key_of(q_lens, n_logits, page_lists) if self.cuda_graphs else None
        gr = None
        if key is not None:
            gr, capture = self.graphs.get(key)
            if capture:
                tc = time.perf_counter()
                gr = self.graphs.capture(
                    key, self.packer.pack(items, cached, key, lists=lists), self._forward_tokens
                )
                self.graphs.graphs[key] = gr
                self.graph_stats["captures"] += 1
                self.graph_stats["capture_s"] += time.perf_counter() - tc
        if gr is not None and key is not None:
            self.graph_stats["replays"] += 1
            self.packer.pack(items, cached, key, out=gr.host_np, views=gr.views, lists=lists)
            t1 = time.perf_counter()
            gr.dev.copy_(gr.host, non_blocking=True)
            gr.graph.replay()
            argmax_t, logits = gr.argmax, gr.logits
        else:
            self.graph_stats["eager"] += 1
            # pad_eager (tests): the graph path's padded buckets, run without a graph (CPU, Triton interpreter)
            pad = self._key_of(q_lens, n_logits, page_lists, force=True) if self.pad_eager else None
            batch = self.packer.pack(items, cached, pad, lists=lists)
            t1 = time.perf_counter()
            buf = torch.from_numpy(batch.host)
            if self.device.type == "cuda":
                buf = buf.pin_memory().to(self.device, non_blocking=True)
            argmax_t, logits = self._forward_tokens(views(buf, batch), batch)
        self.last_timing = {"pack_s": t1 - t0, "launch_s": time.perf_counter() - t1}
        return argmax_t, logits[:r_real]

    # ------------------------------------------------------------------ the model

    def _forward_tokens(self, v: dict[str, torch.Tensor], batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        triton = self.kernels == "triton"
        T, hq, hk, d = batch.T, self.n_q_heads, self.n_kv_heads, self.head_dim
        nq, nk = hq * d, hk * d
        x = self.embed(v["ids"])  # [T, hidden]
        delta = None
        for li, layer in enumerate(self.layers):
            x, h = self._add_norm(x, delta, layer.in_norm, triton)
            if triton and layer.qkv_w is not None:
                qkv = F.linear(h, layer.qkv_w, layer.qkv_b)
                q, k, vv = qkv[:, :nq], qkv[:, nq : nq + nk], qkv[:, nq + nk :]
            else:
                q, k, vv = layer.q_proj(h), layer.k_proj(h), layer.v_proj(h)
                if layer.q_norm is not None:
                    q = layer.q_norm(q.view(T, hq, d)).reshape(T, -1)
                if layer.k_norm is not None:
                    k = layer.k_norm(k.view(T, hk, d)).reshape(T, -1)
            if triton:
                attn = self.attn.attend_triton(li, q, k, vv, v, batch)
            else:
                attn = self.attn.attend_torch(li, q, k, vv, v, batch)
            x, h = self._add_norm(x, layer.o_proj(attn), layer.post_norm, triton)
            mlp = layer.mlp
            if triton and layer.gate_up_w is not None:
                gu = F.linear(h, layer.gate_up_w)
                delta = mlp.down_proj(pk.silu_mul(gu, layer.gate_up_w.shape[0] // 2))
            elif layer.swiglu:
                delta = mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
            else:
                delta = mlp(h)
        rows = v["rows"]
        xr = x.index_select(0, rows)
        dr = delta.index_select(0, rows) if delta is not None else None
        _, h = self._add_norm(xr, dr, self.final_norm, triton)
        out = self.graph_out
        R = h.shape[0]
        if out is None or R > out.argmax.shape[0]:
            logits = self.lm_head(h)
            return logits.argmax(dim=-1), logits
        # every graph writes its logits into the same buffer: one graph runs at a time and its results are
        # read before the next starts, so N graphs hold one [rows, vocab] buffer, not N of them
        logits, argmax = out.logits[:R], out.argmax[:R]
        torch.mm(h, self.lm_head.weight.t(), out=logits)
        torch.argmax(logits, dim=-1, out=argmax)
        return argmax, logits

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm: torch.nn.Module, triton: bool):
        if triton:
            return x, pk.add_rmsnorm(x, delta, norm.weight, norm_eps(norm))
        if delta is not None:
            x = x + delta
        return x, norm(x)

    # ------------------------------------------------------------------ introspection for benchmarks

    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one forward reads: every parameter but the embedding table (only rows are
        gathered), plus the lm_head (counted once even when tied to the embedding)."""
        embed_ptr = self.embed.weight.data_ptr()
        total = 0
        seen = set()
        for p in self.model.parameters():
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            if p.data_ptr() == embed_ptr:
                continue
            total += p.numel() * p.element_size()
        if self.lm_head.weight.data_ptr() == embed_ptr:
            total += self.lm_head.weight.numel() * self.lm_head.weight.element_size()
        return total

    def matmul_params(self) -> int:
        """Parameters that take part in a per-token matmul (all but the embedding table; lm_head included)."""
        return self.weight_bytes_per_step() // self.dtype.itemsize

    def startup_keys(self, max_batch: int, max_q: int, max_context: int) -> list[tuple]:
        """The graph keys a fleet's steps can ask for, most likely first: narrow block tables before wide ones,
        decodes, then batches with items of up to `max_q` tokens (verifies, and prefill chunks of up to `max_q`)."""
        nb = min(max_batch, self.max_graph_batch)
        widths = [64]
        while widths[-1] < -(-max_context // self.page_size):
            widths.append(widths[-1] * 4)
        keys: dict[tuple, None] = {}
        for w in widths:
            for n in range(1, nb + 1):
                keys[self._key(n, n, 1, n, w)] = None
            b = 1
            while b // 2 + 1 <= nb:  # batches of n in (b/2, b] items, some of them over one token
                lo, hi = b // 2 + 1, min(b, nb)
                for t in buckets_between(lo + 1, min(hi * max_q, self.max_graph_tokens)):
                    keys[self._key(t, hi, min(max_q, t), t, w)] = None
                b *= 2
        return list(keys)

    def capture_graphs(self, keys: list[tuple], budget_s: float = 120.0) -> int:
        """Capture these buckets' CUDA graphs now (start-up), within `budget_s` seconds, so that steady-state
        serving replays graphs from its first step: no eager passes, no captures or Triton compiles mid-serving.
        Graphs are captured on an all-padding batch (every write lands in the scratch page). Returns the number
        captured; keys left over are captured on second sight while serving."""
        if not self.cuda_graphs:
            return 0
        t0 = time.perf_counter()
        done = 0
        with torch.inference_mode():
            for i, key in enumerate(keys):
                if key in self.graphs.graphs or len(self.graphs.graphs) >= self.graphs.max_graphs:
                    continue
                if time.perf_counter() - t0 > budget_s:
                    log.warning(
                        "graph capture: start-up budget of %.0fs spent after %d of %d buckets; the rest are "
                        "captured on second sight",
                        budget_s,
                        i,
                        len(keys),
                    )
                    break
                T, B, tok, W, R, n_tiles = key
                batch = Batch(np.zeros(Batch.size(T, B, W, R, n_tiles), np.int32), T, B, W, R, n_tiles, tok)
                batch.host_views()["tile_seq"][:] = -1  # padding tiles: attention computes nothing
                self.graphs.graphs[key] = self.graphs.capture(key, batch, self._forward_tokens, warmups=1)
                done += 1
                if done % 100 == 0:
                    log.info(
                        "graph capture: %d of %d buckets (%.0fs)", done, len(keys), time.perf_counter() - t0
                    )
        took = time.perf_counter() - t0
        self.graph_stats["captures"] += done
        self.graph_stats["capture_s"] += took
        log.info("graph capture: %d CUDA graphs captured at start-up in %.1fs", done, took)
        return done

    def graph_buckets(self) -> list[tuple]:
        return sorted(self.graphs.graphs)

    def clear_graphs(self) -> None:
        self.graphs.clear()

    def warmup_kernels(self) -> float:
        """Compile the attention kernel for every tile size and split count serving can ask for (see
        `Attention.warmup`). Returns seconds."""
        tiles = {pk.next_pow2(q) for q in range(1, self.max_graph_q + 1)} | {self._tile_tokens(10**6)}
        return self.attn.warmup(sorted(tiles))
