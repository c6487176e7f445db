"""Triton kernels for the paged backend's GPU path (none is used on CPU, where plain torch reproduces HF).

- `paged_attention`: causal attention of a packed ragged batch of queries against a paged KV cache. The work is
  cut into *tiles*: one tile is up to `tok` consecutive new tokens of one sequence times the `G` query heads that
  share one KV head, so a verify of k+1 tokens is one tile per (sequence, KV head) and each KV page is read once
  per KV head (GQA-aware). Long contexts are split over `splits` programs (flash-decoding style) and merged by a
  second kernel, so that a batch of one still spreads over the whole GPU. Every per-step quantity (sequence
  lengths, block tables, tile table) is read from device tensors, so the launches can be captured in a CUDA
  graph and replayed for any batch that fits the captured bucket.
- `rope_kv_write`: rotary embedding of q (in place) and k, and the K/V write into their cache slots, in one pass.
- `add_rmsnorm`: residual add (in place on the residual stream) fused with HF's RMSNorm.
- `silu_mul`: SwiGLU's act(gate) * up.

The rounding follows HF's bf16 modules where it is cheap to (norm: fp32 math, cast, times weight; SiLU output
rounded before the product); attention and rotary keep fp32 inside, which differs from HF's eager bf16 steps in
the last bits only.
"""

from __future__ import annotations

import math

import torch

try:  # the CPU image has no Triton; the GPU one does
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    HAVE_TRITON = False

LOG2E = 1.4426950408889634


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


