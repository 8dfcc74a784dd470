"""Mask helpers shared by adapters: bottom-right causal, sliding windows,
ALiBi and softcap, combined masks, additive biases, rows that have no key to
attend, GQA expansion."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .maskvalues import derived, value_key
from .spec import CallSpec

Tensor = torch.Tensor


def causal_keep(seq_q: int, seq_k: int, device: torch.device) -> Tensor:
    """(Sq, Sk) bool, True where query i may attend key j: j <= i + (Sk - Sq)."""
    i = torch.arange(seq_q, device=device).unsqueeze(-1)
    j = torch.arange(seq_k, device=device)
    return j <= i + (seq_k - seq_q)


def window_keep(seq_q: int, seq_k: int, window: tuple[int, int], causal: bool,
                device: torch.device) -> Tensor:
    """(Sq, Sk) bool, True where query i may attend key j under the window
    (left, right) (-1 = unbounded) and, if ``causal``, bottom-right causal.

    Equivalent math::

        d = j - (i + Sk - Sq)
        keep = (left < 0 or d >= -left) & (right < 0 or d <= right) & (not causal or d <= 0)
    """
    i = torch.arange(seq_q, device=device).unsqueeze(-1)
    d = torch.arange(seq_k, device=device) - (i + (seq_k - seq_q))
    keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    left, right = window
    if left >= 0:
        keep = keep & (d >= -left)
    if right >= 0:
        keep = keep & (d <= right)
    if causal:
        keep = keep & (d <= 0)
    return keep


def alibi_bias(slopes: Tensor, seq_q: int, seq_k: int, dtype: torch.dtype) -> Tensor:
    """ALiBi as flash-attn defines it: (1|B, Hq, Sq, Sk) = -slope * |i + Sk - Sq - j|.

    ``slopes`` is (Hq,) or (B, Hq) float32.
    """
    i = torch.arange(seq_q, device=slopes.device).unsqueeze(-1)
    dist = (i + (seq_k - seq_q) - torch.arange(seq_k, device=slopes.device)).abs()
    s = slopes if slopes.dim() == 2 else slopes.unsqueeze(0)
    return -(s[:, :, None, None].to(dtype) * dist.to(dtype))


def softcap_scores(s: Tensor, softcap: Optional[float]) -> Tensor:
    """``softcap * tanh(s / softcap)``; ``s`` unchanged when softcap is None."""
    if softcap is None:
        return s
    return torch.tanh(s / softcap) * softcap


def keep_mask(spec: CallSpec, mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
              causal: Optional[bool] = None, window: Optional[bool] = None
              ) -> Optional[Tensor]:
    """Bool mask (True = may attend) from a bool ``mask``, the padding mask,
    if ``causal`` (default: ``spec.causal``) the bottom-right causal mask and,
    if ``window`` (default: a window is set), ``spec.window``.

    The result broadcasts to (B, Hq, Sq, Sk); None when nothing is masked.
    A float ``mask`` is not included: use :func:`additive_bias`.
    """
    causal = spec.causal if causal is None else causal
    use_window = spec.window is not None if window is None else window and spec.window is not None
    keep: Optional[Tensor] = None
    if mask is not None and mask.dtype == torch.bool:
        keep = mask
    if key_padding_mask is not None:
        kp = key_padding_mask[:, None, None, :]
        keep = kp if keep is None else keep & kp
    if use_window:
        c = window_keep(spec.seq_q, spec.seq_k, spec.window, causal, spec.device)  # type: ignore
        keep = c if keep is None else keep & c
    elif causal:
        c = causal_keep(spec.seq_q, spec.seq_k, spec.device)
        keep = c if keep is None else keep & c
    return keep


def additive_bias(spec: CallSpec, mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                  dtype: torch.dtype, causal: Optional[bool] = None,
                  alibi_slopes: Optional[Tensor] = None) -> Optional[Tensor]:
    """Float bias (0 / -inf, plus a float ``mask``, plus ALiBi when
    ``alibi_slopes`` is given) equivalent to the masks of the call, window
    included.  Materialised: O(Sq * Sk) per distinct batch row / head."""
    keep = keep_mask(spec, mask, key_padding_mask, causal)
    bias: Optional[Tensor] = None
    if keep is not None:
        bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
        bias = bias.masked_fill(~keep, float("-inf"))
    if mask is not None and mask.dtype != torch.bool:
        m = mask.to(dtype)
        bias = m if bias is None else bias + m
    if alibi_slopes is not None:
        a = alibi_bias(alibi_slopes, spec.seq_q, spec.seq_k, dtype)
        bias = a if bias is None else bias + a
    return bias


def alive_rows(spec: CallSpec, mask: Optional[Tensor],
               key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """Bool (B|1, Hq|1, Sq), True where the query row has at least one key it may
    attend; None when every row does (known from the shapes alone, or from
    the values of small bool CPU masks: see :mod:`.maskvalues`)."""
    if not spec.may_have_empty_rows:
        return None
    km, kk = value_key(mask), value_key(key_padding_mask)
    if km is None or kk is None or spec.device_type != "cpu":
        return _alive_rows(spec, mask, key_padding_mask)
    return derived(("alive", km, kk, spec.seq_q, spec.seq_k, spec.causal, spec.window,
                    spec.device_type), lambda: _unless_all(
                        _alive_rows(spec, mask, key_padding_mask)))


def _unless_all(alive: Optional[Tensor]) -> Optional[Tensor]:
    return None if alive is None or bool(alive.all()) else alive


def _alive_rows(spec: CallSpec, mask: Optional[Tensor],
                key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    if mask is None and key_padding_mask is not None and spec.causal and spec.window is None:
        # first real key per batch row; row i is alive iff first <= i + offset
        idx = torch.arange(spec.seq_k, device=spec.device)
        big = torch.where(key_padding_mask, idx, spec.seq_k).amin(-1)  # (B,)
        i = torch.arange(spec.seq_q, device=spec.device)
        return (big[:, None] <= i + spec.causal_offset)[:, None, :]
    keep = keep_mask(spec, mask, key_padding_mask)
    if mask is not None and mask.dtype != torch.bool:
        finite = mask > float("-inf")
        keep = finite if keep is None else keep & finite
    if keep is None:
        return None
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    return keep.any(-1)


def zero_empty_rows(out: Tensor, lse: Optional[Tensor], alive: Optional[Tensor],
                    inputs: tuple[Tensor, ...] = ()) -> tuple[Tensor, Optional[Tensor]]:
    """out (B, Hq, Sq, Dv) -> 0 and lse -> -inf where ``alive`` is False.

    The gradient of the zeroed rows is zero, so a kernel's garbage there never
    reaches q, k or v.  Without autograd the kernel's own output buffer is
    zeroed in place (unless it shares memory with one of ``inputs``); with
    autograd a copy is made only when some row is dead (one tiny reduction
    read back, skipped while a CUDA graph is captured or a graph is traced),
    so a padded batch without dead rows costs no second output-sized buffer.
    """
    if alive is None:
        return out, lse
    dead = ~alive
    if lse is not None:
        lse = lse.masked_fill(dead, float("-inf"))
    if not out.requires_grad and _owned(out, inputs):
        return out.masked_fill_(dead.unsqueeze(-1), 0.0), lse
    if _may_read_back(out) and not bool(dead.any()):
        return out, lse
    return out.masked_fill(dead.unsqueeze(-1), 0.0), lse


def _owned(out: Tensor, inputs: tuple[Tensor, ...]) -> bool:
    """Whether ``out`` may be written in place: eager, and no input shares its memory."""
    if torch.compiler.is_compiling():
        return False
    ptr = out.untyped_storage().data_ptr()
    return all(t.untyped_storage().data_ptr() != ptr for t in inputs)


def _may_read_back(t: Tensor) -> bool:
    """Whether a host read of a value on ``t``'s device is allowed now."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def apply_sinks(out: Tensor, lse: Tensor, sinks: Tensor,
                to_out: Callable[[Tensor], Tensor] = lambda x: x.unsqueeze(-1)
                ) -> tuple[Tensor, Tensor]:
    """Attention sinks applied to a sink-free result: ``out`` scaled by the mass
    the real keys keep, ``lse`` with the sink's term (differentiable in all three).

    ``lse``: the natural-log LSE without the sink (-inf for rows with no key);
    ``sinks``: the per-head logits, shaped to broadcast against ``lse`` (e.g.
    (1, H, 1) for (B, H, S)); ``to_out`` lines an lse-shaped tensor up with
    ``out`` (default: a trailing axis, for out (B, H, S, Dv)).  Returns out in
    its dtype and lse in float32 (float64 for float64 outputs).

    Equivalent math::

        alpha = sigmoid(lse - s)            # e^lse / (e^lse + e^s); 0 for rows with no key
        out' = alpha * out;  lse' = logaddexp(lse, s)
    """
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    lse = lse.to(acc)
    s = torch.broadcast_to(sinks.to(acc), lse.shape)
    alpha = torch.sigmoid(lse - s)
    return (out.to(acc) * to_out(alpha)).to(out.dtype), torch.logaddexp(lse, s)


