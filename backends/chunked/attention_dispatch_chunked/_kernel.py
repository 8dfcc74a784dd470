"""Chunked-query attention in plain torch ops.

The queries are processed ``chunk_size`` rows at a time, so the scores,
probabilities and per-chunk masks never exceed (B, Hq, chunk, Sk) elements;
the full (B, Hq, Sq, Sk) score or mask tensor is never built.

Equivalent math (per chunk of query rows ``r = start:stop``)::

    s = scale * q[:, :, r] @ k.T                # (B, Hq, chunk, Sk), float32 for half inputs
    s = s + float_mask[..., r, :]               # rows r only (masks with one row broadcast)
    s[~(bool_mask[..., r, :] & key_padding & (j <= i + Sk - Sq))] = -inf
    p = softmax(s) (0 for rows of all -inf);  lse = logsumexp(s) (-inf there)
    out[:, :, r] = p.to(v.dtype) @ v            # GQA: head h reads kv head h // (Hq // Hkv)

With ``causal``, keys that no row of the chunk may see (j >= stop + Sk - Sq)
are not computed at all.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor

_HALF = (torch.float16, torch.bfloat16)


def safe_softmax(s: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last axis of ``s`` (..., Sk) that gives 0, not NaN,
    for rows of all -inf.

    Returns ``(p, lse)``: p (..., Sk) and lse (...) with lse = -inf for such
    rows.  Gradients stay finite (and zero) for those rows, for p and lse:
    the max subtracted is detached and replaced by 0 where not finite, and the
    denominator is replaced by 1 where it is 0.
    """
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    alive = denom > 0
    denom = torch.where(alive, denom, torch.ones_like(denom))
    p = e / denom
    lse = (torch.log(denom) + m).masked_fill(~alive, float("-inf")).squeeze(-1)
    return p, lse


def mask_block(mask: Optional[Tensor], start: int, stop: int, kv_end: int) -> Optional[Tensor]:
    """Rows ``start:stop`` and keys ``:kv_end`` of a mask broadcastable to
    (B, Hq, Sq, Sk), as a view (never a copy).  Axes of size 1 (broadcast)
    are kept as they are."""
    if mask is None:
        return None
    if mask.shape[-2] != 1:
        mask = mask[..., start:stop, :]
    if mask.shape[-1] != 1:
        mask = mask[..., :kv_end]
    return mask


def attend_chunk(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                 key_padding_mask: Optional[Tensor], start: int,
                 causal_offset: Optional[int], scale: float) -> tuple[Tensor, Tensor]:
    """Attention for one chunk of query rows.

    Args:
        q: (B, Hq, C, D), query rows ``start:start + C`` of the call.
        k: (B, Hkv, K, D) and v: (B, Hkv, K, Dv), the first K keys of the call.
        mask: bool (True = may attend) or float (added), broadcastable to
            (B, Hq, C, K), already cut to this block; or None.
        key_padding_mask: bool (B, K), True = real key; or None.
        start: index of the chunk's first query row in the whole call.
        causal_offset: Sk - Sq of the whole call when causal (query i sees key
            j iff j <= i + causal_offset), else None.
        scale: score scale.

    Returns:
        out (B, Hq, C, Dv) in q's dtype and lse (B, Hq, C) in the
        accumulation dtype (float32 for half inputs, else q's dtype).
    """
    b, hq, c, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    acc = torch.float32 if q.dtype in _HALF else q.dtype
    # GQA without copying k/v: query heads kv*group .. kv*group+group-1 share kv
    # head kv, so (B, Hq, C, D) -> (B, Hkv, group*C, D) lines them up with it.
    s = torch.matmul(q.reshape(b, hkv, group * c, d), k.transpose(-1, -2))
    s = s.reshape(b, hq, c, sk).to(acc) * scale
    keep: Optional[Tensor] = None
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask
        else:
            s = s + mask.to(acc)
    if key_padding_mask is not None:
        kp = key_padding_mask[:, None, None, :]
        keep = kp if keep is None else keep & kp
    if causal_offset is not None:
        i = torch.arange(start, start + c, device=q.device).unsqueeze(-1)
        j = torch.arange(sk, device=q.device)
        cm = j <= i + causal_offset
        keep = cm if keep is None else keep & cm
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    p, lse = safe_softmax(s)
    # p is rounded to the input dtype before p @ v, as fused kernels do
    out = torch.matmul(p.to(v.dtype).reshape(b, hkv, group * c, sk), v)
    return out.reshape(b, hq, c, v.shape[-1]), lse


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Optional[Tensor],
                      key_padding_mask: Optional[Tensor], causal: bool, scale: float,
                      chunk_size: int, recompute: bool) -> tuple[Tensor, Tensor]:
    """Attention over query chunks of ``chunk_size`` rows.

    Shapes: q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), any
    strides; mask broadcastable to (B, Hq, Sq, Sk); key_padding_mask (B, Sk).
    Returns out (B, Hq, Sq, Dv) in q's dtype and lse (B, Hq, Sq) float32.

    Extra memory beyond inputs and output: O(B * Hq * chunk_size * Sk) for
    the scores of one chunk.  With ``recompute`` each chunk runs under
    activation checkpointing, so autograd keeps no per-chunk scores either
    (the backward pass recomputes them chunk by chunk).  A call that fits in
    one chunk is never recomputed: its scores are within the bound anyway.

    Equivalent math: see the module docstring.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1; got {chunk_size!r}")
    sq, sk = q.shape[2], k.shape[2]
    offset = sk - sq if causal else None
    recompute = recompute and sq > chunk_size
    outs: list[Tensor] = []
    lses: list[Tensor] = []
    for start in range(0, sq, chunk_size):
        stop = min(sq, start + chunk_size)
        # causal: no row of the chunk sees key stop + offset or later; keep at
        # least one key so fully masked chunks still go through the graph
        kv_end = sk if offset is None else max(1, min(sk, stop + offset))
        args = (q[:, :, start:stop], k[:, :, :kv_end], v[:, :, :kv_end],
                mask_block(mask, start, stop, kv_end),
                None if key_padding_mask is None else key_padding_mask[:, :kv_end],
                start, offset, scale)
        if recompute:
            out, lse = checkpoint(attend_chunk, *args, use_reentrant=False)
        else:
            out, lse = attend_chunk(*args)
        outs.append(out)
        lses.append(lse.float())
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
