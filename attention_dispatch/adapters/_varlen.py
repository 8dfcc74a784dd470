"""Key-padding translation shared by the flash-attn and xformers adapters.

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

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def key_lengths(key_padding_mask: Tensor) -> Tensor:
    """(B, Sk) bool -> (B,) int32 number of real keys per batch row."""
    return key_padding_mask.sum(-1, dtype=torch.int32)


def is_prefix(key_padding_mask: Tensor, lengths: Tensor) -> bool:
    """Whether every row's real keys are its first ``lengths[b]`` keys.

    One host synchronisation (a tiny reduction).
    """
    idx = torch.arange(key_padding_mask.shape[-1], device=key_padding_mask.device)
    return bool(torch.equal(key_padding_mask, idx[None, :] < lengths[:, None]))


def real_keys_first(key_padding_mask: Tensor) -> Tensor:
    """(B, Sk) int64 gather index that moves each row's real keys to its front,
    in their original order (a stable sort on "is padding")."""
    return torch.argsort((~key_padding_mask).to(torch.int8), dim=-1, stable=True)


def gather_keys(t: Tensor, order: Tensor) -> Tensor:
    """t (B, Sk, H, D) reordered along Sk by ``order`` (B, Sk); differentiable."""
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


def prefix_kv(k: Tensor, v: Tensor, key_padding_mask: Tensor
              ) -> tuple[Tensor, Tensor, Tensor]:
    """K/V (B, Sk, H, D) in "prefix" form for ``seqused_k``-style kernels.

    Returns (k, v, lengths int32 (B,)).  When the mask already marks each row's
    first keys as real (right padding, the usual case) k and v are returned as
    they are (no copy); otherwise each row's real keys are gathered to its front
    (one copy of K and V).  Gradients of key positions >= lengths are forced to 0.
    """
    lengths = key_lengths(key_padding_mask)
    if not is_prefix(key_padding_mask, lengths):
        order = real_keys_first(key_padding_mask)
        k, v = gather_keys(k, order), gather_keys(v, order)
    return zero_grad_outside(k, lengths), zero_grad_outside(v, lengths), lengths


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
