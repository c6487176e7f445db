"""Batch packing for the paged engine, pure numpy: one forward's metadata as a single int32 buffer.

`Packer.pack` writes token ids, positions, KV slots, attention tiles, per-sequence lengths, logit rows and block
tables for a ragged batch, padded to a CUDA-graph bucket when given one. Block tables are mirrored as rows of one
int32 array, kept in sync with the page table through its `changed` record, so a batch's block table is one
gather. Tested on CPU against a per-item reference (tests/test_paged_backend.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import torch

from wisp_cloud.backends.base import WorkItem
from wisp_cloud.backends.kv_pages import PageTable
from wisp_cloud.backends.paged import kernels as pk


@dataclass
class Batch:
    """One forward's packed metadata: a single int32 buffer and views into it (host and device)."""

    host: np.ndarray
    T: int  # packed rows (>= real tokens)
    B: int  # sequence slots (>= real items)
    W: int  # block-table width
    R: int  # logit rows
    n_tiles: int
    tok: int  # query tokens per attention tile
    # host-side copies for the torch path and for reading results
    # (q_start, q_len, kv_len, siblings, new-token index of the first draft token) per sequence
    seq_rows: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    seq_slots: list[list[int]] = field(default_factory=list)  # every cached slot 0..kv_len-1, torch path only

    def layout(self) -> list[tuple[str, int]]:
        return layout(self.T, self.B, self.W, self.R, self.n_tiles)

    def fields(self) -> list[tuple[str, int, int]]:
        """(name, offset, length) of each field; every offset is 16-byte aligned (see _ALIGN)."""
        out, off = [], 0
        for name, n in self.layout():
            out.append((name, off, n))
            off += aligned(n)
        return out

    @staticmethod
    def size(T: int, B: int, W: int, R: int, n_tiles: int) -> int:
        return sum(aligned(n) for _, n in layout(T, B, W, R, n_tiles))

    def host_views(self) -> dict[str, np.ndarray]:
        """Views of `host` by field (block_table as [B, W])."""
        return views(self.host, self)


# Fields start on 16-byte boundaries: Triton specialises pointer arguments on 16-byte alignment, so fields at
# arbitrary offsets would compile a new kernel variant for many new batch layouts (~0.5 s each, mid-serving).
_ALIGN = 4  # int32s


def aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def layout(T: int, B: int, W: int, R: int, n_tiles: int) -> list[tuple[str, int]]:
    return [
        ("ids", T),
        ("pos", T),
        ("slots", T),
        ("tile_seq", n_tiles),
        ("tile_t0", n_tiles),
        ("q_start", B),
        ("q_len", B),
        ("kv_len", B),
        ("sib_n", B),  # siblings: the last sib_n new tokens (base.py's KV convention)
        ("sib_at", B),  # new-token index of the first draft token: sibling j sits at sib_at + j
        ("rows", R),
        ("block_table", B * W),
    ]


def views(buf: Any, batch: Batch) -> dict[str, Any]:
    """Views of a packed buffer (torch tensor or numpy array) by field; block_table as [B, W]."""
    out = {name: buf[off : off + n] for name, off, n in batch.fields()}
    bt = out["block_table"]
    out["block_table"] = (
        bt.view(batch.B, batch.W) if isinstance(bt, torch.Tensor) else bt.reshape(batch.B, -1)
    )
    return out


