"""Split-KV attention for short queries in Triton: decode and chunked prefill
over a dense K/V or a paged KV cache (the ``triton-decode`` backend's kernel).

Layout of the work: one program per (batch row b, kv head, key split).  A
program holds the Sq query rows of every query head of its kv head's group
(``M = (Hq / Hkv) * Sq`` rows, row r = g * Sq + i for group member g and query
i) in one tile, so each key block is read once for the whole group; it walks
its split's keys in tiles of ``BLOCK_N`` with an online softmax and writes a
partial output (normalised) and its LSE.  The splits are combined in a fixed
order (no atomics: deterministic), with the sink as one more term of the LSE.

Keys: row b's key j < L_b (L_b = ``cache_seqlens[b]``, or Sk for a dense
call) is slot ``j % block_size`` of block ``block_table[b, j // block_size]``
(paged) or ``k[b, j]`` (dense).  Every load past L_b is masked, so no slot or
block beyond a row's length is read (NaN there changes nothing).  Query i sits
at position ``i + L_b - Sq``: causal keeps j <= that, a window (left, right)
keeps ``pos - left <= j <= pos + right`` (-1 = open), softcap c turns the
scaled score s into ``c * tanh(s / c)``.  A row with no admitted key gives out
0 and lse -inf (the sink's value with sinks).

Equivalent math (per row b, query head h = kv head * G + g, query i)::

    s_j = softcap(scale * q[b, i, h] . k_j)  for admitted keys j
    lse = log(exp(sinks[h]) + sum_j exp(s_j))            # sinks: optional
    out = sum_j exp(s_j - lse) * v_j
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

Tensor = torch.Tensor
MAX_ROWS = 64  # query rows of one kv head's group (Sq * Hq / Hkv) in one tile
# keys per tile: dense K/V and a paged cache (capped at its block size).  Measured
# with bench/triton_decode_tune.py on an H200 (2026-12-03, B=32 Sk=8k, B=8 Sk=32k,
# B=1 Sk=32k/128k): 128 with 4 warps was the fastest dense configuration in all
# four shapes; 64 for the paged cache (block size 128)
BLOCK_N = 128
PAGED_BLOCK_N = 64
_OPEN = 1 << 30  # an open window side


def block_n_for(paged: bool, block_size: int = 0, block_n: Optional[int] = None) -> int:
    """The key tile of a call: ``block_n`` (default :data:`BLOCK_N`, paged
    :data:`PAGED_BLOCK_N`), capped at a paged cache's ``block_size`` (a tile
    lies in one block)."""
    if not paged:
        return block_n or BLOCK_N
    return min(block_n or PAGED_BLOCK_N, block_size)


@functools.lru_cache(maxsize=None)
def kernel() -> Any:
    """The Triton kernel, built on first use (``triton`` imported lazily)."""
    import triton
    import triton.language as tl

    @triton.jit
    def split_kv(Q, K, V, BT, LENS, O, LSE,  # noqa: N803 (pointers)
                 sq_b, sq_s, sq_h, sq_d, sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d,
                 sbt_b, SQ, G, HEAD_DIM, PAGE, CHUNK, SK, NB, scale, softcap, left, right,
                 PAGED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                 SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)  # offsets in int64: caches may pass 2^31 elements
        hk = tl.program_id(1).to(tl.int64)
        sp = tl.program_id(2)
        if PAGED:  # SK: the table's capacity; lengths past it are not read past it
            L = tl.minimum(tl.load(LENS + b), SK)
        else:
            L = SK
        rows = tl.arange(0, BLOCK_M)
        g, i = rows // SQ, rows % SQ
        row_ok = rows < G * SQ
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(Q + b * sq_b + i[:, None] * sq_s + (hk * G + g)[:, None] * sq_h
                    + d[None, :] * sq_d, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        pos = i + L - SQ
        lo = sp * CHUNK
        hi = tl.minimum(lo + CHUNK, L)
        if WINDOW:  # skip the tiles left of every row's window (tile-aligned)
            lo = tl.maximum(lo, (tl.maximum(L - SQ - left, 0) // BLOCK_N) * BLOCK_N)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            n_ok = cols < hi
            if PAGED:  # a tile lies in one block: BLOCK_N divides PAGE, n0 aligned
                blk = tl.load(BT + b * sbt_b + n0 // PAGE).to(tl.int64)
                blk = tl.minimum(tl.maximum(blk, 0), NB - 1)  # unchecked tables stay in the cache
                slot = (n0 % PAGE) + tl.arange(0, BLOCK_N).to(tl.int64)  # one modulo a tile
                kofs, vofs = blk * sk_b + slot * sk_n, blk * sv_b + slot * sv_n
            else:
                kofs, vofs = b * sk_b + cols * sk_n, b * sv_b + cols * sv_n
            kt = tl.load(K + kofs[None, :] + hk * sk_h + d[:, None] * sk_d,
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, kt) * scale
            if SOFTCAP:  # c * tanh(s / c), tanh(x) = 1 - 2 / (exp(2x) + 1)
                s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
            keep = n_ok[None, :] & row_ok[:, None]
            if CAUSAL:
                keep = keep & (cols[None, :] <= pos[:, None])
            if WINDOW:
                keep = keep & (cols[None, :] >= pos[:, None] - left)
                keep = keep & (cols[None, :] <= pos[:, None] + right)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_use[:, None])
            alpha = tl.exp(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(V + vofs[:, None] + hk * sv_h + d[None, :] * sv_d,
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new
        ok = l_i > 0.0
        safe_l = tl.where(ok, l_i, 1.0)
        part = (b * tl.num_programs(1) + hk) * tl.num_programs(2) + sp
        tl.store(O + (part * BLOCK_M + rows)[:, None] * BLOCK_D + d[None, :],
                 acc / safe_l[:, None])
        tl.store(LSE + part * BLOCK_M + rows, tl.where(ok, m_i + tl.log(safe_l), float("-inf")))

    return split_kv


@functools.lru_cache(maxsize=None)
def combine_kernel() -> Any:
    """The splits' combination, one program per (row, kv head), in a fixed order."""
    import triton
    import triton.language as tl

    @triton.jit
    def combine(OP, LP, SINKS, OUT, LSE, S, SQ, G, HEAD_DIM,  # noqa: N803 (pointers)
                so_b, so_s, so_h, so_d, HAS_SINKS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        hk = tl.program_id(1).to(tl.int64)
        nh = tl.num_programs(1)
        rows = tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        g, i = rows // SQ, rows % SQ
        row_ok = rows < G * SQ
        h = hk * G + g
        base = (b * nh + hk) * S
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for s in range(S):
            m = tl.maximum(m, tl.load(LP + (base + s) * BLOCK_M + rows))
        if HAS_SINKS:
            sink = tl.load(SINKS + h, mask=row_ok, other=float("-inf")).to(tl.float32)
            m = tl.maximum(m, sink)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        den = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for s in range(S):
            w = tl.exp(tl.load(LP + (base + s) * BLOCK_M + rows) - m_use)
            o = tl.load(OP + ((base + s) * BLOCK_M + rows)[:, None] * BLOCK_D + d[None, :])
            acc += w[:, None] * o
            den += w
        if HAS_SINKS:
            den += tl.exp(sink - m_use)
        ok = den > 0.0
        safe = tl.where(ok, den, 1.0)
        tl.store(OUT + b * so_b + i[:, None] * so_s + h[:, None] * so_h + d[None, :] * so_d,
                 (acc / safe[:, None]).to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & (d < HEAD_DIM)[None, :])
        tl.store(LSE + (b * nh * G + h) * SQ + i, tl.where(ok, m_use + tl.log(safe),
                                                           float("-inf")), mask=row_ok)

    return combine


def pow2(n: int, low: int = 16) -> int:
    """The tile size for ``n`` rows or dims: the next power of two, at least ``low``."""
    return max(low, 1 << max(0, n - 1).bit_length())


def num_splits(batch: int, heads_kv: int, max_len: int, block_n: int, sms: int) -> int:
    """Key splits per (row, kv head): enough programs to fill the device twice
    over, each with at least four key tiles."""
    want = -(-2 * sms // max(1, batch * heads_kv))
    return max(1, min(want, max_len // (4 * block_n)))


def _sms(device: torch.device) -> int:
    return _sm_count(device.index) if device.type == "cuda" else 4


@functools.lru_cache(maxsize=None)  # read on every call: asked once per device
def _sm_count(index: Optional[int]) -> int:
    return torch.cuda.get_device_properties(
        index if index is not None else torch.cuda.current_device()).multi_processor_count


def split_kv_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool,
                       window: Optional[tuple[int, int]] = None,
                       softcap: Optional[float] = None, sinks: Optional[Tensor] = None,
                       block_table: Optional[Tensor] = None,
                       cache_seqlens: Optional[Tensor] = None,
                       splits: Optional[int] = None, block_n: Optional[int] = None,
                       num_warps: int = 4,
                       num_stages: int = 2) -> tuple[Tensor, Tensor]:
    """Short-query attention, dense or paged; q (B, Sq, Hq, D) (any strides).

    Dense: k (B, Sk, Hkv, D), v (B, Sk, Hkv, D).  Paged (``block_table`` (B,
    max_blocks) int32 and ``cache_seqlens`` (B,) int32 given): k/v the caches
    (num_blocks, block_size, Hkv, D), block_size a power of two >= 16.
    Sq * Hq / Hkv <= :data:`MAX_ROWS`.  ``splits`` (default: :func:`num_splits`),
    ``block_n`` (keys per tile, see :func:`block_n_for`), ``num_warps`` and
    ``num_stages``: launch parameters (bench/triton_decode_tune.py times them).
    Returns out (B, Sq, Hq, D) in q's dtype and lse (B, Hq, Sq) float32 (see
    the module docstring): two launches, the split kernel and the combination.
    """
    B, Sq, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    paged = block_table is not None
    page = k.shape[1] if paged else 0
    max_len = block_table.shape[1] * page if paged else k.shape[1]
    block_n = block_n_for(paged, page, block_n)
    bm, bd = pow2(G * Sq), pow2(D)
    S = splits or num_splits(B, Hkv, max_len, block_n, _sms(q.device))
    chunk = -(-max(1, max_len) // S)
    chunk = -(-chunk // block_n) * block_n
    o_part = torch.empty(B, Hkv, S, bm, bd, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B, Hkv, S, bm, device=q.device, dtype=torch.float32)
    left, right = window if window is not None else (-1, -1)
    dummy = lse_part  # an unused pointer argument (dense calls)
    kernel()[(B, Hkv, S)](
        q, k, v, block_table if paged else dummy, cache_seqlens if paged else dummy,
        o_part, lse_part, q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        *k.stride(), *v.stride(), block_table.stride(0) if paged else 0,
        Sq, G, D, max(page, 1), chunk, max_len, k.shape[0], float(scale),
        float(softcap or 1.0),
        _OPEN if left < 0 else left, _OPEN if right < 0 else right,
        PAGED=paged, CAUSAL=bool(causal), WINDOW=window is not None,
        SOFTCAP=softcap is not None, BLOCK_M=bm, BLOCK_N=block_n, BLOCK_D=bd,
        num_warps=num_warps, num_stages=num_stages)
    out = torch.empty(B, Sq, Hq, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, Sq, device=q.device, dtype=torch.float32)
    combine_kernel()[(B, Hkv)](
        o_part, lse_part, sinks if sinks is not None else lse_part, out, lse, S, Sq, G, D,
        *out.stride(), HAS_SINKS=sinks is not None, BLOCK_M=bm, BLOCK_D=bd)
    return out, lse


