"""Native backend: any transformers causal LM, per-session KV, real ragged batching in one forward pass.

Each sequence keeps its own KV as one growable tensor per K and V ([layers, kv_heads, capacity, head_dim]), so
truncating a rejected tail is just moving its length back. A batch is run as one dense padded forward:

    keys   [ C past slots: seq i left-padded into [C-c_i, C) | N new slots: seq i right-aligned in [C+N-n_i, C+N) ]
    query  N rows, seq i's new tokens in rows [N-n_i, N); padding rows attend only to themselves

with a 4D additive attention mask and explicit position_ids (c_i + offset), so every real token sees exactly its
own cached prefix and its own earlier new tokens, at its own positions: the result equals a per-sequence
forward. Right-aligning the new tokens puts every item's wanted logits in the last rows, so `logits_to_keep`
keeps the lm_head to max(n_logits) rows even when a prefill chunk of hundreds of tokens is in the batch.

Items whose new-token counts differ a lot (a prefill chunk next to k=4 verifies) would waste most rows on
padding, so `forward` splits a batch into a few padded groups of similar length; BatchStats covers the call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from wisp_cloud.acceptance import process_logits
from wisp_cloud.backends.base import BatchStats, ItemResult, WorkItem, check_batch
from wisp_cloud.backends.paged.loader import resolve_dtype

log = logging.getLogger(__name__)


@dataclass
class _SeqKV:
    keys: torch.Tensor  # [layers, kv_heads, capacity, head_dim]
    values: torch.Tensor
    length: int = 0


class NativeBackend:
    """Backend over a transformers AutoModelForCausalLM loaded from a local folder."""

    name = "native"
    graph_stats: dict[str, float] | None = None  # eager forwards
    max_siblings = 16

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: str = "auto") -> None:
        from transformers import AutoConfig, AutoModelForCausalLM
        from wisp_sdk.bundle import tokenizer_fingerprint

        path = Path(model_dir)
        tok_json = path / "tokenizer.json"
        if not tok_json.is_file():
            raise FileNotFoundError(
                f"{path} has no tokenizer.json: the server needs it to check draft tokenizers"
            )
        self.tokenizer_fingerprint = tokenizer_fingerprint(tok_json)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, device)
        config = AutoConfig.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=self.dtype, attn_implementation="sdpa", config=config
        ).to(self.device)
        self.model.eval()
        text = config.get_text_config(decoder=True)
        self.num_layers = int(text.num_hidden_layers)
        self.num_kv_heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        self.head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.max_positions = int(getattr(text, "max_position_embeddings", 0) or 0) or None
        window = getattr(text, "sliding_window", None)
        if window and any("sliding" in t for t in getattr(text, "layer_types", None) or []):
            # Our 4D mask is plain causal; within the window that is what a sliding layer computes too.
            log.warning(
                "sliding-window layers: limiting context to the window (%d tokens) to stay exact", window
            )
            self.max_positions = min(self.max_positions or window, int(window))
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = config.eos_token_id
        self.eos_token_ids = [
            int(e) for e in ([] if eos is None else eos if isinstance(eos, list) else [eos])
        ]
        self._seqs: dict[str, _SeqKV] = {}
        self.bytes_per_token = 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize
        # Groups may pad up to this factor of real rows (plus a small constant) before a batch is split.
        self.max_pad_factor = 1.5
        log.info(
            "backend=native model=%s device=%s dtype=%s layers=%d kv_heads=%d head_dim=%d vocab=%d",
            path,
            self.device,
            str(self.dtype).removeprefix("torch."),
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.vocab_size,
        )

    # ---- KV bookkeeping ----

    def cached_len(self, seq_id: str) -> int:
        seq = self._seqs.get(seq_id)
        return seq.length if seq else 0

    def truncate(self, seq_id: str, length: int) -> None:
        seq = self._seqs.get(seq_id)
        if seq is not None:
            seq.length = max(0, min(seq.length, length))

    def release(self, seq_id: str) -> None:
        self._seqs.pop(seq_id, None)

    def kv_bytes(self, seq_id: str | None = None) -> int:
        """Bytes of KV holding live tokens (capacity slack is not counted: it is reused on growth)."""
        if seq_id is not None:
            return self.cached_len(seq_id) * self.bytes_per_token
        return sum(s.length for s in self._seqs.values()) * self.bytes_per_token

    def _ensure(self, seq_id: str, needed: int) -> _SeqKV:
        seq = self._seqs.get(seq_id)
        if seq is not None and seq.keys.shape[2] >= needed:
            return seq
        cap = max(64, needed, 2 * (seq.keys.shape[2] if seq else 0))
        shape = (self.num_layers, self.num_kv_heads, cap, self.head_dim)
        keys = torch.empty(shape, dtype=self.dtype, device=self.device)
        values = torch.empty(shape, dtype=self.dtype, device=self.device)
        if seq is not None and seq.length:
            keys[:, :, : seq.length] = seq.keys[:, :, : seq.length]
            values[:, :, : seq.length] = seq.values[:, :, : seq.length]
        new = _SeqKV(keys, values, seq.length if seq else 0)
        self._seqs[seq_id] = new
        return new

    # ---- the forward pass ----

    def _groups(self, items: list[WorkItem]) -> list[list[int]]:
        """Split item indices into padded groups: ascending by new-token count, cut when padding would dominate."""
        order = sorted(range(len(items)), key=lambda i: len(items[i].new_tokens))
        groups: list[list[int]] = []
        current: list[int] = []
        real = 0
        for i in order:
            n = len(items[i].new_tokens)
            if current and (len(current) + 1) * n > self.max_pad_factor * (real + n) + 32:
                groups.append(current)
                current, real = [], 0
            current.append(i)
            real += n
        if current:
            groups.append(current)
        return groups

    @torch.inference_mode()
    def forward(self, items: list[WorkItem]) -> tuple[list[ItemResult], BatchStats]:
        start = time.perf_counter()
        check_batch(items)
        cached = [self.cached_len(it.seq_id) for it in items]
        results: list[ItemResult | None] = [None] * len(items)
        for group in self._groups(items):
            for i, res in zip(
                group, self._forward_group([items[i] for i in group], [cached[i] for i in group]), strict=True
            ):
                results[i] = res
        stats = BatchStats.of(items, cached, time.perf_counter() - start)
        return results, stats  # type: ignore[return-value]

    def _forward_group(self, items: list[WorkItem], cached: list[int]) -> list[ItemResult]:
        from transformers import DynamicCache

        dev = self.device
        bsz = len(items)
        big_c = max(cached)
        big_n = max(len(it.new_tokens) for it in items)
        keep = max(1, max(it.n_logits for it in items))
        n_new = torch.tensor([len(it.new_tokens) for it in items], device=dev)
        c_len = torch.tensor(cached, device=dev)

        # Built on the host and moved once: one transfer, not one per item.
        input_ids = torch.zeros((bsz, big_n), dtype=torch.long)
        for b, it in enumerate(items):
            input_ids[b, big_n - len(it.new_tokens) :] = torch.tensor(it.new_tokens, dtype=torch.long)
        input_ids = input_ids.to(dev)
        rows = torch.arange(big_n, device=dev)
        first_real = (big_n - n_new)[:, None]  # [B, 1]: first real query row of each item
        real_row = rows[None, :] >= first_real  # [B, N]
        position_ids = torch.where(real_row, c_len[:, None] + rows[None, :] - first_real, 0)

        keys_idx = torch.arange(big_c + big_n, device=dev)
        past_ok = (keys_idx[None, :] >= (big_c - c_len)[:, None]) & (keys_idx[None, :] < big_c)  # [B, K]
        new_col = keys_idx - big_c  # column offset within the new block (negative for past)
        causal_new = (new_col[None, None, :] >= first_real[:, :, None]) & (
            new_col[None, None, :] <= rows[None, :, None]
        )  # [B, N, K]
        allowed = torch.where(
            real_row[:, :, None],
            past_ok[:, None, :] | causal_new,
            new_col[None, None, :] == rows[None, :, None],  # padding rows: only themselves
        )
        for b, it in enumerate(items):
            if it.siblings:  # sibling j: draft token j's position and view, plus itself (base.py)
                m = it.siblings
                first = big_n - m  # rows of the siblings (right-aligned)
                at = big_n - len(it.new_tokens) + it.draft_start  # row of draft token 0
                position_ids[b, first:] -= first - at
                for j in range(m):
                    allowed[b, first + j, big_c + at + j :] = False
                    allowed[b, first + j, big_c + first + j] = True
        mask = torch.zeros((bsz, 1, big_n, big_c + big_n), dtype=self.dtype, device=dev)
        mask.masked_fill_(~allowed[:, None], torch.finfo(self.dtype).min)

        cache = DynamicCache()
        if big_c > 0:
            shape = (self.num_layers, bsz, self.num_kv_heads, big_c, self.head_dim)
            past_k = torch.zeros(shape, dtype=self.dtype, device=dev)
            past_v = torch.zeros(shape, dtype=self.dtype, device=dev)
            for b, (it, c) in enumerate(zip(items, cached, strict=True)):
                if c:
                    seq = self._seqs[it.seq_id]
                    past_k[:, b, :, big_c - c :] = seq.keys[:, :, :c]
                    past_v[:, b, :, big_c - c :] = seq.values[:, :, :c]
            for layer in range(self.num_layers):
                cache.update(past_k[layer], past_v[layer], layer)

        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        layers = out.past_key_values.layers
        # Only the new block, all layers at once ([layers, B, H, N, D]): the store-back is then one copy per
        # item instead of one per item and layer (kernel launches dominate on a GPU otherwise).
        new_k = torch.stack([layers[layer].keys[:, :, big_c:] for layer in range(self.num_layers)])
        new_v = torch.stack([layers[layer].values[:, :, big_c:] for layer in range(self.num_layers)])
        logits = out.logits.float()  # [B, keep, V]
        argmax = logits.argmax(dim=-1).tolist()  # one device sync for the whole group
        results = []
        for b, (it, c) in enumerate(zip(items, cached, strict=True)):
            n = len(it.new_tokens)
            seq = self._ensure(it.seq_id, c + n)
            seq.keys[:, :, c : c + n] = new_k[:, b, :, big_n - n :]
            seq.values[:, :, c : c + n] = new_v[:, b, :, big_n - n :]
            seq.length = c + n
            if it.n_logits == 0:
                results.append(ItemResult(it.seq_id, []))
                continue
            rows_logits = logits[b, keep - it.n_logits :]
            probs = None if it.sampling.greedy else process_logits(rows_logits, it.sampling).cpu()
            results.append(ItemResult(it.seq_id, argmax[b][keep - it.n_logits :], probs))
        return results
