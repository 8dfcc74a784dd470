"""Choosing a backend for a call: candidates in rank order, the reasons each
refuses, the plan that runs the chosen one, and stored or measured tuning.

Nothing here caches per call signature (``dispatch`` does) or runs a kernel,
except the one-time numeric canary and, with autotune "on", the timing of
eligible backends.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import torch

from . import autotuning as _autotune, eventlog as _events, quarantine as _quarantine
from . import policy as _policy, reliability as _reliability
from .backend import Backend
from .decision import ACCEPTED, CHOSEN, REFUSED, SKIPPED, BackendVerdict, Decision
from .errors import BackendUnavailable
from .layout import MemoryPlan, describe_bytes
from .ranking import ranked
from .registry import REGISTRY
from .spec import CallSpec, effective_scale

#: ``copies(backend)``: the bytes the memory plan copies for that backend, for
#: these tensors (known at a real call, not for a bare CallSpec)
Copies = Optional[Callable[[Backend], int]]


class Plan(NamedTuple):
    """A decision: everything the hot path needs to run a call signature."""

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
    # out = plain(q, k, v) (bhsd views) for the call without mask or lse, when
    # ``direct`` is set (bound with this plan's spec, scale and dropout)
    plain: Optional[Callable[..., Any]] = None
    # key padding, nothing else to do (no copies, mask, lse or tensor option):
    # the call may run as the plain call on the keys before a cut (maskvalues)
    cut: bool = False


class RoutePlan(NamedTuple):
    """A decision of a structured entry point (varlen, paged): the backend,
    whether it takes the call natively (``forward_varlen`` / ``forward_paged``)
    or through the equivalent dense call, the call's spec and final scale."""

    backend: Backend
    native: bool
    spec: CallSpec
    scale: float


def candidates(selection: tuple[str, ...], device: torch.device,
               spec: Optional[CallSpec] = None) -> list[str]:
    """The backends ``selection`` names, "auto" expanded to the ranking, in order."""
    names = REGISTRY.names()
    out: list[str] = []
    for n in selection:
        for c in (ranked(device, names, spec) if n == "auto" else [n]):
            if c not in out:
                out.append(c)
    return out


def reasons(name: str, spec: CallSpec, forced: bool, canary: bool = True,
            copies: Copies = None) -> list[str]:
    """Why backend ``name`` cannot take ``spec`` (empty: it can).  Probe,
    per-call check, the policies (deterministic, max_extra_bytes; forced
    selections too), demotion memory and quarantine (not for a forced
    selection: it runs and raises its own error), then (once) the numeric canary."""
    why = REGISTRY.probe(name, spec.device)
    if why:
        return why
    inst, _ = REGISTRY.load(name)
    try:
        why = list(inst.supports(spec))  # type: ignore[union-attr]
    except Exception as exc:
        return [f"supports() raised {type(exc).__name__}: {exc}"]
    if why:
        return why
    try:
        why = _policy.reasons(inst, spec, copies)  # type: ignore[arg-type]
    except Exception as exc:
        return [f"policy check raised {type(exc).__name__}: {exc}"]
    if why:
        return why
    one = None if forced else (_reliability.demotion_reason(name, spec)
                               or _quarantine.reason(inst, spec))  # type: ignore[arg-type]
    if one is None and canary and spec.device.type != "meta":
        one = _reliability.canary(inst, spec)  # type: ignore[arg-type]
    return [one] if one else []


def _extra(inst: Optional[Backend], spec: CallSpec, copies: Copies) -> Optional[int]:
    """The estimated extra bytes of an accepting backend (None: unknown)."""
    if inst is None:
        return None
    try:
        return _policy.extra_bytes(inst, spec, copies)
    except Exception:  # a plugin's estimate never breaks a decision
        return None


def verdicts(spec: CallSpec, selection: tuple[str, ...], everyone: bool,
             copies: Copies = None) -> tuple[Optional[str], list[BackendVerdict]]:
    """(the chosen backend or None, a verdict per candidate; with ``everyone``
    also for the registered backends outside the selection).  Accepting
    backends carry their estimated extra memory."""
    cands = candidates(selection, spec.device, spec)
    chosen: Optional[str] = None
    out = []
    others = [n for n in REGISTRY.names() if n not in cands] if everyone else []
    for rank, name in [(i, n) for i, n in enumerate(cands)] + [(None, n) for n in others]:
        if chosen is not None and not everyone:
            break
        # canaries run as dispatch runs them: up to the chosen backend; the rest
        # of explain()'s list only reports earlier results (a canary of a
        # compiled backend costs a compilation)
        why = reasons(name, spec, "auto" not in selection,
                      canary=chosen is None and rank is not None, copies=copies)
        status = REFUSED if why else ACCEPTED
        if rank is None and not why:
            status = SKIPPED
            why = ["not in the selection " + ",".join(selection)]
        if status == ACCEPTED and chosen is None:
            chosen, status = name, CHOSEN
        inst, _ = REGISTRY.load(name)
        note = inst.version_note() if inst is not None else None
        extra = _extra(inst, spec, copies) if status != REFUSED else None  # type: ignore
        out.append(BackendVerdict(name, status, tuple(why), rank, note, extra))
    return chosen, out


def eligible(spec: CallSpec, selection: tuple[str, ...]) -> list[str]:
    """Candidates of ``selection`` that accept ``spec``, in rank order."""
    _, vs = verdicts(spec, selection, everyone=True)
    return [v.name for v in vs if v.rank is not None and not v.reasons]


