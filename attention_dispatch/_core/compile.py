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

import dataclasses
import sys
from typing import Any, Callable, Optional

import torch

from .caches import register_cache
from .decide import Plan, decide, tuned
from .policy import effective as effective_policies
from .select import BackendArg, resolve
from .spec import TENSOR_OPTIONS, CallOptions, validate

Tensor = torch.Tensor
POLICY_FIELDS = ("deterministic", "max_extra_bytes")

_plans: list[Any] = []
_index: dict[tuple, int] = {}
# clear_cache() forgets which signature has which plan (the next trace decides
# again); the plans stay, as module attributes that compiled graphs read
register_cache("compile.index", _index.clear)


def _meta_const(t: Any) -> Optional[tuple]:
    if t is None:
        return None
    return (tuple(t.shape), str(t.dtype), t.requires_grad)


def constant_key(q: Any, k: Any, v: Any, o: CallOptions, backend: Any) -> tuple:
    """The call as Python constants (traceable): the selection, q/k/v shapes
    and dtypes, the device, whether gradients are needed, each tensor
    option's shape/dtype/requires_grad and the scalar options' values."""
    sel = backend if isinstance(backend, str) or backend is None else tuple(backend)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    scalars = tuple(tuple(x) if isinstance(x, list) else x for x in o[TENSOR_OPTIONS:])
    return (sel, tuple(q.shape), tuple(k.shape), tuple(v.shape), str(q.dtype), str(k.dtype),
            str(v.dtype), str(q.device), grad,
            tuple(_meta_const(t) for t in o[:TENSOR_OPTIONS]), scalars)


def plan_name(index: int) -> str:
    """The module attribute that holds plan ``index`` (``getattr(_compile,
    plan_name(i))`` in traced code)."""
    return f"_plan_{index}"


def _empty_like(shape: tuple, dtype: str, device: str, grad: bool = False) -> torch.Tensor:
    dt = getattr(torch, dtype.replace("torch.", ""))
    return torch.empty(shape, dtype=dt, device=device).requires_grad_(grad)


def make_decider(plan_at_trace: Callable[..., Any],
                 ambient: Callable[[tuple], tuple] = lambda key: ()
                 ) -> Callable[[tuple], int]:
    """``decide_constant(key) -> index`` into :data:`_plans`, run at trace time.

    ``ambient(key)``: what the decision also depends on besides the call (the
    selection ``use_backend`` / the environment resolve to, the effective
    policies); it joins the key, so a trace under another selection or policy
    is decided again."""

    def decide_constant(call_key: tuple) -> int:
        key = call_key + ambient(call_key)
        if key in _index:
            return _index[key]
        sel, qs, ks, vs, qd, kd, vd, dev, grad, tensors, scalars = call_key
        with torch.no_grad():
            q = _empty_like(qs, qd, "meta")
            k, v = _empty_like(ks, kd, "meta"), _empty_like(vs, vd, "meta")
        q.requires_grad_(grad)
        metas = [None if m is None else _empty_like(m[0], m[1], "meta", m[2]) for m in tensors]
        plan = plan_at_trace(sel, q, k, v, CallOptions(*metas, *scalars), torch.device(dev))
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


def plan_at_trace(backend: BackendArg, q: Tensor, k: Tensor, v: Tensor, o: CallOptions,
                  device: torch.device) -> Plan:
    """The plan for a traced call, from meta tensors standing for the real ones."""
    selection, _ = resolve(backend)
    o = o._replace(**dict(zip(POLICY_FIELDS, effective_policies(o.deterministic,
                                                                o.max_extra_bytes))))
    spec = validate(q, k, v, o)
    spec = dataclasses.replace(spec, device_type=device.type, device_index=device.index)
    return tuned(decide(spec, selection, o.scale, o.dropout_p), selection, None)


def trace_ambient(key: tuple) -> tuple:
    """The selection and policies a traced call is decided under (see
    :func:`make_decider`): ``key[0]`` is the call's backend argument and its
    last scalars the policy arguments."""
    det, limit = key[-1][-2:]
    return (resolve(key[0])[0], effective_policies(det, limit))


decide_constant = make_decider(plan_at_trace, trace_ambient)
