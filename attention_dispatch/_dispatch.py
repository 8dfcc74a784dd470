"""attention(), explain() and the decision cache."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from typing import Any, Callable, NamedTuple, Optional, Union

import torch

from . import _autotune, _compile, _events, _quarantine, _reliability, _verify
from ._backend import Backend
from ._decision import ACCEPTED, CHOSEN, REFUSED, SKIPPED, BackendVerdict, Decision
from ._errors import BackendRuntimeError, BackendUnavailable
from ._layout import MemoryPlan, apply_memory, plan_memory
from ._masks import alive_rows, zero_empty_rows
from ._ranking import ranked
from ._registry import REGISTRY
from ._select import AUTO, BackendArg, _context, env_selection, forget_env, forget_names, resolve
from ._spec import CallSpec, validate

logger = logging.getLogger("attention_dispatch")
Tensor = torch.Tensor
_MAX_ENTRIES = 4096
_grad_enabled = torch.is_grad_enabled


class _Plan(NamedTuple):
    """A cached decision: everything the hot path needs."""

    backend: Backend
    spec: CallSpec
    scale: float
    fix_rows: bool
    empty: bool  # Sq == 0 or Sk == 0: zeros without a kernel
    dropout_p: float
    selection: tuple[str, ...]  # for a runtime fallback
    direct: Optional[Callable[..., Any]] = None  # backend.forward when nothing else is needed
    # copies for the memory layout and key padding, decided for the strides of
    # the cache key (None: decided per call, e.g. after a fallback or when traced)
    memory: Optional[MemoryPlan] = None
    align: int = 0  # data-pointer alignment the hot path checks (0: none)


_plans: dict[tuple, _Plan] = {}
_lock = threading.Lock()


#: Functions clear_cache() also calls (other decision caches, e.g. attention_varlen's).
CLEAR_HOOKS: list[Any] = []


def clear_cache() -> None:
    """Forget every cached decision and probe, and re-read the environment."""
    with _lock:
        _plans.clear()
    for hook in CLEAR_HOOKS:
        hook()
    REGISTRY.clear_probes()
    _reliability.forget()
    forget_env()
    _autotune.forget_env()
    _quarantine.forget()
    _verify.forget()
    forget_names()


REGISTRY.listeners.append(clear_cache)


def _meta(t: Any) -> Any:
    if t is None:
        return None
    return (t.shape, t.dtype, t.device, t.requires_grad)


def _mask_meta(t: Any) -> Any:
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.requires_grad)


def _memory_for(backend: Backend, spec: CallSpec, q: Tensor, k: Tensor, v: Tensor,
                mask: Optional[Tensor]) -> MemoryPlan:
    """The copies ``backend`` needs for these tensors (bhsd views)."""
    caps = backend.capabilities
    clean = spec.key_padding and caps.key_padding and not caps.padded_keys_unread
    return plan_memory(backend.stride_requirements(spec), caps.native_layout, clean,
                       q, k, v, mask)


def _bind(plan: _Plan, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
          layout: str) -> _Plan:
    """``plan`` for tensors with the strides of these (the caller's layout):
    its memory plan, and the direct kernel call when nothing else is needed."""
    if layout == "bshd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    spec, inst = plan.spec, plan.backend
    mp = _memory_for(inst, spec, q, k, v, mask)
    simple = mp.idle and not (plan.fix_rows or plan.empty or spec.alibi
                              or (spec.key_padding and not inst.capabilities.key_padding))
    align = mp.req.pointer_alignment if mp.req.checks_pointers else 0
    return plan._replace(memory=mp, direct=inst.forward if simple else None, align=align)


def _candidates(selection: tuple[str, ...], device: torch.device,
                spec: Optional[CallSpec] = None) -> list[str]:
    names = REGISTRY.names()
    out: list[str] = []
    for n in selection:
        for c in (ranked(device, names, spec) if n == "auto" else [n]):
            if c not in out:
                out.append(c)
    return out


def _reasons(name: str, spec: CallSpec, forced: bool, canary: bool = True) -> list[str]:
    """Probe, per-call check, demotion memory (not for a forced selection: it
    runs and raises its own error), then (once) the numeric canary."""
    reasons = REGISTRY.probe(name, spec.device)
    if reasons:
        return reasons
    inst, _ = REGISTRY.load(name)
    try:
        reasons = list(inst.supports(spec))  # type: ignore[union-attr]
    except Exception as exc:
        return [f"supports() raised {type(exc).__name__}: {exc}"]
    if reasons:
        return reasons
    why = None if forced else (_reliability.demotion_reason(name, spec)
                               or _quarantine.reason(inst, spec))  # type: ignore[arg-type]
    if why is None and canary and spec.device.type != "meta":
        why = _reliability.canary(inst, spec)  # type: ignore[arg-type]
    return [why] if why else []


def _verdicts(spec: CallSpec, selection: tuple[str, ...], everyone: bool
              ) -> tuple[Optional[str], list[BackendVerdict]]:
    cands = _candidates(selection, spec.device, spec)
    chosen: Optional[str] = None
    verdicts = []
    others = [n for n in REGISTRY.names() if n not in cands] if everyone else []
    for rank, name in [(i, n) for i, n in enumerate(cands)] + [(None, n) for n in others]:
        if chosen is not None and not everyone:
            break
        # canaries run as dispatch runs them: up to the chosen backend; the rest
        # of explain()'s list only reports earlier results (a canary of a
        # compiled backend costs a compilation)
        reasons = _reasons(name, spec, "auto" not in selection,
                           canary=chosen is None and rank is not None)
        status = REFUSED if reasons else ACCEPTED
        if rank is None and not reasons:
            status = SKIPPED
            reasons = ["not in the selection " + ",".join(selection)]
        if status == ACCEPTED and chosen is None:
            chosen, status = name, CHOSEN
        inst, _ = REGISTRY.load(name)
        note = inst.version_note() if inst is not None else None
        verdicts.append(BackendVerdict(name, status, tuple(reasons), rank, note))
    return chosen, verdicts


def _decide(spec: CallSpec, selection: tuple[str, ...], scale: Optional[float],
            dropout_p: float) -> _Plan:
    chosen, verdicts = _verdicts(spec, selection, everyone=False)
    if chosen is None:
        raise BackendUnavailable(selection, {v.name: list(v.reasons) for v in verdicts})
    _events.emit(_events.DECISION, chosen, f"selection {','.join(selection)}", spec)
    eff_scale = float(scale) if scale is not None else 1.0 / math.sqrt(spec.head_dim)
    return _make_plan(chosen, spec, eff_scale, float(dropout_p), selection)


def _make_plan(name: str, spec: CallSpec, scale: float, dropout_p: float,
               selection: tuple[str, ...]) -> _Plan:
    """The plan that runs backend ``name`` for ``spec`` (``scale`` is final)."""
    inst, _ = REGISTRY.load(name)
    if inst is None:
        raise BackendUnavailable(selection, {name: ["failed to load"]})
    fix = spec.may_have_empty_rows and not inst.capabilities.empty_rows_exact
    empty = spec.seq_q == 0 or spec.seq_k == 0
    return _Plan(inst, spec, scale, fix, empty, dropout_p, selection)


def _tuned(plan: _Plan, selection: tuple[str, ...], args: Optional[tuple]) -> _Plan:
    """Apply autotune (see _autotune.mode) to a plan of a selection with "auto":
    "on" times new buckets (given the call's ``args``), "stored" uses stored
    decisions only, "off" nothing."""
    if "auto" not in selection:
        return plan
    mode = _autotune.mode()
    if mode == _autotune.OFF:
        return plan
    if mode == _autotune.ON and args is not None:
        return _autotuned(plan, selection, args)
    name = _autotune.stored_choice(plan.spec)
    if name is None or name == plan.backend.name:
        return plan
    spec = plan.spec
    if name not in _candidates(selection, spec.device, spec) or _reasons(name, spec, False):
        return plan  # stored for another install, or refused now: the ranking's choice
    _events.emit(_events.DECISION, name, f"tuned (stored) over {plan.backend.name}", spec)
    return _make_plan(name, spec, plan.scale, plan.dropout_p, selection)


def _eligible(spec: CallSpec, selection: tuple[str, ...]) -> list[str]:
    """Candidates of ``selection`` that accept ``spec``, in rank order."""
    _, verdicts = _verdicts(spec, selection, everyone=True)
    return [v.name for v in verdicts if v.rank is not None and not v.reasons]


def _runner(plan: _Plan, args: tuple) -> Callable[[str], Any]:
    """``run(name)``: the call ``args`` (q, k, v, mask, kpm, layout, alibi) on backend ``name``."""
    q, k, v, mask, kpm, layout, alibi_slopes = args
    if layout == "bshd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def run(name: str) -> Any:
        inst, _ = REGISTRY.load(name)
        return _forward(plan._replace(backend=inst), q, k, v, mask, kpm, alibi_slopes)

    return run


def _autotuned(plan: _Plan, selection: tuple[str, ...], args: tuple) -> _Plan:
    """Replace the ranked choice by the fastest correct eligible backend."""
    spec = plan.spec
    timer = _autotune.timer_for(spec, _runner(plan, args))
    best = _autotune.choose(spec, _eligible(spec, selection), timer)
    if best == plan.backend.name:
        return plan
    _events.emit(_events.DECISION, best, f"autotune picked it over {plan.backend.name}", spec)
    return _make_plan(best, spec, plan.scale, plan.dropout_p, selection)


def _plan_slow(key: Optional[tuple], selection: tuple[str, ...], q: Any, k: Any, v: Any,
               mask: Any, kpm: Any, causal: Any, dropout_p: Any, scale: Any, layout: Any,
               return_lse: Any, window: Any = None, softcap: Any = None,
               alibi_slopes: Any = None) -> _Plan:
    """Cache miss: validate, decide, remember."""
    _events.configure_from_env()
    spec = validate(q, k, v, mask=mask, key_padding_mask=kpm, causal=causal,
                    dropout_p=dropout_p, scale=scale, layout=layout, return_lse=return_lse,
                    window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    plan = _tuned(_decide(spec, selection, scale, dropout_p), selection,
                  (q, k, v, mask, kpm, layout, alibi_slopes))
    plan = _bind(plan, q, k, v, mask, layout)
    if key is not None:
        with _lock:
            if len(_plans) >= _MAX_ENTRIES:
                _plans.clear()
            _plans[key] = plan
    return plan


def _fallback(plan: _Plan, exc: Exception, q: Tensor, k: Tensor, v: Tensor,
              mask: Optional[Tensor], kpm: Optional[Tensor],
              alibi_slopes: Optional[Tensor] = None) -> tuple[_Plan, Tensor, Any]:
    """The chosen backend raised: demote it for this signature and run the next
    eligible one (q, k, v in the bhsd view), and the next while they raise too.
    Bad input, out-of-memory and a forced selection (no "auto") raise the
    original error instead.  The cached plans of this signature and selection
    then point to the backend that ran (one decision, logged once)."""
    stale: list[tuple] = []
    while True:
        name = plan.backend.name
        if not _reliability.may_fall_back(exc):
            raise exc
        if "auto" not in plan.selection:
            raise BackendRuntimeError(name, plan.selection, exc) from exc
        _reliability.demote(name, plan.spec, exc)
        with _lock:
            dropped = [k_ for k_, p in _plans.items() if p.backend is plan.backend
                       and p.spec == plan.spec]
            stale += [k_ for k_ in dropped if _plans[k_].selection == plan.selection]
            for key in dropped:
                del _plans[key]
        try:
            new = _decide(plan.spec, plan.selection, plan.scale, plan.dropout_p)
        except BackendUnavailable as unavailable:
            raise unavailable from exc
        _events.emit(_events.FALLBACK, new.backend.name, f"{name} raised "
                     f"{type(exc).__name__}: {str(exc)[:200]}", plan.spec, level=logging.INFO)
        try:
            out, lse = _forward(new, q, k, v, mask, kpm, alibi_slopes)
        except Exception as again:  # the next one fails too: demote it and go on
            plan, exc = new, again
            continue
        with _lock:
            for key in stale:
                _plans[key] = new
        return new, out, lse


def _plan_at_trace(backend: BackendArg, q: Tensor, k: Tensor, v: Tensor, mask: Any, kpm: Any,
                   causal: Any, dropout_p: Any, scale: Any, layout: Any, return_lse: Any,
                   device: torch.device, window: Any = None, softcap: Any = None,
                   alibi_slopes: Any = None) -> _Plan:
    """The plan for a traced call, from meta tensors standing for the real ones."""
    selection, _ = resolve(backend)
    spec = validate(q, k, v, mask=mask, key_padding_mask=kpm, causal=causal,
                    dropout_p=dropout_p, scale=scale, layout=layout, return_lse=return_lse,
                    window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    spec = dataclasses.replace(spec, device_type=device.type, device_index=device.index)
    return _tuned(_decide(spec, selection, scale, dropout_p), selection, None)


_decide_constant = _compile.make_decider(_plan_at_trace)
_compiling = torch.compiler.is_compiling
_verify_budget = _verify.budget


def _empty(q: Tensor, k: Tensor, v: Tensor, spec: CallSpec) -> tuple[Tensor, Tensor]:
    shape = (spec.batch, spec.heads_q, spec.seq_q)
    out = q.new_zeros(shape + (spec.head_dim_v,))
    if spec.requires_grad:  # zero, finite gradients
        out = out + 0.0 * (q.sum() + k.sum() + v.sum())
    return out, q.new_full(shape, float("-inf"), dtype=torch.float32)


def attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Optional[Tensor] = None,
              key_padding_mask: Optional[Tensor] = None, causal: bool = False,
              dropout_p: float = 0.0, scale: Optional[float] = None, layout: str = "bhsd",
              backend: BackendArg = "auto", return_lse: bool = False,
              window: Optional[tuple[int, int]] = None, softcap: Optional[float] = None,
              alibi_slopes: Optional[Tensor] = None
              ) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Scaled dot-product attention on the best backend that accepts the call.

    Shapes (layout="bhsd"): q (B, Hq, Sq, D), k (B, Hkv, Sk, D),
    v (B, Hkv, Sk, Dv) -> out (B, Hq, Sq, Dv).  layout="bshd" swaps the head
    and sequence axes of q, k, v and out.  Hq % Hkv == 0; query head h reads
    kv head h // (Hq // Hkv).

    Args:
        mask: bool (True = may attend) or float (added to the scores, -inf
            allowed), broadcastable to (B, Hq, Sq, Sk).
        key_padding_mask: bool (B, Sk), True = real key.
        causal: query i may attend key j iff j <= i + (Sk - Sq) (bottom-right).
        dropout_p: dropout on the attention weights, applied exactly when > 0.
        scale: score scale, default 1/sqrt(D).
        backend: "auto", a name, "a,b" or a list (first that accepts; "auto"
            expands to the ranking).  "auto" defers to :func:`use_backend`,
            then ATTENTION_DISPATCH_BACKEND.
        return_lse: also return lse (B, Hq, Sq) float32, natural log, detached
            (it carries no gradient on any backend).
        window: (left, right): query i may attend key j iff
            i + (Sk - Sq) - left <= j <= i + (Sk - Sq) + right; -1 = unbounded;
            combines with causal.  See docs/structured.md.
        softcap: c > 0: scores -> c * tanh(scores / c) before masks and biases.
        alibi_slopes: (Hq,) or (B, Hq) float32: adds -slope * |i + Sk - Sq - j|.

    Rows with no key they may attend give 0 (lse -inf, zero gradients).

    Equivalent math (float64 reference)::

        s = softcap * tanh(scale * q @ k.transpose(-1, -2) / softcap)  # if softcap
        s = s + float_mask - alibi_slope * abs(i + Sk - Sq - j)
        s = s.masked_fill(~(bool_mask & key_padding & causal_bottom_right & window), -inf)
        out = dropout(softmax(s, -1)) @ v        # rows of all -inf -> 0
        lse = logsumexp(s, -1)

    Raises:
        AttentionInputError / AttentionTypeError: bad input, before any kernel.
        BackendUnavailable: the selection names no backend that accepts the call.
    """
    if _compiling():  # torch.compile: decided at trace time, nothing left per call
        plan = getattr(_compile, _compile.plan_name(_decide_constant(_compile.constant_key(
            q, k, v, mask, key_padding_mask, causal, dropout_p, scale, layout, backend,
            return_lse, window, softcap, alibi_slopes))))
        return _run(plan, q, k, v, mask, key_padding_mask, layout, return_lse, alibi_slopes)
    # hot path: build the key, one dict lookup, one kernel call
    if backend == "auto":
        selection = _context.get() or env_selection() or AUTO
    else:
        selection = resolve(backend)[0]
    try:
        key = (selection, layout, q.shape, k.shape, v.shape, q.stride(), k.stride(),
               v.stride(), q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
               _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or (mask is not None and mask.requires_grad)),
               None if mask is None else _mask_meta(mask),
               None if key_padding_mask is None else _meta(key_padding_mask),
               causal, dropout_p, scale, return_lse,
               type(causal), type(dropout_p), type(scale), type(return_lse),
               window, softcap, type(softcap),
               None if alibi_slopes is None else _meta(alibi_slopes))
        plan = _plans.get(key)
    except (AttributeError, TypeError):  # not tensors, unhashable: validate() says what
        key, plan = None, None
    if plan is None:
        plan = _plan_slow(key, selection, q, k, v, mask, key_padding_mask, causal, dropout_p,
                          scale, layout, return_lse, window, softcap, alibi_slopes)
    if _verify_budget():  # verify mode (off by default: one context-variable read)
        return _verified(plan, key, q, k, v, mask, key_padding_mask, layout, return_lse,
                         alibi_slopes)
    direct = plan.direct
    if (direct is not None and layout == "bhsd" and not return_lse  # the common case
            and not (plan.align and (q.data_ptr() | k.data_ptr() | v.data_ptr()) % plan.align)):
        try:
            return direct(q, k, v, spec=plan.spec, mask=mask, key_padding_mask=key_padding_mask,
                          dropout_p=plan.dropout_p, scale=plan.scale)[0]
        except Exception as exc:
            return _run(plan, q, k, v, mask, key_padding_mask, layout, return_lse,
                        alibi_slopes, failure=exc)
    return _run(plan, q, k, v, mask, key_padding_mask, layout, return_lse, alibi_slopes)


def _verified(plan: _Plan, key: Optional[tuple], q: Tensor, k: Tensor, v: Tensor,
              mask: Optional[Tensor], kpm: Optional[Tensor], layout: str, return_lse: bool,
              alibi_slopes: Optional[Tensor]) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Run the call, then (the first N times per signature) check its output on
    a sample against the reference; a wrong result is quarantined and the call
    re-run on the next backend (auto) or raised (forced).  See ``_verify``."""
    res = _run(plan, q, k, v, mask, kpm, layout, return_lse, alibi_slopes)
    if plan.empty or _verify.skipped(plan.dropout_p, q) or not _verify.due(key, _verify_budget()):
        return res
    ran = _plans.get(key, plan) if key is not None else plan  # after a fallback: the new one
    out = res[0] if return_lse else res
    views = [q, k, v, out] if layout == "bhsd" else [t.transpose(1, 2) for t in (q, k, v, out)]
    math, _ = REGISTRY.load("math")
    why = _verify.check(ran.backend, math, ran.spec, views[0], views[1], views[2], mask,  # type: ignore[arg-type]
                        kpm, ran.scale, alibi_slopes, views[3])
    if why is None:
        return res
    _events.emit(_events.VERIFY, ran.backend.name, why, ran.spec, level=logging.WARNING)
    _quarantine.record(ran.backend, ran.spec, why)
    return _run(ran, q, k, v, mask, kpm, layout, return_lse, alibi_slopes,
                failure=_verify.WrongResultError(why))


def _forward(plan: _Plan, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
             kpm: Optional[Tensor], alibi_slopes: Optional[Tensor]) -> tuple[Tensor, Any]:
    """The kernel call (bhsd views): ``alibi_slopes=`` only when given; key
    padding through ``forward_varlen`` for a varlen backend without key_padding.
    First the copies the memory plan names (strides, pointers, key-padding slots)."""
    mp = plan.memory
    if mp is None:
        mp = _memory_for(plan.backend, plan.spec, q, k, v, mask)
    if not mp.idle or mp.req.checks_pointers:
        q, k, v, mask = apply_memory(mp, q, k, v, mask, kpm)
    if kpm is not None and not kpm.is_contiguous():  # (B, Sk) bools: a tiny copy
        kpm = kpm.contiguous()
    if kpm is not None and not plan.backend.capabilities.key_padding:
        from ._varlen import dense_via_varlen

        return dense_via_varlen(plan.backend, q, k, v, kpm, spec=plan.spec,
                                dropout_p=plan.dropout_p, scale=plan.scale)
    if alibi_slopes is None:
        return plan.backend.forward(q, k, v, spec=plan.spec, mask=mask, key_padding_mask=kpm,
                                    dropout_p=plan.dropout_p, scale=plan.scale)
    return plan.backend.forward(q, k, v, spec=plan.spec, mask=mask, key_padding_mask=kpm,
                                dropout_p=plan.dropout_p, scale=plan.scale,
                                alibi_slopes=alibi_slopes)  # type: ignore[call-arg]


def _run(plan: _Plan, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
         key_padding_mask: Optional[Tensor], layout: str, return_lse: bool,
         alibi_slopes: Optional[Tensor] = None, failure: Optional[Exception] = None
         ) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Run a plan: layout views, the kernel, the empty-row fix, the result.
    ``failure``: the plan's kernel already raised this (bhsd): fall back at once."""
    spec = plan.spec
    if layout == "bshd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if plan.empty:
        out, lse = _empty(q, k, v, spec)
    else:
        try:
            if failure is not None:
                raise failure
            out, lse = _forward(plan, q, k, v, mask, key_padding_mask, alibi_slopes)
        except Exception as exc:
            plan, out, lse = _fallback(plan, exc, q, k, v, mask, key_padding_mask,
                                       alibi_slopes)
        if plan.fix_rows:
            out, lse = zero_empty_rows(out, lse, alive_rows(spec, mask, key_padding_mask),
                                       (q, k, v))
    if layout == "bshd":
        out = out.transpose(1, 2)
    if return_lse:
        return out, lse.detach()  # type: ignore[union-attr]  # no kernel differentiates it
    return out


def explain(q: Tensor, k: Tensor, v: Tensor, *, mask: Optional[Tensor] = None,
            key_padding_mask: Optional[Tensor] = None, causal: bool = False,
            dropout_p: float = 0.0, scale: Optional[float] = None, layout: str = "bhsd",
            backend: BackendArg = "auto", return_lse: bool = False,
            window: Optional[tuple[int, int]] = None, softcap: Optional[float] = None,
            alibi_slopes: Optional[Tensor] = None) -> Decision:
    """Which backend :func:`attention` would run for these arguments, and, for
    every registered backend, whether it accepts the call or the exact reasons
    why not, and (``Decision.copies``) which tensors the chosen backend gets
    as copies (memory layout, key-padding slots zeroed) and why.  Nothing
    runs; the decision cache is not touched."""
    selection, source = resolve(backend)
    spec = validate(q, k, v, mask=mask, key_padding_mask=key_padding_mask, causal=causal,
                    dropout_p=dropout_p, scale=scale, layout=layout, return_lse=return_lse,
                    window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    decision = explain_spec(spec, selection, source)
    if decision.backend is None:
        return decision
    inst, _ = REGISTRY.load(decision.backend)
    if layout == "bshd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    notes = _memory_for(inst, spec, q, k, v, mask).notes  # type: ignore[arg-type]
    return dataclasses.replace(decision, copies=notes) if notes else decision


def explain_spec(spec: CallSpec, selection: tuple[str, ...] = ("auto",),
                 source: str = "argument") -> Decision:
    """:func:`explain` for a :class:`CallSpec` (no tensors needed).  When a
    tuning decision is stored for the call's bucket (and autotune is not
    "off"), it names the tuned backend: ``tuned`` is True, ``ranked`` is the
    ranking's own choice and ``source`` ends in "+tuned"."""
    chosen, verdicts = _verdicts(spec, selection, everyone=True)
    tuned = None
    if "auto" in selection and chosen is not None and _autotune.mode() != _autotune.OFF:
        eligible = [v.name for v in verdicts if v.rank is not None and not v.reasons]
        tuned = _autotune.cached_choice(spec, eligible)
    if tuned is None:
        return Decision(chosen, selection, source, spec, tuple(verdicts))
    status = {chosen: ACCEPTED, tuned: CHOSEN}
    verdicts = [dataclasses.replace(v, status=status.get(v.name, v.status)) for v in verdicts]
    return Decision(tuned, selection, source + "+tuned", spec, tuple(verdicts), tuned=True,
                    ranked=chosen)
