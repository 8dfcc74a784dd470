"""Attention over a paged KV cache: :func:`attention_paged` and
:func:`explain_paged`.

The cache layout is vLLM's and FA4's: k_cache (num_blocks, block_size, Hkv, D),
v_cache (num_blocks, block_size, Hkv, Dv), a per-row block table and per-row
lengths.  The dispatch (native ``forward_paged`` or the gathered dense route)
lives in the core (``paged_call``); :func:`gather_dense` is re-exported here.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .._core import (BackendArg, CallOptions, Decision, effective_policy,
                     explain_paged_options, gather_dense, paged_call, selection_of)

Tensor = torch.Tensor

__all__ = ["attention_paged", "explain_paged", "gather_dense"]


def _options(causal: bool, scale: Optional[float], window: Optional[tuple[int, int]],
             softcap: Optional[float], sinks: Optional[Tensor], return_lse: bool,
             deterministic: Optional[bool], max_extra_bytes: Optional[int]) -> CallOptions:
    # tensor options (sinks) reach forward_paged as keywords on the native route
    # and the dense call unchanged on the gathered route; the policies resolve as
    # in attention() (argument > use_policy > environment > torch's mode)
    det, limit = effective_policy(deterministic, max_extra_bytes)
    return CallOptions(sinks=sinks, causal=causal, scale=scale, layout="bshd",
                       return_lse=return_lse, window=window, softcap=softcap,
                       deterministic=det, max_extra_bytes=limit)


def attention_paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, *, block_table: Tensor,
                    cache_seqlens: Tensor, causal: bool = True, scale: Optional[float] = None,
                    window: Optional[tuple[int, int]] = None, softcap: Optional[float] = None,
                    sinks: Optional[Tensor] = None, return_lse: bool = False,
                    backend: BackendArg = "auto", deterministic: Optional[bool] = None,
                    max_extra_bytes: Optional[int] = None, check_values: bool = True
                    ) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention of new queries over a paged KV cache (forward only).

    Shapes: q (B, Sq, Hq, D); k_cache (num_blocks, block_size, Hkv, D);
    v_cache (num_blocks, block_size, Hkv, Dv); block_table (B, max_blocks)
    int32; cache_seqlens (B,) int32, each row's cache length *including* its
    Sq new tokens (already written to the cache).  Returns out (B, Sq, Hq, Dv)
    in q's dtype, and with ``return_lse`` lse (B, Hq, Sq) float32.
    Hq % Hkv == 0 (query head h reads kv head h // (Hq // Hkv)).

    Row b's key j (0 <= j < L = cache_seqlens[b]) is slot ``j % block_size`` of
    block ``block_table[b, j // block_size]``.  Slots past L and the table's
    entries past its ceil(L / block_size) used blocks are never read (NaN or
    garbage there changes nothing).  ``causal`` (default True) is bottom-right
    per row: query i sits at position i + L - Sq and sees key j iff
    j <= i + L - Sq.  ``window`` (left, right) keeps
    i + L - Sq - left <= j <= i + L - Sq + right (-1 = open); ``softcap``,
    ``scale`` and ``sinks`` ((Hq,) logits; with ``return_lse`` the lse includes
    them) mean what they mean in :func:`attention`, and so do the policies
    ``deterministic`` and ``max_extra_bytes`` (docs/selection.md "Policies").  No call needs
    gradients (a tensor that requires grad is an error); nothing is appended
    to the cache.

    Validation reads block_table and cache_seqlens on the host once per call
    (Sq <= L <= max_blocks * block_size; used blocks in [0, num_blocks) and
    distinct within a row): one device-to-host copy, so one synchronisation
    per call; skipped while torch.compile traces.  ``check_values=False``
    skips that read (shapes, dtypes and devices are still checked): for
    decode loops whose table and lengths come from code that keeps them in
    range (a check per layer and step would stall the host on the GPU).  The
    caller then vouches for the values: with an index outside the cache or a
    length past the table a kernel may read outside the cache (triton-decode
    clamps the block index; FA4 and flex do not).

    Backends: those that page natively (``"paged"`` in their capabilities'
    extras: math, flex, flash-attn FA4) are tried first, in rank order; then
    any dense backend through the gathered route (the used blocks copied to a
    right-aligned dense batch with key padding).  :func:`explain_paged` says
    which and why.  See docs/structured.md.

    Equivalent math::

        for b in range(B):
            L = cache_seqlens[b]
            k = cat([k_cache[block_table[b, n]] for n in range(ceil(L / bs))])[:L]
            v = cat([v_cache[block_table[b, n]] for n in range(ceil(L / bs))])[:L]
            out[b] = attention(q[b:b+1], k[None], v[None], layout="bshd",
                               causal=causal, window=window, ...)   # offset L - Sq

    Raises:
        AttentionInputError / AttentionTypeError: bad input (naming
            ``block_table`` / ``cache_seqlens`` for bad indices or lengths),
            or a tensor that requires grad, before any kernel.
        BackendUnavailable: no backend of the selection takes the call.
    """
    o = _options(causal, scale, window, softcap, sinks, return_lse, deterministic,
                 max_extra_bytes)
    return paged_call(selection_of(backend), q, k_cache, v_cache, block_table, cache_seqlens, o,
                      check_values=check_values)


def explain_paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, *, block_table: Tensor,
                  cache_seqlens: Tensor, causal: bool = True, scale: Optional[float] = None,
                  window: Optional[tuple[int, int]] = None, softcap: Optional[float] = None,
                  sinks: Optional[Tensor] = None, return_lse: bool = False,
                  backend: BackendArg = "auto", deterministic: Optional[bool] = None,
                  max_extra_bytes: Optional[int] = None) -> Decision:
    """Which backend and route :func:`attention_paged` would use for these
    arguments, and for every registered backend its reasons against both
    routes ("native: ..." for ``forward_paged``, "gathered: ..." for the dense
    route); an accepting verdict's ``note`` names its route.  Validates the
    arguments; runs no kernel (no numeric canary)."""
    o = _options(causal, scale, window, softcap, sinks, return_lse, deterministic,
                 max_extra_bytes)
    return explain_paged_options(backend, q, k_cache, v_cache, block_table, cache_seqlens, o)
