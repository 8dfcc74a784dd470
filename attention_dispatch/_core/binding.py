"""Binding a decided plan to the memory of a call's tensors.

A plan (``decide.Plan``) says which backend runs a call signature; binding adds
what the tensors' strides and pointers ask for: the memory plan (copies the
kernel's rule needs), the pointer alignment checked per call, and the shortest
call that is left - ``forward`` alone, or the backend's plain kernel call
(``Backend.plain_call``) for calls without masks or lse.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .backend import Backend
from .decide import Plan
from .layout import MemoryPlan, plan_memory
from .spec import CallOptions, CallSpec, keyword_tensors

Tensor = torch.Tensor


def bhsd(o: CallOptions, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if o.layout == "bshd":
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return q, k, v


def memory_for(backend: Backend, spec: CallSpec, q: Tensor, k: Tensor, v: Tensor,
                mask: Optional[Tensor]) -> MemoryPlan:
    """The copies ``backend`` needs for these tensors (bhsd views)."""
    caps = backend.capabilities
    clean = spec.key_padding and caps.key_padding and not caps.padded_keys_unread
    return plan_memory(backend.stride_requirements(spec), caps.native_layout, clean,
                       q, k, v, mask)


def bind(plan: Plan, q: Tensor, k: Tensor, v: Tensor, o: CallOptions) -> Plan:
    """``plan`` for tensors with the strides of these (the caller's layout):
    its memory plan, and the direct kernel call when nothing else is needed."""
    q, k, v = bhsd(o, q, k, v)
    spec, inst = plan.spec, plan.backend
    mp = memory_for(inst, spec, q, k, v, o.mask)
    simple = mp.idle and not (plan.empty or keyword_tensors(o) or (spec.key_padding and (
        plan.fix_rows or not inst.capabilities.key_padding)))  # (mask rows fixed after it)
    align = mp.req.pointer_alignment if mp.req.checks_pointers else 0
    plain = None
    if (simple and not plan.fix_rows and o.mask is None and o.key_padding_mask is None
            and not o.return_lse):
        plain = plain_call(inst, spec, plan.scale, plan.dropout_p, q, k, v)
    cut = (spec.key_padding and mp.copies_nothing and not (
        align or plan.empty or o.mask is not None or o.return_lse or keyword_tensors(o)))
    return plan._replace(memory=mp, direct=inst.forward if simple else None, align=align,
                         plain=plain, cut=cut)


def plain_call(inst: Backend, spec: CallSpec, scale: float, dropout_p: float,
                q: Tensor, k: Tensor, v: Tensor) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``out = f(q, k, v)`` for a plan with nothing but the kernel to run and no
    mask: the backend's own (``Backend.plain_call``) or its ``forward``.  A
    ``forward`` replaced on the instance (a wrapper that records or profiles
    calls) is always called: then the backend's own plain call is not used."""
    own = None if "forward" in vars(inst) else inst.plain_call(spec, scale, dropout_p, q, k, v)
    if own is not None:
        return own
    fwd = inst.forward

    def plain(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return fwd(q, k, v, spec=spec, mask=None, key_padding_mask=None, dropout_p=dropout_p,
                   scale=scale)[0]

    return plain
