"""Packing: between dense batches with key padding and packed variable-length
sequences (``cu_seqlens``), one copy of each helper for the dispatcher and the
adapters.

Key-padding translation (the flash-attn and xformers adapters):

Kernels of the flash family take key padding as sequence lengths, not as a
mask: either packed ("varlen": the real keys of every batch row stored back to
back, located by ``cu_seqlens_k``) or dense with per-row lengths
(``seqused_k``: the first ``len[b]`` keys of row ``b`` are real).  The contract's
``key_padding_mask`` (B, Sk) may mark any keys as padding, so the helpers here
turn it into one of those forms, copying only when they must.

All tensors here are in the (B, S, H, D) ("bshd") layout the kernels read.

Equivalent math: attention over the real keys only is attention over all keys
with the padded ones masked out (``s[..., ~key_padding_mask] = -inf``), as long
as the causal mask does not depend on key positions (see the adapters).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .backend import Backend
    from .spec import CallSpec

Tensor = torch.Tensor


def key_lengths(key_padding_mask: Tensor) -> Tensor:
    """(B, Sk) bool -> (B,) int32 number of real keys per batch row."""
    return key_padding_mask.sum(-1, dtype=torch.int32)


def real_keys_first(key_padding_mask: Tensor) -> Tensor:
    """(B, Sk) int64 gather index that moves each row's real keys to its front,
    in their original order (a stable sort on "is padding")."""
    return torch.argsort((~key_padding_mask).to(torch.int8), dim=-1, stable=True)


def gather_keys(t: Tensor, order: Tensor) -> Tensor:
    """t (B, Sk, H, D) reordered along Sk by ``order`` (B, L), L <= Sk:
    (B, L, H, D), row b holding keys ``order[b]``; differentiable."""
    index = order[:, :, None, None].expand(-1, -1, t.shape[2], t.shape[3])
    return torch.gather(t, 1, index)


class _ZeroGradOutside(torch.autograd.Function):
    """Identity forward; backward zeroes the gradient of rows where ``keep`` is
    False.  Guards against kernels that leave dK/dV of unused keys unwritten."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(keep)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return grad.masked_fill(~keep[:, :, None, None], 0.0), None


def zero_grad_outside(t: Tensor, lengths: Tensor) -> Tensor:
    """t (B, Sk, H, D) unchanged; its gradient is 0 at key positions >= lengths[b]."""
    if not t.requires_grad:
        return t
    keep = torch.arange(t.shape[1], device=t.device)[None, :] < lengths[:, None]
    return _ZeroGradOutside.apply(t, keep)


def prefix_kv(k: Tensor, v: Tensor, key_padding_mask: Tensor, zero_tail: bool = False
              ) -> tuple[Tensor, Tensor, Tensor]:
    """K/V (B, Sk, H, D) in "prefix" form for ``seqused_k``-style kernels.

    Returns (k, v, lengths int32 (B,)).  When the mask already marks each row's
    first keys as real (right padding, the usual case) k and v are returned as
    they are (no copy); otherwise each row's real keys are gathered to its front,
    and only the first ``max(lengths)`` (at least 1) positions are kept: the copy
    holds (B, max(lengths), H, D) of K and of V, not (B, Sk, H, D) (half the
    memory when half the keys are padding).  Gradients of key positions
    >= lengths are forced to 0.

    ``zero_tail``: for kernels that load a row's last key tile whole (and so
    multiply zero weights with whatever follows its keys: NaN there gives NaN),
    the positions >= lengths[b] hold 0 - zeroed in place in the gathered copy,
    or, for prefix rows with padding, in one masked copy of K and V (none when
    no row is padded).  One host read decides all of it (prefix or not, padded
    or not, the longest row).
    """
    lengths = key_lengths(key_padding_mask)
    prefix, full, longest = _key_layout(key_padding_mask, lengths)
    if not prefix:
        keep = max(longest, 1)
        order = real_keys_first(key_padding_mask)[:, :keep]
        k, v = gather_keys(k, order), gather_keys(v, order)
        if zero_tail:  # a fresh copy: zeroed in place (its gradient there is 0)
            tail = (torch.arange(keep, device=k.device)[None, :] >= lengths[:, None])
            k, v = (t.masked_fill_(tail[:, :, None, None], 0.0) for t in (k, v))
    elif zero_tail and not full:
        pad = ~key_padding_mask[:, :, None, None]
        k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
    return zero_grad_outside(k, lengths), zero_grad_outside(v, lengths), lengths


