"""torch.compile support: the decision is made once, at trace time.

Under ``torch.compile`` (``fullgraph=True`` included) :func:`attention` does not
run its eager cache (a ``ContextVar`` read and a dict keyed by tensors, which
dynamo cannot trace).  It builds a key of Python constants (shapes, dtypes,
devices, flags, the selection) and calls :func:`decide_constant`, which dynamo
runs eagerly while tracing and folds into the graph as a constant
(``_dynamo_marked_constant``, what ``torch._dynamo.assume_constant_result`` sets).
The compiled graph holds only the chosen kernel: zero dispatch cost per call.

Consequence: a compiled function keeps the backend chosen when it was traced;
``use_backend``/environment changes apply after ``torch._dynamo.reset()``.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch

_plans: list[Any] = []
_index: dict[tuple, int] = {}


def _meta_const(t: Any) -> Optional[tuple]:
    if t is None:
        return None
    return (tuple(t.shape), str(t.dtype), t.requires_grad)


def constant_key(q: Any, k: Any, v: Any, mask: Any, kpm: Any, causal: Any, dropout_p: Any,
                 scale: Any, layout: Any, backend: Any, return_lse: Any, window: Any = None,
                 softcap: Any = None, alibi_slopes: Any = None) -> tuple:
    """The call as Python constants (traceable: shapes, dtypes, flags, the
    window and softcap values, the ALiBi slopes' shape and dtype)."""
    sel = backend if isinstance(backend, str) or backend is None else tuple(backend)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    win = None if window is None else tuple(window)
    return (sel, layout, tuple(q.shape), tuple(k.shape), tuple(v.shape), str(q.dtype),
            str(k.dtype), str(v.dtype), str(q.device), grad, _meta_const(mask),
            _meta_const(kpm), causal, dropout_p, scale, return_lse, win, softcap,
            _meta_const(alibi_slopes))


def plan_name(index: int) -> str:
    """The module attribute that holds plan ``index`` (``getattr(_compile,
    plan_name(i))`` in traced code)."""
    return f"_plan_{index}"


def _empty_like(shape: tuple, dtype: str, device: str, grad: bool = False) -> torch.Tensor:
    dt = getattr(torch, dtype.replace("torch.", ""))
    return torch.empty(shape, dtype=dt, device=device).requires_grad_(grad)


def make_decider(plan_slow: Callable[..., Any]) -> Callable[[tuple], int]:
    """``decide_constant(key) -> index`` into :data:`_plans`, run at trace time."""

    def decide_constant(key: tuple) -> int:
        if key in _index:
            return _index[key]
        (sel, layout, qs, ks, vs, qd, kd, vd, dev, grad, mk, pk, causal, p, scale, lse,
         window, softcap, ak) = key
        with torch.no_grad():
            q = _empty_like(qs, qd, "meta")
            k, v = _empty_like(ks, kd, "meta"), _empty_like(vs, vd, "meta")
        q.requires_grad_(grad)
        mask = None if mk is None else _empty_like(mk[0], mk[1], "meta")
        kpm = None if pk is None else _empty_like(pk[0], pk[1], "meta")
        slopes = None if ak is None else _empty_like(ak[0], ak[1], "meta", ak[2])
        plan = plan_slow(sel, q, k, v, mask, kpm, causal, p, scale, layout, lse,
                         torch.device(dev), window=window, softcap=softcap,
                         alibi_slopes=slopes)
        _plans.append(plan)
        _index[key] = len(_plans) - 1
        # also a module attribute of its own: dynamo reads ``_plans`` once per
        # traced frame (its length then), so a second new signature traced in
        # the same frame would index past that snapshot; a fresh attribute name
        # is read when the traced code reaches it (see :func:`plan_name`)
        setattr(sys.modules[__name__], plan_name(_index[key]), plan)
        return _index[key]

    decide_constant._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return decide_constant