def bucket(t: int) -> int:
    """Packed-token buckets: powers of two to 16, then steps of 16 to 512, of 32 to 1024, of 64 to 2048, then
    of 128: padding at most 1/8 of the real tokens from 128 on (below, the weight read dominates a step)."""
    if t <= 16:
        return max(8, pk.next_pow2(t))
    step = 16 if t <= 512 else 32 if t <= 1024 else 64 if t <= 2048 else 128
    return -(-t // step) * step


def buckets_between(lo: int, hi: int) -> list[int]:
    """Every bucket value b with bucket(lo) <= b <= bucket(hi), ascending."""
    out, b = [], bucket(max(1, lo))
    while b <= bucket(hi):
        out.append(b)
        b = bucket(b + 1)
    return out


def width_bucket(pages: int) -> int:
    """Block-table widths, in pages: 64, 256, 1024, ... (x4 steps). The width is the attention kernel's row
    stride and caps its split count, so it is part of a CUDA graph's key: coarse steps keep a fleet's contexts
    (which grow every round) on one or two graphs per batch shape."""
    w = 64
    while w < pages:
        w *= 4
    return w


class Packer:
    """Packs batches over one page table; owns the block-table mirror."""

    def __init__(
        self, pages: PageTable, page_size: int, tile_tokens: Callable[[int], int], torch_path: bool
    ) -> None:
        self.pages = pages
        self.page_size = page_size
        self.tile_tokens = tile_tokens  # query tokens per attention tile for a batch's longest item
        self.torch_path = torch_path  # also fill the per-sequence lists the torch attention reads
        # Block tables mirrored as rows of one int32 array (pages, then zeros), kept in sync with `pages`
        # through its `changed` record, so that packing a batch's block table is one gather.
        self.bt = np.zeros((64, 64), dtype=np.int32)
        self.bt_row: dict[str, int] = {}  # seq_id -> row of self.bt
        self.bt_len: list[int] = [0] * 64  # pages written into each row (zeros after them)
        self.bt_free: list[int] = list(range(63, -1, -1))
        self.ar = np.arange(4096)  # sliced for the aranges packing needs

    def release(self, seq_id: str) -> None:
        row = self.bt_row.pop(seq_id, None)
        if row is not None:
            self.bt_free.append(row)  # its stale pages are rewritten or zeroed by its next user

    def block_rows(self, seq_ids: list[str], page_lists: list[list[int]], width: int) -> np.ndarray:
        """Rows of the block-table mirror `self.bt` that hold these sequences' pages, after syncing each row
        with the page table (only from the lowest block that changed since the last sync). `self.bt` gets at
        least `width` columns."""
        bt, rows, lens = self.bt, self.bt_row, self.bt_len
        changed = self.pages.changed
        need = max(width, max(map(len, page_lists)))
        if need > bt.shape[1]:
            wider = np.zeros((bt.shape[0], pk.next_pow2(need)), dtype=np.int32)
            wider[:, : bt.shape[1]] = bt
            bt = self.bt = wider
        out = []
        for s, pages in zip(seq_ids, page_lists, strict=True):
            r = rows.get(s)
            if r is None:  # first time seen (or reused after release): rewrite the whole row
                if not self.bt_free:
                    n_rows = bt.shape[0]
                    taller = np.zeros((2 * n_rows, bt.shape[1]), dtype=np.int32)
                    taller[:n_rows] = bt
                    bt = self.bt = taller
                    lens.extend([0] * n_rows)
                    self.bt_free.extend(range(2 * n_rows - 1, n_rows - 1, -1))
                r = rows[s] = self.bt_free.pop()
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

    def pack(
        self,
        items: list[WorkItem],
        cached: list[int],
        graph_key: tuple | None,
        out: np.ndarray | None = None,
        views: dict[str, np.ndarray] | None = None,
        lists: tuple | None = None,
    ) -> Batch:
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
            tok = self.tile_tokens(max_q)
            # the block-table width is the kernel's row stride: a multiple of 16 keeps one Triton
            # specialisation of it (Triton specialises integer arguments on divisibility by 16)
            T, B, W, R = t_real, n, max(16, -(-max(map(len, page_lists)) // 16) * 16), max(1, sum(n_logits))
            n_tiles = sum(-(-q // tok) for q in q_lens)
        if out is None:
            out = np.zeros(Batch.size(T, B, W, R, n_tiles), dtype=np.int32)
            views = None
        else:
            out.fill(0)
        batch = Batch(out, T, B, W, R, n_tiles, tok)
        v = views or batch.host_views()
        ps = self.page_size
        if len(self.ar) < max(t_real, n_tiles, R):
            self.ar = np.arange(2 * max(t_real, n_tiles, R))
        ar = self.ar
        ql = np.array(q_lens)
        c = np.array(cached)
        end = np.cumsum(ql)
        start = end - ql
        rows_bt = self.block_rows(seq_ids, page_lists, W)  # may grow self._bt: look it up after
        bt = v["block_table"]
        bt[:n] = self.bt[rows_bt, :W]
        v["ids"][:t_real] = np.fromiter(chain.from_iterable(it.new_tokens for it in items), np.int64, t_real)
        seq_of = np.repeat(ar[:n], ql)
        pos = np.repeat(c - start, ql)
        pos += ar[:t_real]
        page, off = np.divmod(pos, ps)
        v["slots"][:t_real] = bt[seq_of, page] * ps + off
        sib = [(b, it.siblings) for b, it in enumerate(items) if it.siblings]
        sib_at = [0] * n
        for b, m in sib:  # a sibling is cached after the draft but takes its draft token's position
            sib_at[b] = items[b].draft_start
            pos[end[b] - m : end[b]] -= q_lens[b] - m - sib_at[b]
            v["sib_n"][b], v["sib_at"][b] = m, sib_at[b]
        v["pos"][:t_real] = pos
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
        if self.torch_path:
            for b, pages in enumerate(page_lists):
                allp = np.arange(c[b] + ql[b], dtype=np.int64)
                pg = np.asarray(pages, dtype=np.int64)
                m = items[b].siblings
                batch.seq_rows.append((int(start[b]), int(ql[b]), int(c[b] + ql[b]), m, sib_at[b]))
                batch.seq_slots.append((pg[allp // ps] * ps + allp % ps).tolist())
        return batch