def decide(spec: CallSpec, selection: tuple[str, ...], scale: Optional[float],
           dropout_p: float, copies: Copies = None) -> Plan:
    """The plan of the first candidate that accepts ``spec`` (``copies``: the
    memory plan's bytes per backend, for ``max_extra_bytes``).

    Raises:
        BackendUnavailable: none does (with every candidate's reasons).
    """
    chosen, vs = verdicts(spec, selection, everyone=False, copies=copies)
    if chosen is None:
        raise BackendUnavailable(selection, {v.name: list(v.reasons) for v in vs})
    _events.emit(_events.DECISION, chosen, f"selection {','.join(selection)}", spec)
    eff_scale = effective_scale(scale, spec.head_dim)
    return make_plan(chosen, spec, eff_scale, float(dropout_p), selection)


def make_plan(name: str, spec: CallSpec, scale: float, dropout_p: float,
              selection: tuple[str, ...]) -> Plan:
    """The plan that runs backend ``name`` for ``spec`` (``scale`` is final)."""
    inst, _ = REGISTRY.load(name)
    if inst is None:
        raise BackendUnavailable(selection, {name: ["failed to load"]})
    fix = spec.may_have_empty_rows and not inst.capabilities.empty_rows_exact
    empty = spec.seq_q == 0 or spec.seq_k == 0
    return Plan(inst, spec, scale, fix, empty, dropout_p, selection)


def tuned(plan: Plan, selection: tuple[str, ...],
          timer: Optional[Callable[[str], Optional[float]]]) -> Plan:
    """Apply autotune (see ``autotune.mode``) to a plan of a selection with
    "auto": "on" times new buckets (``timer(name)``: ms of the real call on
    backend ``name``, None if incorrect or failing; see ``autotune.timer_for``),
    "stored" uses stored decisions only, "off" nothing."""
    if "auto" not in selection:
        return plan
    mode = _autotune.mode()
    if mode == _autotune.OFF:
        return plan
    spec = plan.spec
    if mode == _autotune.ON and timer is not None:
        best = _autotune.choose(spec, eligible(spec, selection), timer)
        why = f"autotune picked it over {plan.backend.name}"
    else:
        best = _autotune.stored_choice(spec)
        why = f"tuned (stored) over {plan.backend.name}"
        if best is not None and best != plan.backend.name and (
                best not in candidates(selection, spec.device, spec)
                or reasons(best, spec, False)):
            return plan  # stored for another install, or refused now: the ranking's choice
    if best is None or best == plan.backend.name:
        return plan
    _events.emit(_events.DECISION, best, why, spec)
    return make_plan(best, spec, plan.scale, plan.dropout_p, selection)


def explain_spec(spec: CallSpec, selection: tuple[str, ...] = ("auto",),
                 source: str = "argument", copies: Copies = None) -> Decision:
    """:func:`~attention_dispatch.explain` for a :class:`CallSpec` (no tensors
    needed).  When a tuning decision is stored for the call's bucket (and
    autotune is not "off"), it names the tuned backend: ``tuned`` is True,
    ``ranked`` is the ranking's own choice and ``source`` ends in "+tuned".
    ``extra_bytes``/``buffers`` estimate the chosen path's extra memory
    (``copies``: the memory plan's bytes per backend, when tensors are known)."""
    chosen, vs = verdicts(spec, selection, everyone=True, copies=copies)
    best = None
    if "auto" in selection and chosen is not None and _autotune.mode() != _autotune.OFF:
        ok = [v.name for v in vs if v.rank is not None and not v.reasons]
        best = _autotune.cached_choice(spec, ok)
    if best is None:
        return _with_memory(Decision(chosen, selection, source, spec, tuple(vs)), copies)
    status = {chosen: ACCEPTED, best: CHOSEN}
    vs = [dataclasses.replace(v, status=status.get(v.name, v.status)) for v in vs]
    return _with_memory(Decision(best, selection, source + "+tuned", spec, tuple(vs),
                                 tuned=True, ranked=chosen), copies)


def _with_memory(d: Decision, copies: Copies) -> Decision:
    """``d`` with the chosen path's extra-memory estimate, item by item."""
    if d.backend is None:
        return d
    inst, _ = REGISTRY.load(d.backend)
    if inst is None:
        return d
    try:
        bufs = _policy.buffers(inst, d.spec, copies)
    except Exception:
        return d
    return dataclasses.replace(d, extra_bytes=sum(b.nbytes for b in bufs),
                               buffers=tuple(f"{b.what}: {describe_bytes(b.nbytes)}"
                                             + (" (O(Sq*Sk))" if b.quadratic else "")
                                             for b in bufs))


def takes_cut(backend: Backend, spec: CallSpec) -> bool:
    """Whether ``backend`` takes the key-padding cut's shorter call ``spec`` as
    it took the call it was chosen for: its capabilities and checks (limits may
    depend on Sk), no new kernel to compile (a backend that compiles per
    shape), no demotion or quarantine record (``maskvalues.cut_padding``)."""
    if backend.supports(spec):
        return False
    if backend.compiles_per_shape and not backend.compiled(spec):
        return False
    return (_reliability.demotion_reason(backend.name, spec) is None
            and _quarantine.reason(backend, spec) is None)