if HAVE_TRITON:

    @triton.jit
    def _paged_attn_kernel(
        Q,
        K,
        V,
        Out,
        Op,
        Lp,
        tile_seq,
        tile_t0,
        q_start,
        q_len,
        kv_len,
        sib_n,
        sib_at,
        block_table,
        qk_scale,
        stride_qt,
        stride_qh,
        stride_ot,
        stride_oh,
        stride_ks,
        stride_kh,
        stride_vs,
        stride_vh,
        stride_bt,
        n_kv_heads,
        G: tl.constexpr,
        TOK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        D: tl.constexpr,
        PAGE: tl.constexpr,
        S: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        s_raw = tl.load(tile_seq + tile)
        active = s_raw >= 0
        s = tl.maximum(s_raw, 0)
        t0 = tl.load(tile_t0 + tile)
        qs = tl.load(q_start + s)
        ql = tl.where(active, tl.load(q_len + s), 0)
        ctx0 = tl.load(kv_len + s) - ql  # absolute position of the sequence's first new token

        rows = tl.arange(0, BLOCK_M)
        tok = t0 + rows // G
        head = kvh * G + rows % G
        row_ok = (rows < TOK * G) & (tok < ql)
        qpos = ctx0 + tok
        # keys below `lim` are visible (plus the query's own): causal, but a sibling sees only what the draft
        # token it stands beside sees (base.py's KV convention)
        sn = tl.where(active, tl.load(sib_n + s), 0)
        first_sib = ql - sn
        lim = tl.where(tok >= first_sib, ctx0 + tl.load(sib_at + s) + tok - first_sib, qpos + 1)
        last = tl.minimum(t0 + TOK, ql)
        kv_end = tl.where(last > t0, ctx0 + last, 0)  # keys visible to the tile's last query
        n_blocks = tl.cdiv(kv_end, BLOCK_N)
        per_split = tl.cdiv(n_blocks, S)
        b_lo = split * per_split
        b_hi = tl.minimum(b_lo + per_split, n_blocks)

        offs_d = tl.arange(0, D)
        q = tl.load(
            Q + (qs + tok)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for b in range(b_lo, b_hi):
            kpos = b * BLOCK_N + tl.arange(0, BLOCK_N)
            kmask = kpos < kv_end
            page = tl.load(block_table + s * stride_bt + kpos // PAGE, mask=kmask, other=0)
            slot = page.to(tl.int64) * PAGE + (kpos % PAGE)
            k = tl.load(
                K + slot[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :],
                mask=kmask[:, None],
                other=0.0,
            )
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = qk * qk_scale
            ok = ((kpos[None, :] < lim[:, None]) | (kpos[None, :] == qpos[:, None])) & kmask[None, :]
            qk = tl.where(ok, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(qk - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                V + slot[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :],
                mask=kmask[:, None],
                other=0.0,
            )
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        if S == 1:
            tl.store(
                Out + (qs + tok)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                out.to(Out.dtype.element_ty),
                mask=row_ok[:, None],
            )
        else:
            base = ((tile * n_kv_heads + kvh) * S + split).to(tl.int64)
            tl.store(
                Op + base * (BLOCK_M * D) + rows[:, None] * D + offs_d[None, :], out, mask=row_ok[:, None]
            )
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
            tl.store(Lp + base * BLOCK_M + rows, lse, mask=row_ok)

    @triton.jit
    def _paged_attn_combine_kernel(
        Out,
        Op,
        Lp,
        tile_seq,
        tile_t0,
        q_start,
        q_len,
        kv_len,
        stride_ot,
        stride_oh,
        n_kv_heads,
        G: tl.constexpr,
        TOK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CR: tl.constexpr,
        D: tl.constexpr,
        S: tl.constexpr,
    ):
        # One program per (tile, KV head, CR rows): merges the splits that had work (online, one pass).
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        r0 = tl.program_id(2) * CR
        s_raw = tl.load(tile_seq + tile)
        active = s_raw >= 0
        s = tl.maximum(s_raw, 0)
        t0 = tl.load(tile_t0 + tile)
        qs = tl.load(q_start + s)
        ql = tl.where(active, tl.load(q_len + s), 0)
        ctx0 = tl.load(kv_len + s) - ql
        last = tl.minimum(t0 + TOK, ql)
        kv_end = tl.where(last > t0, ctx0 + last, 0)
        n_blocks = tl.cdiv(kv_end, BLOCK_N)
        per_split = tl.cdiv(n_blocks, S)
        n_used = tl.where(per_split > 0, tl.cdiv(n_blocks, tl.maximum(per_split, 1)), 0)

        rows = r0 + tl.arange(0, CR)
        tok = t0 + rows // G
        head = kvh * G + rows % G
        row_ok = (rows < TOK * G) & (tok < ql)
        offs_d = tl.arange(0, D)
        base0 = ((tile * n_kv_heads + kvh) * S).to(tl.int64)
        m = tl.full([CR], float("-inf"), tl.float32)
        acc = tl.zeros([CR, D], tl.float32)
        wsum = tl.zeros([CR], tl.float32)
        for j in range(0, n_used):
            lse = tl.load(Lp + (base0 + j) * BLOCK_M + rows, mask=row_ok, other=float("-inf"))
            o = tl.load(
                Op + (base0 + j) * (BLOCK_M * D) + rows[:, None] * D + offs_d[None, :],
                mask=row_ok[:, None],
                other=0.0,
            )
            m_new = tl.maximum(m, lse)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            old = tl.math.exp2(m - m_safe)
            w = tl.math.exp2(lse - m_safe)
            acc = acc * old[:, None] + w[:, None] * o
            wsum = wsum * old + w
            m = m_new
        out = acc / tl.where(wsum == 0.0, 1.0, wsum)[:, None]
        tl.store(
            Out + (qs + tok)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=row_ok[:, None],
        )

    @triton.jit
    def _rope_kv_kernel(
        Qt,
        Kt,
        Vt,
        Kc,
        Vc,
        COS,
        SIN,
        pos,
        slots,
        stride_qt,
        stride_kt,
        stride_vt,
        stride_cs,
        stride_kcs,
        stride_kch,
        stride_vcs,
        stride_vch,
        n_q_heads,
        n_kv_heads,
        D: tl.constexpr,
        HALF: tl.constexpr,
        HQ: tl.constexpr,
        HK: tl.constexpr,
    ):
        t = tl.program_id(0)
        p = tl.load(pos + t)
        slot = tl.load(slots + t).to(tl.int64)
        d = tl.arange(0, HALF)
        c1 = tl.load(COS + p * stride_cs + d).to(tl.float32)[None, :]
        c2 = tl.load(COS + p * stride_cs + HALF + d).to(tl.float32)[None, :]
        s1 = tl.load(SIN + p * stride_cs + d).to(tl.float32)[None, :]
        s2 = tl.load(SIN + p * stride_cs + HALF + d).to(tl.float32)[None, :]

        hq = tl.arange(0, HQ)[:, None]
        qm = hq < n_q_heads
        qp = Qt + t * stride_qt + hq * D + d[None, :]
        x1 = tl.load(qp, mask=qm, other=0.0).to(tl.float32)
        x2 = tl.load(qp + HALF, mask=qm, other=0.0).to(tl.float32)
        tl.store(qp, (x1 * c1 - x2 * s1).to(Qt.dtype.element_ty), mask=qm)
        tl.store(qp + HALF, (x2 * c2 + x1 * s2).to(Qt.dtype.element_ty), mask=qm)

        hk = tl.arange(0, HK)[:, None]
        km = hk < n_kv_heads
        kp = Kt + t * stride_kt + hk * D + d[None, :]
        y1 = tl.load(kp, mask=km, other=0.0).to(tl.float32)
        y2 = tl.load(kp + HALF, mask=km, other=0.0).to(tl.float32)
        kc = Kc + slot * stride_kcs + hk * stride_kch + d[None, :]
        tl.store(kc, (y1 * c1 - y2 * s1).to(Kc.dtype.element_ty), mask=km)
        tl.store(kc + HALF, (y2 * c2 + y1 * s2).to(Kc.dtype.element_ty), mask=km)

        vp = Vt + t * stride_vt + hk * D + d[None, :]
        vc = Vc + slot * stride_vcs + hk * stride_vch + d[None, :]
        tl.store(vc, tl.load(vp, mask=km, other=0.0), mask=km)
        tl.store(vc + HALF, tl.load(vp + HALF, mask=km, other=0.0), mask=km)

    @triton.jit
    def _add_rmsnorm_kernel(
        X, R, W, Y, stride_x, stride_r, stride_y, N, eps, HAS_R: tl.constexpr, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0)
        if HAS_R:
            r = tl.load(R + row * stride_r + cols, mask=m, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
            tl.store(X + row * stride_x + cols, x, mask=m)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, 0) / N
        y = (xf * (1.0 / tl.sqrt(var + eps))).to(X.dtype.element_ty)
        w = tl.load(W + cols, mask=m, other=0.0)
        y = (w.to(tl.float32) * y.to(tl.float32)).to(Y.dtype.element_ty)
        tl.store(Y + row * stride_y + cols, y, mask=m)

    @triton.jit
    def _silu_mul_kernel(GU, Ot, stride_gu, stride_o, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < inter
        g = tl.load(GU + row * stride_gu + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(GU + row * stride_gu + inter + cols, mask=m, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(Ot.dtype.element_ty).to(tl.float32)
        tl.store(Ot + row * stride_o + cols, (a * u).to(Ot.dtype.element_ty), mask=m)


def attention_splits(n_tiles: int, n_kv_heads: int, n_sm: int, max_splits: int = 32) -> int:
    """Split-KV factor: enough programs to cover the GPU about twice when the batch alone does not."""
    want = math.ceil(2 * n_sm / max(1, n_tiles * n_kv_heads))
    return int(max(1, min(max_splits, want)))


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [slots, Hkv, D]
    v_cache: torch.Tensor,
    out: torch.Tensor,  # [T, Hq, D]
    tile_seq: torch.Tensor,  # [n_tiles] int32, -1 = padding tile
    tile_t0: torch.Tensor,  # [n_tiles] int32
    q_start: torch.Tensor,  # [B] int32
    q_len: torch.Tensor,  # [B] int32
    kv_len: torch.Tensor,  # [B] int32, cached + new
    sib_n: torch.Tensor,  # [B] int32, trailing sibling tokens (0: a plain causal item)
    sib_at: torch.Tensor,  # [B] int32, new-token index of the first draft token
    block_table: torch.Tensor,  # [B, W] int32
    scale: float,
    tok: int,
    page_size: int,
    splits: int,
    block_n: int = 64,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> torch.Tensor:
    n_q_heads, d = q.shape[1], q.shape[2]
    n_kv_heads = k_cache.shape[1]
    g = n_q_heads // n_kv_heads
    block_m = max(16, next_pow2(tok * g))
    n_tiles = tile_seq.shape[0]
    ieee = q.dtype == torch.float32
    if splits > 1:
        op = torch.empty((n_tiles, n_kv_heads, splits, block_m, d), dtype=torch.float32, device=q.device)
        lp = torch.empty((n_tiles, n_kv_heads, splits, block_m), dtype=torch.float32, device=q.device)
    else:
        op = lp = out  # unused
    _paged_attn_kernel[(n_tiles, n_kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        out,
        op,
        lp,
        tile_seq,
        tile_t0,
        q_start,
        q_len,
        kv_len,
        sib_n,
        sib_at,
        block_table,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        block_table.stride(0),
        n_kv_heads,
        G=g,
        TOK=tok,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        D=d,
        PAGE=page_size,
        S=splits,
        IEEE=ieee,
        num_warps=num_warps or (4 if block_m <= 64 else 8),
        num_stages=num_stages,
    )
    if splits > 1:
        cr = min(block_m, 16)
        _paged_attn_combine_kernel[(n_tiles, n_kv_heads, block_m // cr)](
            out,
            op,
            lp,
            tile_seq,
            tile_t0,
            q_start,
            q_len,
            kv_len,
            out.stride(0),
            out.stride(1),
            n_kv_heads,
            G=g,
            TOK=tok,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            CR=cr,
            D=d,
            S=splits,
            num_warps=4,
        )
    return out


def rope_kv_write(
    q: torch.Tensor,  # [T, Hq*D], rotated in place
    k: torch.Tensor,  # [T, Hkv*D]
    v: torch.Tensor,  # [T, Hkv*D]
    k_cache: torch.Tensor,  # [slots, Hkv, D]
    v_cache: torch.Tensor,
    cos: torch.Tensor,  # [max_pos, D]
    sin: torch.Tensor,
    positions: torch.Tensor,  # [T] int
    slots: torch.Tensor,  # [T] int
) -> None:
    t = q.shape[0]
    n_kv_heads, d = k_cache.shape[1], k_cache.shape[2]
    n_q_heads = q.shape[1] // d
    _rope_kv_kernel[(t,)](
        q,
        k,
        v,
        k_cache,
        v_cache,
        cos,
        sin,
        positions,
        slots,
        q.stride(0),
        k.stride(0),
        v.stride(0),
        cos.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        n_q_heads,
        n_kv_heads,
        D=d,
        HALF=d // 2,
        HQ=next_pow2(n_q_heads),
        HK=next_pow2(n_kv_heads),
        num_warps=4,
    )


def add_rmsnorm(
    x: torch.Tensor, residual_delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """x += residual_delta (in place, when given); return RMSNorm(x) * weight, HF's rounding."""
    n = x.shape[-1]
    y = torch.empty_like(x)
    r = residual_delta if residual_delta is not None else x
    _add_rmsnorm_kernel[(x.shape[0],)](
        x,
        r,
        weight,
        y,
        x.stride(0),
        r.stride(0),
        y.stride(0),
        n,
        eps,
        HAS_R=residual_delta is not None,
        BLOCK=next_pow2(n),
        num_warps=4 if n <= 2048 else 8,
    )
    return y


def silu_mul(gate_up: torch.Tensor, inter: int) -> torch.Tensor:
    """act(gate) * up from the fused [T, 2 * inter] output of a gate|up projection."""
    t = gate_up.shape[0]
    out = torch.empty((t, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(inter, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4
    )
    return out
