"""A backend's answer on a small random call shaped like a real one, against
the float64 reference (what autotune checks before it times a backend).

The call itself runs through a function the caller passes (the dispatcher's
``call``), so this module depends on nothing above the reference.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .reference import reference_attention, within_rule
from .spec import CallOptions, CallSpec

Tensor = torch.Tensor
Call = Callable[[tuple[str, ...], Tensor, Tensor, Tensor, CallOptions], Any]


def small_call(spec: CallSpec, max_seq: int = 64, seed: int = 0
               ) -> tuple[tuple[Tensor, Tensor, Tensor], CallOptions]:
    """float64 CPU inputs (bhsd) standing for ``spec``: its dtype-independent
    features (head dims, GQA ratio, mask kind, key padding, causal, window,
    softcap, ALiBi, sinks) with at most 2 batches, 4 query heads and ``max_seq``
    positions; no dropout, no gradients."""
    g = torch.Generator().manual_seed(seed)
    ratio = spec.heads_q // spec.heads_kv
    hq = max(ratio, min(spec.heads_q, 4))
    b, sq, sk = min(spec.batch, 2), min(spec.seq_q, max_seq), min(spec.seq_k, max_seq)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    qkv = (randn(b, hq, sq, spec.head_dim), randn(b, hq // ratio, sk, spec.head_dim),
           randn(b, hq // ratio, sk, spec.head_dim_v))
    mask = None
    if spec.mask_kind == "bool":
        mask = torch.rand(b, 1, sq, sk, generator=g) > 0.3
    elif spec.mask_kind == "float":
        mask = randn(b, 1, sq, sk)
    kpm = (torch.rand(b, sk, generator=g) > 0.3) if spec.key_padding else None
    slopes = torch.rand(hq, generator=g) if spec.alibi else None
    sinks = torch.randn(hq, generator=g) if spec.sinks else None
    opts = CallOptions(mask, kpm, slopes, sinks, causal=spec.causal, window=spec.window,
                       softcap=spec.softcap)
    return qkv, opts


def check_call(call: Call, name: str, spec: CallSpec, max_seq: int = 64) -> Optional[str]:
    """None when backend ``name`` meets the contract's accuracy rule (against
    the float64 reference, with ``math`` in the same dtype as the yardstick)
    on :func:`small_call` (spec); else the reason."""
    (q, k, v), o = small_call(spec, max_seq)
    ref, _ = reference_attention(q, k, v, mask=o.mask, key_padding_mask=o.key_padding_mask,
                                 causal=o.causal, window=o.window, softcap=o.softcap,
                                 alibi_slopes=o.alibi_slopes, sinks=o.sinks)
    dev, dt = spec.device, spec.dtype
    q, k, v = (t.to(dev, dt) for t in (q, k, v))
    mask = o.mask if o.mask is None or o.mask.dtype == torch.bool else o.mask.to(dt)
    o = o._replace(mask=None if mask is None else mask.to(dev),
                   key_padding_mask=None if o.key_padding_mask is None
                   else o.key_padding_mask.to(dev),
                   alibi_slopes=None if o.alibi_slopes is None else o.alibi_slopes.to(dev),
                   sinks=None if o.sinks is None else o.sinks.to(dev))
    with torch.no_grad():
        got = call((name,), q, k, v, o).double().cpu()
        base = call(("math",), q, k, v, o).double().cpu()
    err, err_math = (got - ref).abs().max().item(), (base - ref).abs().max().item()
    if within_rule(err, err_math, ref.abs().max().item(), dt):
        return None
    return f"max error {err:.3g} vs the float64 reference (math: {err_math:.3g})"
