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
import math
import operator
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wisp_cloud.backends import paged_kernels as pk
from wisp_cloud.backends.base import BatchStats, ItemResult, WorkItem
from wisp_cloud.backends.kv_pages import KVCacheFull, PageTable

__all__ = ["BatchStats", "ItemResult", "KVCacheFull", "PagedBackend", "WorkItem"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (auto, float32, bfloat16, float16)")
    return _DTYPES[dtype]


def _from_config(config: Any, dtype: torch.dtype, device: torch.device):
    """A model with random weights, built directly on `device` (an 8B model in seconds on a GPU)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        for key in ("dtype", "torch_dtype"):  # transformers 5 says dtype; 4.57 takes both
            try:
                model = AutoModelForCausalLM.from_config(config, **{key: dtype})
                break
            except TypeError:
                continue
        else:  # pragma: no cover
            model = AutoModelForCausalLM.from_config(config)
    return model.to(device=device, dtype=dtype)


def _from_pretrained(path: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    for key in ("dtype", "torch_dtype"):
        try:
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **{key: dtype})
            break
        except TypeError:
            continue
    else:  # pragma: no cover
        model = AutoModelForCausalLM.from_pretrained(path)
    return model.to(device=device, dtype=dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class _Layer:
    in_norm: torch.nn.Module
    post_norm: torch.nn.Module
    q_proj: torch.nn.Module
    k_proj: torch.nn.Module
    v_proj: torch.nn.Module
    o_proj: torch.nn.Module
    q_norm: torch.nn.Module | None
    k_norm: torch.nn.Module | None
    mlp: torch.nn.Module
    swiglu: bool  # mlp is down(silu(gate(x)) * up(x)) with those attribute names
    # GPU path: q|k|v and gate|up as single matrices (the modules' weights become views into them)
    qkv_w: torch.Tensor | None = None
    qkv_b: torch.Tensor | None = None
    gate_up_w: torch.Tensor | None = None


def _norm_eps(norm: torch.nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(norm, name, None)
        if isinstance(v, (int, float)):
            return float(v)
    return 1e-6


@dataclass
class _Batch:
    """One forward's packed metadata: a single int32 buffer and views into it (host and device)."""

    host: np.ndarray
    T: int  # packed rows (>= real tokens)
    B: int  # sequence slots (>= real items)
    W: int  # block-table width
    R: int  # logit rows
    n_tiles: int
    tok: int  # query tokens per attention tile
    # host-side copies for the torch path and for reading results
    seq_rows: list[tuple[int, int, int]] = field(default_factory=list)  # (q_start, q_len, kv_len)
    seq_slots: list[list[int]] = field(default_factory=list)  # every cached slot 0..kv_len-1, torch path only

    def layout(self) -> list[tuple[str, int]]:
        return _layout(self.T, self.B, self.W, self.R, self.n_tiles)

    def fields(self) -> list[tuple[str, int, int]]:
        """(name, offset, length) of each field; every offset is 16-byte aligned (see _ALIGN)."""
        out, off = [], 0
        for name, n in self.layout():
            out.append((name, off, n))
            off += _aligned(n)
        return out

    @staticmethod
    def size(T: int, B: int, W: int, R: int, n_tiles: int) -> int:
        return sum(_aligned(n) for _, n in _layout(T, B, W, R, n_tiles))

    def host_views(self) -> dict[str, np.ndarray]:
        """Views of `host` by field (block_table as [B, W])."""
        return _views(self.host, self)


# Fields start on 16-byte boundaries: Triton specialises pointer arguments on 16-byte alignment, so fields at
# arbitrary offsets would compile a new kernel variant for many new batch layouts (~0.5 s each, mid-serving).
_ALIGN = 4  # int32s


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _layout(T: int, B: int, W: int, R: int, n_tiles: int) -> list[tuple[str, int]]:
    return [
        ("ids", T),
        ("pos", T),
        ("slots", T),
        ("tile_seq", n_tiles),
        ("tile_t0", n_tiles),
        ("q_start", B),
        ("q_len", B),
        ("kv_len", B),
        ("rows", R),
        ("block_table", B * W),
    ]


def _views(buf: Any, batch: _Batch) -> dict[str, Any]:
    """Views of a packed buffer (torch tensor or numpy array) by field; block_table as [B, W]."""
    out = {name: buf[off : off + n] for name, off, n in batch.fields()}
    bt = out["block_table"]
    out["block_table"] = (
        bt.view(batch.B, batch.W) if isinstance(bt, torch.Tensor) else bt.reshape(batch.B, -1)
    )
    return out


@dataclass
class _Graph:
    graph: Any
    host: torch.Tensor  # pinned int32
    host_np: np.ndarray  # a numpy view of `host`
    dev: torch.Tensor
    argmax: torch.Tensor
    logits: torch.Tensor
    views: dict[str, np.ndarray] = field(default_factory=dict)  # of host_np, by field (_pack fills them)


class PagedBackend:
    """Backend over a paged KV cache with ragged batching; CUDA graphs and Triton kernels on GPU.

    `model`: an HF model folder, a transformers config (random weights, for benchmarks) or a loaded
    `PreTrainedModel`. The KV pool holds `kv_budget_tokens` tokens, or as many as fit in `kv_budget_bytes`
    (default: most of the free GPU memory on CUDA, 16384 tokens on CPU).
    """

    name = "paged"

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
        max_graph_batch: int = 256,
        max_graph_tokens: int = 2048,
        max_graphs: int = 512,
        capture_after: int = 2,
        warmup: bool = True,
        prefill_tile_rows: int = 128,
        tokenizer_fingerprint: str | None = None,
    ) -> None:
        from transformers import PretrainedConfig

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = _resolve_dtype(dtype, self.device)
        folder: Path | None = None
        if isinstance(model, torch.nn.Module):
            self.model = model
        elif isinstance(model, PretrainedConfig):
            self.model = _from_config(model, self.dtype, self.device)
        else:
            folder = Path(model)
            self.model = _from_pretrained(folder, self.dtype, self.device)
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
        self._resolve_modules()
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
        if kernels == "triton" and not self._triton_ok():
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
                    self._fuse(layer)
        # attention launch parameters (see bench/verify_step.py --attn-sweep)
        self.attn_block_n = 64
        self.attn_warps: int | None = None
        self.attn_stages = 2
        self.attn_waves = 2.0
        self.attn_split_tokens = 128
        self.attn_long_context = 2048
        self.max_graph_q = max_graph_q
        self.max_graph_batch = max_graph_batch
        self.max_graph_tokens = max_graph_tokens
        self.max_graphs = max_graphs
        self.prefill_tile_rows = prefill_tile_rows
        self.n_sm = (
            torch.cuda.get_device_properties(self.device).multi_processor_count
            if self.device.type == "cuda"
            else 8
        )

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
        self._graphs: dict[tuple, _Graph] = {}
        self._key_seen: dict[tuple, int] = {}
        self.capture_after = capture_after
        # what the graph cache did: replays, captures (and their seconds), eager runs (no graph for the shape)
        self.graph_stats: dict[str, float] = {"replays": 0, "captures": 0, "capture_s": 0.0, "eager": 0}
        # Block tables mirrored as rows of one int32 array (pages, then zeros), kept in sync with `self.pages`
        # through its `changed` record, so that packing a batch's block table is one gather.
        self._bt = np.zeros((64, 64), dtype=np.int32)
        self._bt_row: dict[str, int] = {}  # seq_id -> row of self._bt
        self._bt_len: list[int] = [0] * 64  # pages written into each row (zeros after them)
        self._bt_free: list[int] = list(range(63, -1, -1))
        self._ar = np.arange(4096)  # sliced for the aranges packing needs
        self.last_timing: dict[str, float] = {}
        self.pad_eager = False
        self._graph_pool = None
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

    # ------------------------------------------------------------------ model plumbing

    def _resolve_modules(self) -> None:
        m = self.model
        core = getattr(m, "model", None)
        if core is None or not hasattr(core, "layers"):
            core = getattr(m, "base_model", None)
        if core is None or not hasattr(core, "layers"):
            raise NotImplementedError(
                f"{type(m).__name__}: no decoder layers found (expected model.model.layers)"
            )
        self.embed = core.embed_tokens
        self.final_norm = core.norm
        self.lm_head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else m.lm_head
        rotary = getattr(core, "rotary_emb", None)
        if rotary is None:
            rotary = getattr(core.layers[0].self_attn, "rotary_emb", None)
        if rotary is None:
            raise NotImplementedError(f"{type(m).__name__}: no rotary embedding module found")
        self.rotary = rotary
        cfg = m.config
        cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
        self.n_q_heads = int(cfg.num_attention_heads)
        self.n_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.n_q_heads)
        self.hidden = int(cfg.hidden_size)
        attn0 = core.layers[0].self_attn
        self.head_dim = int(
            getattr(attn0, "head_dim", None)
            or getattr(cfg, "head_dim", None)
            or self.hidden // self.n_q_heads
        )
        self.scaling = float(getattr(attn0, "scaling", None) or self.head_dim**-0.5)
        act = str(getattr(cfg, "hidden_act", "") or getattr(cfg, "hidden_activation", "")).lower()
        self.layers: list[_Layer] = []
        for layer in core.layers:
            attn = layer.self_attn
            if getattr(attn, "sliding_window", None):
                raise NotImplementedError("sliding-window attention is not supported by the paged backend")
            mlp = layer.mlp
            self.layers.append(
                _Layer(
                    in_norm=layer.input_layernorm,
                    post_norm=layer.post_attention_layernorm,
                    q_proj=attn.q_proj,
                    k_proj=attn.k_proj,
                    v_proj=attn.v_proj,
                    o_proj=attn.o_proj,
                    q_norm=getattr(attn, "q_norm", None),
                    k_norm=getattr(attn, "k_norm", None),
                    mlp=mlp,
                    swiglu=act in ("silu", "swish")
                    and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")),
                )
            )
        self.n_layers = len(self.layers)

    @staticmethod
    def _fuse_linears(mods: list[torch.nn.Module]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One [sum(out), in] weight (and bias) for several Linear layers; each module's weight (and bias)
        becomes a view into it, so HF's own forward still works and no memory is duplicated."""
        if not all(isinstance(getattr(m, "weight", None), torch.Tensor) for m in mods):
            return None, None
        biases = [getattr(m, "bias", None) for m in mods]
        has_bias = [b is not None for b in biases]
        if any(has_bias) and not all(has_bias):
            return None, None
        w = torch.cat([m.weight for m in mods], 0)
        b = torch.cat(biases, 0) if all(has_bias) else None
        off = 0
        for m in mods:
            n = m.weight.shape[0]
            m.weight = torch.nn.Parameter(w[off : off + n], requires_grad=False)
            if b is not None:
                m.bias = torch.nn.Parameter(b[off : off + n], requires_grad=False)
            off += n
        return w, b

    def _fuse(self, layer: _Layer) -> None:
        if layer.q_norm is None and layer.k_norm is None:
            layer.qkv_w, layer.qkv_b = self._fuse_linears([layer.q_proj, layer.k_proj, layer.v_proj])
        if layer.swiglu and getattr(layer.mlp.gate_proj, "bias", None) is None:
            layer.gate_up_w, _ = self._fuse_linears([layer.mlp.gate_proj, layer.mlp.up_proj])

    def _triton_ok(self) -> bool:
        d = self.head_dim
        return d >= 16 and d & (d - 1) == 0 and self.n_q_heads % self.n_kv_heads == 0

    # ------------------------------------------------------------------ contract: KV bookkeeping

    def cached_len(self, seq_id: str) -> int:
        return self.pages.length(seq_id)

    def truncate(self, seq_id: str, length: int) -> None:
        self.pages.truncate(seq_id, length)

    def release(self, seq_id: str) -> None:
        self.pages.release(seq_id)
        row = self._bt_row.pop(seq_id, None)
        if row is not None:
            self._bt_free.append(row)  # its stale pages are rewritten or zeroed by its next user

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
        if len(set(seq_ids)) != len(items):
            raise ValueError("a batch may hold each sequence once")
        q_lens = [len(it.new_tokens) for it in items]
        n_logits = [it.n_logits for it in items]
        if not (min(q_lens) > 0 and min(n_logits) >= 0 and all(map(operator.le, n_logits, q_lens))):
            for it, q, nl in zip(items, q_lens, n_logits, strict=True):
                if not q:
                    raise ValueError(f"work item for {it.seq_id} has no new tokens")
                if not 0 <= nl <= q:
                    raise ValueError(f"work item for {it.seq_id} asks for {it.n_logits} logits")
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

                probs = process_logits(logits[lo:hi].float(), sampling).cpu()
            results.append(ItemResult(it.seq_id, argmax[lo:hi], probs))
            lo = hi
        stats.forward_s = time.perf_counter() - start
        return results, stats

    # ------------------------------------------------------------------ batching

    def _block_rows(self, seq_ids: list[str], page_lists: list[list[int]], width: int) -> np.ndarray:
        """Rows of the block-table mirror `self._bt` that hold these sequences' pages, after syncing each row
        with the page table (only from the lowest block that changed since the last sync). `self._bt` gets at
        least `width` columns."""
        bt, rows, lens = self._bt, self._bt_row, self._bt_len
        changed = self.pages.changed
        need = max(width, max(map(len, page_lists)))
        if need > bt.shape[1]:
            wider = np.zeros((bt.shape[0], pk.next_pow2(need)), dtype=np.int32)
            wider[:, : bt.shape[1]] = bt
            bt = self._bt = wider
        out = []
        for s, pages in zip(seq_ids, page_lists, strict=True):
            r = rows.get(s)
            if r is None:  # first time seen (or reused after release): rewrite the whole row
                if not self._bt_free:
                    n_rows = bt.shape[0]
                    taller = np.zeros((2 * n_rows, bt.shape[1]), dtype=np.int32)
                    taller[:n_rows] = bt
                    bt = self._bt = taller
                    lens.extend([0] * n_rows)
                    self._bt_free.extend(range(2 * n_rows - 1, n_rows - 1, -1))
                r = rows[s] = self._bt_free.pop()
                changed.pop(s, None)
                d = 0
            else:
                d = changed.pop(s, None)
                if d is None:  # unchanged since the last sync
                    out.append(r)
                    continue
            n, m = len(pages), lens[r]
            if d == n - 1:  # one page more (the common change): a scalar store
                bt[r, d] = pages[d]
            elif d < n:
                bt[r, d:n] = pages[d:]
            if n < m:
                bt[r, n:m] = 0
            lens[r] = n
            out.append(r)
        return np.array(out, dtype=np.intp)

    def _pack(
        self,
        items: list[WorkItem],
        cached: list[int],
        graph_key: tuple | None,
        out: np.ndarray | None = None,
        views: dict[str, np.ndarray] | None = None,
        lists: tuple | None = None,
    ) -> _Batch:
        """Fill the int32 metadata for one forward; with `graph_key`, padded to that bucket (into `out`, the
        graph's pinned input buffer, and its field `views`, when given). `lists`: (seq_ids, q_lens, n_logits,
        page_lists) of the items, when the caller has them."""
        if lists is None:
            seq_ids = [it.seq_id for it in items]
            q_lens = [len(it.new_tokens) for it in items]
            n_logits = [it.n_logits for it in items]
            page_lists = [self.pages.pages[s] for s in seq_ids]
        else:
            seq_ids, q_lens, n_logits, page_lists = lists
        n = len(items)
        t_real = sum(q_lens)
        max_q = max(q_lens)
        if graph_key is not None:
            T, B, tok, W, R, n_tiles = graph_key
        else:
            tok = self._tile_tokens(max_q)
            # the block-table width is the kernel's row stride: a multiple of 16 keeps one Triton
            # specialisation of it (Triton specialises integer arguments on divisibility by 16)
            T, B, W, R = t_real, n, max(16, -(-max(map(len, page_lists)) // 16) * 16), max(1, sum(n_logits))
            n_tiles = sum(-(-q // tok) for q in q_lens)
        if out is None:
            out = np.zeros(_Batch.size(T, B, W, R, n_tiles), dtype=np.int32)
            views = None
        else:
            out.fill(0)
        batch = _Batch(out, T, B, W, R, n_tiles, tok)
        v = views or batch.host_views()
        ps = self.page_size
        if len(self._ar) < max(t_real, n_tiles, R):
            self._ar = np.arange(2 * max(t_real, n_tiles, R))
        ar = self._ar
        ql = np.array(q_lens)
        c = np.array(cached)
        end = np.cumsum(ql)
        start = end - ql
        rows_bt = self._block_rows(seq_ids, page_lists, W)  # may grow self._bt: look it up after
        bt = v["block_table"]
        bt[:n] = self._bt[rows_bt, :W]
        v["ids"][:t_real] = np.fromiter(chain.from_iterable(it.new_tokens for it in items), np.int64, t_real)
        seq_of = np.repeat(ar[:n], ql)
        pos = np.repeat(c - start, ql)
        pos += ar[:t_real]
        v["pos"][:t_real] = pos
        page, off = np.divmod(pos, ps)
        v["slots"][:t_real] = bt[seq_of, page] * ps + off
        v["q_start"][:n] = start
        v["q_len"][:n] = ql
        v["kv_len"][:n] = c + ql
        tile_seq = v["tile_seq"]
        if tok >= max_q:  # verifies and decodes: one tile per sequence
            tile_seq[:n] = ar[:n]
            tile_seq[n:] = -1
        else:
            per = -(-ql // tok)
            n_real = int(per.sum())
            tile_seq[:n_real] = np.repeat(ar[:n], per)
            tile_seq[n_real:] = -1
            v["tile_t0"][:n_real] = (ar[:n_real] - np.repeat(np.cumsum(per) - per, per)) * tok
        r = sum(n_logits)
        if n_logits == q_lens:  # every row (verifies)
            v["rows"][:r] = ar[:r]
        else:  # the last n_logits rows of each item
            nl = np.array(n_logits)
            v["rows"][:r] = np.repeat(end - np.cumsum(nl), nl) + ar[:r]
        if self.kernels != "triton":
            for b, pages in enumerate(page_lists):
                allp = np.arange(c[b] + ql[b], dtype=np.int64)
                pg = np.asarray(pages, dtype=np.int64)
                batch.seq_rows.append((int(start[b]), int(ql[b]), int(c[b] + ql[b])))
                batch.seq_slots.append((pg[allp // ps] * ps + allp % ps).tolist())
        return batch

    def _tile_tokens(self, max_q: int) -> int:
        """Query tokens per attention tile: a whole verify in one tile, prefill chunks in ~128-row tiles."""
        g = self.n_q_heads // self.n_kv_heads
        # verifies: a power of two, as in the graph keys (the tile size is a kernel constant: every new one is
        # a Triton compile, and a fleet's draft lengths take every value)
        tok = pk.next_pow2(max_q) if max_q <= self.max_graph_q else max_q
        return tok if tok * g <= self.prefill_tile_rows else max(1, self.prefill_tile_rows // g)

    @staticmethod
    def _bucket(t: int) -> int:
        """Packed-token buckets: powers of two to 16, then steps of 16 to 256, then of 64."""
        return max(8, pk.next_pow2(t)) if t <= 16 else -(-t // 16) * 16 if t <= 256 else -(-t // 64) * 64

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
        max_q = max(q_lens)
        t = sum(q_lens)
        if t > self.max_graph_tokens:
            return None
        T = self._bucket(t)
        B = pk.next_pow2(len(q_lens))
        W = max(16, pk.next_pow2(max(map(len, page_lists))))  # >= 16: see _pack
        if max_q <= self.max_graph_q:  # verify / decode: one tile per sequence, every row may want logits
            # tile rows bucketed to a power of two: a fleet's ragged draft lengths would otherwise ask for a
            # graph (and Triton specialisation) per longest draft; shorter items are masked in the tile anyway
            return (T, B, pk.next_pow2(max_q), W, T, B)
        tok = self._tile_tokens(max_q)  # prefill chunks: tiles of `tok` tokens, few logit rows
        R = self._bucket(sum(n_logits))
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
        if key is not None:
            gr = self._graphs.get(key)
            if gr is None:
                seen = self._key_seen[key] = self._key_seen.get(key, 0) + 1
            if gr is None and (len(self._graphs) >= self.max_graphs or seen < self.capture_after):
                key = None  # a shape seen once (a capture costs ~3 forwards), or enough graphs held: eager
            elif gr is None:
                tc = time.perf_counter()
                gr = self._capture(key, self._pack(items, cached, key, lists=lists))
                self._graphs[key] = gr
                self.graph_stats["captures"] += 1
                self.graph_stats["capture_s"] += time.perf_counter() - tc
        if key is not None:
            self.graph_stats["replays"] += 1
            self._pack(items, cached, key, out=gr.host_np, views=gr.views, lists=lists)
            t1 = time.perf_counter()
            gr.dev.copy_(gr.host, non_blocking=True)
            gr.graph.replay()
            argmax_t, logits = gr.argmax, gr.logits
        else:
            self.graph_stats["eager"] += 1
            # pad_eager (tests): the graph path's padded buckets, run without a graph (CPU, Triton interpreter)
            pad = self._key_of(q_lens, n_logits, page_lists, force=True) if self.pad_eager else None
            batch = self._pack(items, cached, pad, lists=lists)
            t1 = time.perf_counter()
            buf = torch.from_numpy(batch.host)
            if self.device.type == "cuda":
                buf = buf.pin_memory().to(self.device, non_blocking=True)
            argmax_t, logits = self._forward_tokens(_views(buf, batch), batch)
        self.last_timing = {"pack_s": t1 - t0, "launch_s": time.perf_counter() - t1}
        return argmax_t, logits[:r_real]

    def _capture(self, key: tuple, batch: _Batch) -> _Graph:
        """Capture the bucket's graph. The warm-up runs (Triton compiles, cuBLAS heuristics) see the real batch
        that asked for the bucket: they write the same K/V the replay will write again, so this is harmless."""
        host = torch.from_numpy(batch.host.copy()).pin_memory()
        dev = host.to(self.device)
        views = _views(dev, batch)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile the Triton kernels and warm cuBLAS outside the capture
                self._forward_tokens(views, batch)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            argmax, logits = self._forward_tokens(views, batch)
        log.debug("captured CUDA graph for bucket (T, B, tok, W, R, tiles)=%s", key)
        host_np = host.numpy()
        return _Graph(graph, host, host_np, dev, argmax, logits, _views(host_np, batch))

    # ------------------------------------------------------------------ the model

    def _forward_tokens(self, v: dict[str, torch.Tensor], batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
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
                attn = self._attention_triton(li, q, k, vv, v, batch)
            else:
                attn = self._attention_torch(li, q, k, vv, v, batch)
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
        logits = self.lm_head(h)
        return logits.argmax(dim=-1), logits

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm: torch.nn.Module, triton: bool):
        if triton:
            return x, pk.add_rmsnorm(x, delta, norm.weight, _norm_eps(norm))
        if delta is not None:
            x = x + delta
        return x, norm(x)

    def _attention_triton(self, li: int, q, k, vv, v: dict[str, torch.Tensor], batch: _Batch) -> torch.Tensor:
        kc, vc = self.kv[li, 0], self.kv[li, 1]
        if q.stride(-1) != 1 or q.stride(0) < q.shape[1]:
            q = q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        vv = vv if vv.stride(-1) == 1 else vv.contiguous()
        pk.rope_kv_write(q, k, vv, kc, vc, self.cos, self.sin, v["pos"], v["slots"])  # q rotated in place
        q3 = q.view(batch.T, self.n_q_heads, self.head_dim)
        out = torch.empty((batch.T, self.n_q_heads, self.head_dim), dtype=q.dtype, device=q.device)
        splits = self._attn_splits(batch.n_tiles, batch.W)
        pk.paged_attention(
            q3,
            kc,
            vc,
            out,
            v["tile_seq"],
            v["tile_t0"],
            v["q_start"],
            v["q_len"],
            v["kv_len"],
            v["block_table"],
            self.scaling,
            batch.tok,
            self.page_size,
            splits,
            block_n=self._attn_block_n(batch),
            num_warps=self.attn_warps,
            num_stages=self.attn_stages,
        )
        return out.view(batch.T, -1)

    def warmup_kernels(self) -> float:
        """Compile the attention kernel for every tile size and split count serving can ask for, now.

        Each (tile tokens, splits) pair is a Triton specialisation, compiled on first use in ~0.5 s while the
        whole batch (and every session in it) waits; a fleet's ragged batches hit dozens of them. Compiled
        kernels land in Triton's disk cache, so a second server on the machine starts fast. Returns seconds.
        """
        t0 = time.perf_counter()
        dev, d, hq = self.device, self.head_dim, self.n_q_heads
        i32 = {"dtype": torch.int32, "device": dev}
        toks = sorted({pk.next_pow2(q) for q in range(1, self.max_graph_q + 1)} | {self._tile_tokens(10**6)})
        kc, vc = self.kv[0, 0], self.kv[0, 1]
        try:
            for tok in toks:
                q = torch.zeros((tok, hq, d), dtype=self.dtype, device=dev)
                out = torch.empty_like(q)
                for splits in (1, 2, 4, 8, 16, 32):
                    pk.paged_attention(
                        q,
                        kc,
                        vc,
                        out,
                        torch.full((1,), -1, **i32),  # a padding tile: compiles, computes nothing
                        torch.zeros(1, **i32),
                        torch.zeros(1, **i32),
                        torch.ones(1, **i32),
                        torch.ones(1, **i32),
                        torch.zeros((1, 16), **i32),
                        self.scaling,
                        tok,
                        self.page_size,
                        splits,
                        block_n=self.attn_block_n,
                        num_warps=self.attn_warps,
                        num_stages=self.attn_stages,
                    )
            torch.cuda.synchronize(dev)
        except Exception as exc:  # an optimisation only: serve anyway, compiling on first use
            log.warning("attention kernel warm-up failed (%s); kernels compile on first use", exc)
        took = time.perf_counter() - t0
        log.info("attention kernels warmed up for tiles %s x 6 split counts in %.1fs", toks, took)
        return took

    def _attn_block_n(self, batch: _Batch) -> int:
        """Keys per inner step: 128 for long contexts when the query tile is small (faster at B=64, 2k
        context in the sweep), else `attn_block_n`."""
        g = self.n_q_heads // self.n_kv_heads
        long_ctx = batch.W * self.page_size >= self.attn_long_context
        return 128 if long_ctx and pk.next_pow2(batch.tok * g) <= 64 else self.attn_block_n

    def _attn_splits(self, n_tiles: int, width: int) -> int:
        """Split-KV factor: cover the GPU `attn_waves` times over, but no more splits than blocks of
        `attn_split_tokens` keys the block table can address (short contexts need few)."""
        cap = max(1, width * self.page_size // self.attn_split_tokens)
        want = math.ceil(self.attn_waves * self.n_sm / max(1, n_tiles * self.n_kv_heads))
        # a power of two: the split count is a kernel constant, and every new one is a Triton compile
        return 1 << (int(max(1, min(32, cap, want))).bit_length() - 1)

    def _attention_torch(self, li: int, q, k, vv, v: dict[str, torch.Tensor], batch: _Batch) -> torch.Tensor:
        """HF's eager attention, one sequence at a time over its own pages (the CPU reference path)."""
        T, hq, hk, d = batch.T, self.n_q_heads, self.n_kv_heads, self.head_dim
        pos = v["pos"].long()
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        q = q.view(T, hq, d)
        k = k.view(T, hk, d)
        q = (q * cos) + (_rotate_half(q) * sin)
        k = (k * cos) + (_rotate_half(k) * sin)
        kc, vc = self.kv[li, 0], self.kv[li, 1]
        slots = v["slots"].long()
        kc.index_copy_(0, slots, k)
        vc.index_copy_(0, slots, vv.view(T, hk, d))
        out = torch.zeros_like(q)
        g = hq // hk
        for (qs, ql, kvl), seq_slots in zip(batch.seq_rows, batch.seq_slots, strict=False):
            idx = torch.tensor(seq_slots, device=q.device)
            ks = kc.index_select(0, idx).transpose(0, 1).repeat_interleave(g, dim=0)  # [hq, L, d]
            vs = vc.index_select(0, idx).transpose(0, 1).repeat_interleave(g, dim=0)
            qq = q[qs : qs + ql].transpose(0, 1)  # [hq, ql, d]
            w = torch.matmul(qq, ks.transpose(1, 2)) * self.scaling
            qpos = torch.arange(kvl - ql, kvl, device=q.device)[:, None]
            kpos = torch.arange(kvl, device=q.device)[None, :]
            mask = torch.zeros((ql, kvl), dtype=w.dtype, device=q.device)
            mask.masked_fill_(kpos > qpos, torch.finfo(w.dtype).min)
            w = F.softmax(w + mask, dim=-1, dtype=torch.float32).to(q.dtype)
            out[qs : qs + ql] = torch.matmul(w, vs).transpose(0, 1)
        return out.reshape(T, hq * d)

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

    def graph_buckets(self) -> list[tuple]:
        return sorted(self._graphs)

    def clear_graphs(self) -> None:
        self._graphs.clear()
        self._graph_pool = None  # a pool whose graphs are all gone cannot be captured into again
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
