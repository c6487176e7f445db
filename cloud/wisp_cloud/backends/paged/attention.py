"""Attention of the paged engine over each sequence's own pages: Triton kernels on GPU, HF's eager math on CPU.

Holds the KV pool view it writes into, the rotary tables, and the kernel's launch parameters (tuned by
`bench/verify_step.py --attn-sweep`).
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F

from wisp_cloud.backends.paged import kernels as pk
from wisp_cloud.backends.paged.batch import Batch

log = logging.getLogger("wisp_cloud.backends.paged")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class Attention:
    def __init__(
        self,
        kv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        n_q_heads: int,
        n_kv_heads: int,
        head_dim: int,
        scaling: float,
        page_size: int,
        n_sm: int,
    ) -> None:
        self.kv = kv  # [layers, 2, slots, kv_heads, head_dim]
        self.cos, self.sin = cos, sin
        self.n_q_heads, self.n_kv_heads, self.head_dim = n_q_heads, n_kv_heads, head_dim
        self.scaling = scaling
        self.page_size = page_size
        self.n_sm = n_sm
        self.device, self.dtype = kv.device, kv.dtype
        # launch parameters (see bench/verify_step.py --attn-sweep)
        self.block_n = 64
        self.warps: int | None = None
        self.stages = 2
        self.waves = 2.0
        self.split_tokens = 128
        self.long_context = 2048

    def attend_triton(self, li: int, q, k, vv, v: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        kc, vc = self.kv[li, 0], self.kv[li, 1]
        if q.stride(-1) != 1 or q.stride(0) < q.shape[1]:
            q = q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        vv = vv if vv.stride(-1) == 1 else vv.contiguous()
        pk.rope_kv_write(q, k, vv, kc, vc, self.cos, self.sin, v["pos"], v["slots"])  # q rotated in place
        q3 = q.view(batch.T, self.n_q_heads, self.head_dim)
        out = torch.empty((batch.T, self.n_q_heads, self.head_dim), dtype=q.dtype, device=q.device)
        splits = self.splits(batch.n_tiles, batch.W)
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
            v["sib_n"],
            v["sib_at"],
            v["block_table"],
            self.scaling,
            batch.tok,
            self.page_size,
            splits,
            block_n=self.block_n_for(batch),
            num_warps=self.warps,
            num_stages=self.stages,
        )
        return out.view(batch.T, -1)

    def warmup(self, tiles: list[int]) -> float:
        """Compile the attention kernel for every tile size and split count serving can ask for, now.

        Each (tile tokens, splits) pair is a Triton specialisation, compiled on first use in ~0.5 s while the
        whole batch (and every session in it) waits; a fleet's ragged batches hit dozens of them. Compiled
        kernels land in Triton's disk cache, so a second server on the machine starts fast. Returns seconds.
        """
        t0 = time.perf_counter()
        dev, d, hq = self.device, self.head_dim, self.n_q_heads
        i32 = {"dtype": torch.int32, "device": dev}
        toks = sorted(set(tiles))
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
                        torch.zeros(1, **i32),
                        torch.zeros(1, **i32),
                        torch.zeros((1, 16), **i32),
                        self.scaling,
                        tok,
                        self.page_size,
                        splits,
                        block_n=self.block_n,
                        num_warps=self.warps,
                        num_stages=self.stages,
                    )
            torch.cuda.synchronize(dev)
        except Exception as exc:  # an optimisation only: serve anyway, compiling on first use
            log.warning("attention kernel warm-up failed (%s); kernels compile on first use", exc)
        took = time.perf_counter() - t0
        log.info("attention kernels warmed up for tiles %s x 6 split counts in %.1fs", toks, took)
        return took

    def block_n_for(self, batch: Batch) -> int:
        """Keys per inner step: 128 for long contexts when the query tile is small (faster at B=64, 2k
        context in the sweep), else `attn_block_n`."""
        g = self.n_q_heads // self.n_kv_heads
        long_ctx = batch.W * self.page_size >= self.long_context
        return 128 if long_ctx and pk.next_pow2(batch.tok * g) <= 64 else self.block_n

    def splits(self, n_tiles: int, width: int) -> int:
        """Split-KV factor: cover the GPU `attn_waves` times over, but no more splits than blocks of
        `attn_split_tokens` keys the block table can address (short contexts need few)."""
        cap = max(1, width * self.page_size // self.split_tokens)
        want = math.ceil(self.waves * self.n_sm / max(1, n_tiles * self.n_kv_heads))
        # a power of two: the split count is a kernel constant, and every new one is a Triton compile
        return 1 << (int(max(1, min(32, cap, want))).bit_length() - 1)

    def attend_torch(self, li: int, q, k, vv, v: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
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
        for (qs, ql, kvl, m, at), seq_slots in zip(batch.seq_rows, batch.seq_slots, strict=False):
            idx = torch.tensor(seq_slots, device=q.device)
            ks = kc.index_select(0, idx).transpose(0, 1).repeat_interleave(g, dim=0)  # [hq, L, d]
            vs = vc.index_select(0, idx).transpose(0, 1).repeat_interleave(g, dim=0)
            qq = q[qs : qs + ql].transpose(0, 1)  # [hq, ql, d]
            w = torch.matmul(qq, ks.transpose(1, 2)) * self.scaling
            qpos = torch.arange(kvl - ql, kvl, device=q.device)[:, None]
            kpos = torch.arange(kvl, device=q.device)[None, :]
            mask = torch.zeros((ql, kvl), dtype=w.dtype, device=q.device)
            hidden = kpos > qpos
            if m:  # sibling j sees what draft token j sees, and itself
                c0 = kvl - ql
                hidden[ql - m :] = (kpos >= c0 + at + torch.arange(m, device=q.device)[:, None]) & (
                    kpos != qpos[ql - m :]
                )
            mask.masked_fill_(hidden, torch.finfo(w.dtype).min)
            w = F.softmax(w + mask, dim=-1, dtype=torch.float32).to(q.dtype)
            out[qs : qs + ql] = torch.matmul(w, vs).transpose(0, 1)
        return out.reshape(T, hq * d)
