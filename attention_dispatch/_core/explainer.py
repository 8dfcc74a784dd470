"""explain(): which backend a call would run on, and why, without running it."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .decide import explain_spec
from .decision import Decision
from .binding import bhsd, memory_for
from .dispatch import copies_for
from .policy import effective as _effective
from .registry import REGISTRY
from .select import BackendArg, resolve
from .spec import CallOptions, validate

Tensor = torch.Tensor

def explain(q: Tensor, k: Tensor, v: Tensor, *, mask: Optional[Tensor] = None,
            key_padding_mask: Optional[Tensor] = None, causal: bool = False,
            dropout_p: float = 0.0, scale: Optional[float] = None, layout: str = "bhsd",
            backend: BackendArg = "auto", return_lse: bool = False,
            window: Optional[tuple[int, int]] = None, softcap: Optional[float] = None,
            alibi_slopes: Optional[Tensor] = None, sinks: Optional[Tensor] = None,
            deterministic: Optional[bool] = None, max_extra_bytes: Optional[int] = None
            ) -> Decision:
    """Which backend :func:`attention` would run for these arguments, and, for
    every registered backend, whether it accepts the call or the exact reasons
    why not, and (``Decision.copies``) which tensors the chosen backend gets
    as copies (memory layout, key-padding slots zeroed) and why, and
    (``Decision.extra_bytes``/``buffers``) the extra memory the chosen path
    allocates.  The policies (``deterministic``, ``max_extra_bytes``) resolve as
    in :func:`attention`.  Nothing runs; the decision cache is not touched."""
    deterministic, max_extra_bytes = _effective(deterministic, max_extra_bytes)
    o = CallOptions(mask, key_padding_mask, alibi_slopes, sinks, causal, dropout_p, scale,
                    layout, return_lse, window, softcap, deterministic, max_extra_bytes)
    return explain_options(backend, q, k, v, o)


def explain_options(backend: BackendArg, q: Tensor, k: Tensor, v: Tensor, o: CallOptions
                    ) -> Decision:
    """:func:`explain` for a :class:`CallOptions` (its policies already effective)."""
    selection, source = resolve(backend)
    spec = validate(q, k, v, o)
    decision = explain_spec(spec, selection, source, copies_for(spec, q, k, v, o))
    if decision.backend is None:
        return decision
    inst, _ = REGISTRY.load(decision.backend)
    q, k, v = bhsd(o, q, k, v)
    notes = memory_for(inst, spec, q, k, v, o.mask).notes  # type: ignore[arg-type]
    return dataclasses.replace(decision, copies=notes) if notes else decision