def _key_layout(key_padding_mask: Tensor, lengths: Tensor) -> tuple[bool, bool, int]:
    """(every row's real keys are its first lengths[b], no key is padding, the
    longest row's real keys; 0 for an empty batch): one host read."""
    idx = torch.arange(key_padding_mask.shape[-1], device=key_padding_mask.device)
    prefix = (key_padding_mask == (idx[None, :] < lengths[:, None])).all()
    longest = lengths.max() if lengths.numel() else lengths.new_zeros(())
    flags = torch.stack([prefix.long(), key_padding_mask.all().long(), longest.long()])
    prefix_, full, n = flags.tolist()
    return bool(prefix_), bool(full), int(n)


def cu_seqlens(lengths: Tensor) -> Tensor:
    """(B,) lengths -> (B + 1,) int32 cumulative starts [0, l0, l0 + l1, ...]."""
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def dense_cu_seqlens(batch: int, seq: int, device: torch.device) -> Tensor:
    """(B + 1,) int32 [0, S, 2S, ...]: every row has ``seq`` entries."""
    return torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=device)


def unpad(t: Tensor, key_padding_mask: Tensor) -> Tensor:
    """t (B, Sk, H, D) -> (total, H, D): the real keys, row after row.

    Differentiable (padded positions get zero gradient); one host sync.
    """
    return t[key_padding_mask]


def lse_to_bhs(lse: Tensor, batch: int, heads: int, seq_q: int) -> Tensor:
    """A kernel's LSE -> (B, H, Sq) float32.

    Accepts (H, B*Sq) (packed varlen with dense queries) or (B, H, >=Sq)
    (dense; some kernels pad Sq, e.g. to a multiple of 32).
    """
    if lse.dim() == 2:
        return lse.reshape(heads, batch, seq_q).permute(1, 0, 2).float()
    return lse[..., :seq_q].reshape(batch, heads, seq_q).float()


def causal_differs_with_padding(causal: bool, seq_q: int, key_padding: bool) -> bool:
    """True when a varlen/seqused kernel would place causal differently from the
    contract: the kernel aligns it to each row's real key count, the contract to
    the padded Sk (query i sees key j iff j <= i + Sk - Sq).  With Sq == 1 the
    bottom-right causal mask admits every key, so it is dropped: no difference."""
    return causal and seq_q > 1 and key_padding


CAUSAL_PADDING_REASON = (
    "causal=True with key_padding_mask and Sq > 1: the kernel's varlen path aligns causal "
    "to each row's real key count, the contract to the padded Sk (offset Sk - Sq); "
    "allowed: causal with key padding only for Sq == 1")


# ------------------------------------------------- packed sequences (cu_seqlens)


def seqlens(cu_seqlens: Tensor) -> Tensor:
    """(B + 1,) cumulative starts -> (B,) lengths (same dtype and device)."""
    return cu_seqlens[1:] - cu_seqlens[:-1]


def _dense_index(cu_seqlens: Tensor, max_seqlen: int) -> tuple[Tensor, Tensor]:
    """(B, M) token index of each right-aligned dense slot, and whether it is real."""
    start, lengths = cu_seqlens[:-1].long(), seqlens(cu_seqlens).long()
    p = torch.arange(max_seqlen, device=cu_seqlens.device)
    idx = start[:, None] + p[None, :] - (max_seqlen - lengths)[:, None]
    return idx, idx >= start[:, None]


