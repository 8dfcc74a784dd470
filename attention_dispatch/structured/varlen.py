"""Packed variable-length attention: :func:`attention_varlen`.

The packed form is flash-attn's: the sequences of a batch stored back to back,
q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, Dv), sequence b being
``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]`` and ``k[cu_seqlens_k[b]:cu_seqlens_k[b + 1]]``.
The dispatch of packed calls (native ``forward_varlen`` or the padded dense
route) lives in the core (``varlen_call``); helpers that move between packed
and dense batches are re-exported here.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .._core import BackendArg, CallOptions, effective_policy, selection_of, varlen_call
from .._core.packing import cu_seqlens, pad_varlen, seqlens, token_positions, unpad_varlen

__all__ = ["attention_varlen", "cu_seqlens", "pad_varlen", "seqlens", "token_positions",
           "unpad_varlen"]

Tensor = torch.Tensor


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                     cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                     causal: bool = False, dropout_p: float = 0.0,
                     scale: Optional[float] = None, window: Optional[tuple[int, int]] = None,
                     softcap: Optional[float] = None, alibi_slopes: Optional[Tensor] = None,
                     sinks: Optional[Tensor] = None, backend: BackendArg = "auto",
                     return_lse: bool = False, deterministic: Optional[bool] = None,
                     max_extra_bytes: Optional[int] = None, check_values: bool = True
                     ) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention over a packed batch of variable-length sequences.

    Shapes (flash-attn's varlen convention): q (Tq, Hq, D), k (Tk, Hkv, D),
    v (Tk, Hkv, Dv); cu_seqlens_q/k (B + 1,) int32 cumulative starts
    ([0, L0, L0 + L1, ..., T]); max_seqlen_q/k ints >= the longest sequence.
    Returns out (Tq, Hq, Dv) in q's dtype, and with ``return_lse`` lse
    (Hq, Tq) float32, detached.  Sequences of length 0 are allowed (a query
    with no key gives 0, lse -inf).

    Every other argument means what it means in :func:`attention`, per
    sequence: causal is bottom-right inside each sequence (query i of a
    sequence with Lq queries and Lk keys sees key j iff j <= i + Lk - Lq), and
    so are the window and the ALiBi distance.  ``alibi_slopes`` is (Hq,) or
    (B, Hq) float32.  ``sinks`` (Hq,) are per head, the same for every
    sequence (lse then includes them).  ``deterministic`` and ``max_extra_bytes``
    are the policies of :func:`attention` (docs/selection.md "Policies").
    Validating cu_seqlens reads them on the host (one
    synchronisation per call; skipped while torch.compile traces).
    ``check_values=False`` skips that read (shapes, dtypes and devices are
    still checked): for callers that built cu_seqlens themselves and call once
    per layer (a read per layer stalls the host on the GPU).  The caller then
    vouches for the values: 0 first, non-decreasing, the packed totals last, no
    sequence longer than max_seqlen_q/k.

    Backends that declare ``capabilities.varlen`` run the packed tensors; any
    other runs the equivalent padded dense batch (see the module docstring).

    Equivalent math::

        for b in range(B):
            qs, ks, vs = q[cq[b]:cq[b+1]], k[ck[b]:ck[b+1]], v[ck[b]:ck[b+1]]
            out[cq[b]:cq[b+1]] = attention(qs, ks, vs, layout="bshd", causal=causal, ...)

    Raises:
        AttentionInputError / AttentionTypeError: bad input, before any kernel.
        BackendUnavailable: no backend of the selection takes the call.
    """
    det, limit = effective_policy(deterministic, max_extra_bytes)
    o = CallOptions(alibi_slopes=alibi_slopes, sinks=sinks, causal=causal, dropout_p=dropout_p,
                    scale=scale, layout="bshd", return_lse=return_lse, window=window,
                    softcap=softcap, deterministic=det, max_extra_bytes=limit)
    return varlen_call(selection_of(backend), q, k, v, cu_seqlens_q, cu_seqlens_k,
                       max_seqlen_q, max_seqlen_k, o, check_values=check_values)