def sink_lse(lse: Tensor, sinks: Tensor) -> Tensor:
    """``lse`` of a call with sinks after an empty-row fix: rows set to -inf
    (no key) get their sink's logit instead.  ``sinks`` broadcasts against ``lse``."""
    return torch.where(torch.isneginf(lse), sinks.to(lse.dtype).expand_as(lse), lse)


def expand_kv(t: Tensor, heads_q: int) -> Tensor:
    """(B, Hkv, S, D) -> (B, Hq, S, D): query head h reads kv head h // (Hq // Hkv)."""
    groups = heads_q // t.shape[1]
    if groups == 1:
        return t
    return t.repeat_interleave(groups, dim=1)


def empty_result(q: Tensor, k: Tensor, v: Tensor, spec: CallSpec) -> tuple[Tensor, Tensor]:
    """The result of a call with Sq == 0 or Sk == 0: zeros (zero, finite
    gradients) and lse -inf, without a kernel."""
    shape = (spec.batch, spec.heads_q, spec.seq_q)
    out = q.new_zeros(shape + (spec.head_dim_v,))
    if spec.requires_grad:  # zero, finite gradients
        out = out + 0.0 * (q.sum() + k.sum() + v.sum())
    return out, q.new_full(shape, float("-inf"), dtype=torch.float32)