def pad_varlen(x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> tuple[Tensor, Tensor]:
    """Packed (T, H, D) -> dense (B, M, H, D) with each sequence right-aligned
    (its padding first), and the (B, M) bool mask of real slots.

    Differentiable; no host synchronisation.  M = ``max_seqlen`` must be at
    least the longest sequence.
    """
    idx, real = _dense_index(cu_seqlens, max_seqlen)
    if x.shape[0] == 0:
        return x.new_zeros((idx.shape[0], max_seqlen) + tuple(x.shape[1:])), real
    dense = x[idx.clamp(0, x.shape[0] - 1)]
    return dense.masked_fill(~real[:, :, None, None], 0.0), real


def token_positions(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """For each of ``total`` packed tokens: (its sequence index, its position
    inside the sequence), int64 (T,) each; no host synchronisation."""
    t = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), t, right=True)
    return seq, t - cu_seqlens.long()[seq]


def unpad_varlen(dense: Tensor, cu_seqlens: Tensor, total: int) -> Tensor:
    """Dense right-aligned (B, M, ...) -> packed (T, ...): inverse of :func:`pad_varlen`."""
    seq, pos = token_positions(cu_seqlens, total)
    lengths = seqlens(cu_seqlens).long()
    return dense[seq, pos + dense.shape[1] - lengths[seq]]


def varlen_alive(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, total_q: int, causal: bool,
                 window: Optional[tuple[int, int]]) -> Tensor:
    """(Tq,) bool: whether each packed query has a key it may attend
    (bottom-right causal and window per sequence)."""
    seq, i = token_positions(cu_seqlens_q, total_q)
    lq, lk = seqlens(cu_seqlens_q).long()[seq], seqlens(cu_seqlens_k).long()[seq]
    centre = i + lk - lq
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    lo = centre - left if left >= 0 else torch.zeros_like(centre)
    hi = centre + right if right >= 0 else lk - 1
    return (lk > 0) & (lo.clamp(min=0) <= torch.minimum(hi, lk - 1))


def dense_via_varlen(backend: Backend, q: Tensor, k: Tensor, v: Tensor, kpm: Tensor, *,
                     spec: CallSpec, dropout_p: float, scale: float, **keywords: Tensor
                     ) -> tuple[Tensor, Optional[Tensor]]:
    """A dense key-padding call on a varlen backend without key padding: the
    real keys packed, every batch row's Sq queries one sequence.

    Shapes: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D|Dv) bhsd views, kpm (B, Sk)
    -> out (B, Hq, Sq, Dv), lse (B, Hq, Sq) or None.  Exact only when nothing
    depends on key positions (``_capabilities.key_padding_as_varlen``).
    One host synchronisation (the packed key count).  ``keywords``: the call's
    other tensor options (``sinks=``), passed on to ``forward_varlen``.
    """
    B, Hq, Sq, _ = q.shape
    kp, vp = k.transpose(1, 2)[kpm], v.transpose(1, 2)[kpm]          # (Tk, Hkv, D)
    if kp.shape[0] == 0:  # no real key anywhere: every row is empty
        out = q.new_zeros(q.shape[:-1] + (v.shape[-1],)) + 0.0 * (q.sum() + k.sum() + v.sum())
        return out, torch.full((B, Hq, Sq), float("-inf"), device=q.device)
    qp = q.transpose(1, 2).reshape(B * Sq, Hq, q.shape[-1])
    cu_q = torch.arange(0, (B + 1) * Sq, Sq, dtype=torch.int32, device=q.device)
    cu_k = cu_seqlens(kpm.sum(-1, dtype=torch.int32))
    vspec = dataclasses.replace(spec, varlen=True, key_padding=False, causal=False)
    out, lse = backend.forward_varlen(qp, kp, vp, spec=vspec, cu_seqlens_q=cu_q,
                                      cu_seqlens_k=cu_k, max_seqlen_q=Sq,
                                      max_seqlen_k=spec.seq_k, dropout_p=dropout_p,
                                      scale=scale, **keywords)
    out = out.reshape(B, Sq, Hq, -1).transpose(1, 2)
    if lse is not None:
        lse = lse.reshape(Hq, B, Sq).transpose(0, 1)
    return out, lse
