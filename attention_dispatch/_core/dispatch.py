"""attention(), explain() and the decision cache.

The path of one call: :func:`attention` builds the cache key from q, k, v,
the selection and the :class:`~.spec.CallOptions`; a hit gives a
:class:`~.decide.Plan` and one kernel call.  A miss validates the call
(:func:`~.spec.validate` -> ``CallSpec``), chooses a backend
(:mod:`.decide`), decides the copies its kernel needs (:mod:`.layout`) and
stores the plan.  Under ``torch.compile`` the decision is made at trace time
(:mod:`.compile`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional, Union

import torch

from . import autotuning as _autotune, compile as _compile, eventlog as _events
from . import policy as _policy, quarantine as _quarantine
from . import reliability as _reliability, verification as _verify
from .backend import Backend
from .binding import bhsd, bind, memory_for, plain_call
from .caches import clear_all, register_cache
from .decide import Plan, decide, takes_cut, tuned
from .errors import AttentionInputError, AttentionTypeError, BackendUnavailable
from .guards import memo, never, recall, tensor_check
from .layout import apply_memory
from .masks import alive_rows, empty_result, sink_lse, zero_empty_rows
from .maskvalues import cut_call, cut_padding
from .registry import REGISTRY
from .selfcheck import check_call
from .select import AUTO, BackendArg, _context, env_selection, resolve
from .spec import (CallOptions, CallSpec, keyword_tensors, options_key,
                   validate)

logger = logging.getLogger("attention_dispatch")
Tensor = torch.Tensor
_MAX_ENTRIES = 4096
_grad_enabled = torch.is_grad_enabled

_plans: dict[tuple, Plan] = {}
_lock = threading.Lock()
# the last plain call's (check, selection, causal, dropout_p, scale, grad, key,
# plan, plan.plain, plan.align, use_backend's selection or None), see _plain, made
# only while the environment sets no policy and no verification (see _neutral),
# and the last other call's (see _general_hit); reset with every change to
# _plans and by clear_cache, which also re-reads the environment
_memo: list[Optional[tuple]] = [None, None]
_checks: dict[tuple, Callable[..., bool]] = {}


def forget_plans() -> None:
    """Forget the cached decisions of dense calls."""
    with _lock:
        _plans.clear()
        _checks.clear()
        _memo[0] = _memo[1] = None


register_cache("dispatch.plans", forget_plans)


def clear_cache() -> None:
    """Forget every cached decision and probe, and re-read the environment
    (every in-memory cache registered with ``caches.register_cache``)."""
    clear_all()


REGISTRY.listeners.append(clear_cache)


def call_key(selection: tuple[str, ...], q: Any, k: Any, v: Any, o: CallOptions) -> tuple:
    """The decision cache key (TypeError / AttributeError for arguments that
    are not tensors or not hashable: ``validate`` then says what is wrong)."""
    grad = _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                or (o.mask is not None and o.mask.requires_grad)
                                or (o.sinks is not None and o.sinks.requires_grad))
    return (selection, q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(),
            q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, grad, options_key(o))


def timer(plan: Plan, q: Tensor, k: Tensor, v: Tensor, o: CallOptions
          ) -> Callable[[str], Optional[float]]:
    """Autotune's ``timer(name)`` for this call: a small-call check against the
    float64 reference (``selfcheck``), then the time of this call on ``name``."""
    qb, kb, vb = bhsd(o, q, k, v)
    spec = plan.spec

    def run(name: str) -> Any:
        inst, _ = REGISTRY.load(name)
        return _forward(plan._replace(backend=inst), qb, kb, vb, o)

    return _autotune.timer_for(spec, run, lambda name: check_call(call, name, spec))


def copies_for(spec: CallSpec, q: Tensor, k: Tensor, v: Tensor, o: CallOptions
               ) -> Callable[[Backend], int]:
    """``copies(backend)``: the bytes its memory plan copies for these tensors."""
    qb, kb, vb = bhsd(o, q, k, v)
    return lambda inst: memory_for(inst, spec, qb, kb, vb, o.mask).nbytes


def plan_call(key: Optional[tuple], selection: tuple[str, ...], q: Any, k: Any, v: Any,
              o: CallOptions) -> Plan:
    """Cache miss: validate, decide, remember (under ``key``, unless None)."""
    _events.configure_from_env()
    spec = validate(q, k, v, o)
    copies = copies_for(spec, q, k, v, o) if spec.max_extra_bytes is not None else None
    plan = decide(spec, selection, o.scale, o.dropout_p, copies)
    plan = bind(tuned(plan, selection, timer(plan, q, k, v, o)), q, k, v, o)
    _policy.warn_if_large(plan.backend, spec, selection)
    if key is not None:
        with _lock:
            if len(_plans) >= _MAX_ENTRIES:
                _plans.clear()
                _checks.clear()
            _memo[0] = _memo[1] = None
            _plans[key] = plan
    return plan


def _fallback(plan: Plan, exc: Exception, q: Tensor, k: Tensor, v: Tensor,
              o: CallOptions) -> tuple[Plan, Tensor, Any]:
    """The chosen backend raised: demote it for this signature and run the next
    eligible one (q, k, v in the bhsd view), and the next while they raise too.
    Bad input, out-of-memory and a forced selection (no "auto") raise the
    original error instead.  The cached plans of this signature and selection
    then point to the backend that ran (one decision, logged once)."""
    stale: list[tuple] = []
    while True:
        name = plan.backend.name
        _reliability.demote_or_raise(name, plan.selection, plan.spec, exc)
        with _lock:
            dropped = [k_ for k_, p in _plans.items() if p.backend is plan.backend
                       and p.spec == plan.spec]
            stale += [k_ for k_ in dropped if _plans[k_].selection == plan.selection]
            for key in dropped:
                del _plans[key]
            _memo[0] = _memo[1] = None
        try:
            copies = None if plan.spec.max_extra_bytes is None else (  # bhsd views here
                lambda inst: memory_for(inst, plan.spec, q, k, v, o.mask).nbytes)
            new = decide(plan.spec, plan.selection, plan.scale, plan.dropout_p, copies)
        except BackendUnavailable as unavailable:
            raise unavailable from exc
        _events.emit(_events.FALLBACK, new.backend.name, f"{name} raised "
                     f"{type(exc).__name__}: {str(exc)[:200]}", plan.spec, level=logging.INFO)
        try:
            out, lse = _forward(new, q, k, v, o)
        except Exception as again:  # the next one fails too: demote it and go on
            plan, exc = new, again
            continue
        with _lock:
            _memo[0] = _memo[1] = None
            for key in stale:
                _plans[key] = new
        return new, out, lse


_effective = _policy.effective
_compiling = torch.compiler.is_compiling
_verify_budget = _verify.budget
# what the remembered plain signature needs of the ambient state, read inline
# by attention(): the same use_backend selection (or none) as when it was made,
# no use_policy or verify context, torch's flag off.  The environment's
# selection, policies and verify count are read once per process (until
# clear_cache, which forgets the signature too): a signature is remembered only
# while they set no policy and no verification (_neutral)
_pol_ctx, _pol_env = _policy._context_get, _policy._env_get
_torch_det = _policy._torch_deterministic
_ver_ctx, _ver_env = _verify._var.get, _verify._env


def _neutral() -> bool:
    """No constraining policy or verification from the environment (both read)
    and no use_policy: ATTENTION_DISPATCH_DETERMINISTIC unset or false, no
    memory cap, no verify count."""
    env = _pol_env("p")
    return (env is not None and not env.deterministic and env.max_extra_bytes is None
            and _ver_env[0] == 0 and _pol_ctx() is None)


def call(selection: tuple[str, ...], q: Tensor, k: Tensor, v: Tensor, o: CallOptions
         ) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Run a validated-on-miss call: the hot path of :func:`attention`, also
    used by the packed route of ``attention_varlen`` (``selection`` resolved)."""
    hit = _general_hit(selection, q, k, v, o)
    if hit is not None:
        return _call_planned(selection, hit[0], hit[1], q, k, v, o)
    try:
        key: Optional[tuple] = call_key(selection, q, k, v, o)
        plan = _plans.get(key)  # type: ignore[arg-type]
    except (AttributeError, TypeError):  # not tensors, unhashable: validate() says what
        key, plan = None, None
    if plan is not None:
        _remember(key, plan, selection, q, k, v, o)  # type: ignore[arg-type]
    return _call_planned(selection, key, plan, q, k, v, o)


def _general_hit(selection: tuple[str, ...], q: Tensor, k: Tensor, v: Tensor,
                 o: CallOptions) -> Optional[tuple[tuple, Plan]]:
    """The last call's key and plan (see :func:`_remember`) when this call has
    the same cache key (:func:`.guards.recall`)."""
    return recall(_memo[1], selection, (q, k, v), o)


def _remember(key: tuple, plan: Plan, selection: tuple[str, ...], q: Tensor, k: Tensor,
              v: Tensor, o: CallOptions) -> None:  # the one _general_hit checks first
    m = memo(_checks, key, plan, selection, (q, k, v), o)
    if m is None:
        return
    with _lock:  # not a plan another thread just dropped (a fallback, a demotion)
        if _plans.get(key) is plan:
            _memo[1] = m


def _call_planned(selection: tuple[str, ...], key: Optional[tuple], plan: Optional[Plan],
                  q: Tensor, k: Tensor, v: Tensor, o: CallOptions
                  ) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """:func:`call` after the cache lookup (``plan`` None: a miss)."""
    if plan is None:
        plan = plan_call(key, selection, q, k, v, o)
    if _verify_budget():  # verify mode (off by default: one context-variable read)
        return _verified(plan, key, q, k, v, o)
    if plan.cut:  # key padding that ends at one place: the plain call on fewer keys
        bshd = o.layout == "bshd"
        qb, kb, vb = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)) if bshd else (
            q, k, v)
        try:
            out = cut_call(plan, qb, kb, vb, o.key_padding_mask, plain_call, takes_cut)
        except Exception as exc:
            return _run(plan, q, k, v, o, failure=exc)
        if out is not None:
            return out.transpose(1, 2) if bshd else out
    direct = plan.direct
    if (direct is not None  # the common case: nothing but the kernel call
            and not (plan.align and (q.data_ptr() | k.data_ptr() | v.data_ptr()) % plan.align)):
        bshd = o.layout == "bshd"
        qb, kb, vb = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)) if bshd else (
            q, k, v)
        try:
            if plan.plain is not None:  # no mask, no lse: the plain kernel call
                out, lse = plan.plain(qb, kb, vb), None
            else:
                out, lse = direct(qb, kb, vb, spec=plan.spec, mask=o.mask,
                                  key_padding_mask=o.key_padding_mask,
                                  dropout_p=plan.dropout_p, scale=plan.scale)
        except Exception as exc:
            return _run(plan, q, k, v, o, failure=exc)
        if plan.fix_rows:
            out, lse = zero_empty_rows(out, lse, alive_rows(plan.spec, o.mask, None), (qb, kb, vb))
        if bshd:
            out = out.transpose(1, 2)
        return (out, lse.detach()) if o.return_lse else out
    return _run(plan, q, k, v, o)


def _plain(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float,
           scale: Optional[float]) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """:func:`attention` for the plain call (auto, no tensor option, bhsd, no
    lse, window or softcap; bool ``causal``, float ``dropout_p``, ``scale``
    None or a float): the last plain signature's plan when q, k, v, the
    selection and the scalars match it (a C-level check, :mod:`.guards`), else
    a shorter cache key; then the plan's ``plain`` kernel call.  A miss, verify
    mode, an unaligned pointer or a plan without a plain call: _call_planned."""
    selection = _context.get() or env_selection() or AUTO
    m = _memo[0]
    if (m is not None and m[0](q, k, v) and m[1] == selection and m[2] is causal
            and m[3] == dropout_p and m[4] == scale
            and (m[5] is None or m[5] == _grad_enabled())):
        key, plan = m[6], m[7]
    else:
        try:
            key, plan = _plain_lookup(selection, q, k, v, causal, dropout_p, scale)
        except (AttributeError, TypeError):  # not tensors: validate() says what
            key, plan = None, None
    if plan is not None and plan.plain is not None and not _verify_budget():
        if not (plan.align and (q.data_ptr() | k.data_ptr() | v.data_ptr()) % plan.align):
            try:
                return plan.plain(q, k, v)
            except Exception as exc:
                o = CallOptions(causal=causal, dropout_p=dropout_p, scale=scale)
                return _run(plan, q, k, v, o, failure=exc)
    o = CallOptions(causal=causal, dropout_p=dropout_p, scale=scale)
    return _call_planned(selection, key, plan, q, k, v, o)


def _plain_bshd(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float,
                scale: Optional[float]) -> Optional[Tensor]:
    """:func:`attention` for the plain call in layout "bshd": the "bhsd" plain
    call (:func:`_plain`, its remembered signature) on q, k, v with the head and
    sequence axes swapped (views), its output swapped back.  None where that
    call is not the whole story: not 4-d tensors, a policy in effect, or bad
    input (the bshd path then validates and words the error in
    the caller's layout; nothing has run)."""
    try:
        qb, kb, vb = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    except (AttributeError, TypeError, IndexError, RuntimeError):
        return None
    if qb.dim() != 4 or kb.dim() != 4 or vb.dim() != 4:
        return None
    det, cap = _effective(None, None)
    if not ((det is None or det is False) and cap is None):
        return None
    try:
        out = _plain(qb, kb, vb, causal, dropout_p, scale)
    except (AttentionInputError, AttentionTypeError):
        return None
    return out.transpose(1, 2)


def _plain_lookup(selection: tuple[str, ...], q: Tensor, k: Tensor, v: Tensor, causal: bool,
                  dropout_p: float, scale: Optional[float]) -> tuple[tuple, Optional[Plan]]:
    """The plain call's cache key and plan (None: a miss); a hit with a plain
    kernel call becomes the remembered signature."""
    needs = q.requires_grad or k.requires_grad or v.requires_grad
    grad = _grad_enabled() and needs
    key = (selection, q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(),
           q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, grad,
           causal, dropout_p, scale)
    plan = _plans.get(key)
    if plan is not None and plan.plain is not None:
        check = _checks.get(key)
        if check is None:
            check = _checks[key] = tensor_check(q, k, v) or never
        if check is not never and _neutral():
            memo = (check, selection, causal, dropout_p, scale, grad if needs else None,
                    key, plan, plan.plain, plan.align, _context.get())
            with _lock:  # not a plan another thread just dropped
                if _plans.get(key) is plan:
                    _memo[0] = memo
    return key, plan


def attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Optional[Tensor] = None,
              key_padding_mask: Optional[Tensor] = None, causal: bool = False,
              dropout_p: float = 0.0, scale: Optional[float] = None, layout: str = "bhsd",
              backend: BackendArg = "auto", return_lse: bool = False,
              window: Optional[tuple[int, int]] = None, softcap: Optional[float] = None,
              alibi_slopes: Optional[Tensor] = None, sinks: Optional[Tensor] = None,
              deterministic: Optional[bool] = None, max_extra_bytes: Optional[int] = None
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
        sinks: (Hq,) float32 or q's dtype, may need a gradient: attention
            sinks, one logit per query head, a virtual key with a zero value
            in every row's softmax (out = sum_j e^s_j v_j / (e^sinks[h] +
            sum_j e^s_j)); lse then includes it.  With dropout, the real keys'
            probabilities are dropped out (the sink's mass is just removed).
        deterministic: True: only backends whose forward (and, with gradients,
            backward) is deterministic; False: no constraint; None: defer to
            :func:`use_policy`, ATTENTION_DISPATCH_DETERMINISTIC, then torch's
            deterministic mode.  See docs/selection.md "Policies".
        max_extra_bytes: refuse paths whose estimated extra memory (score
            matrices, materialised masks, copies) exceeds this many bytes;
            None: defer to use_policy, then ATTENTION_DISPATCH_MAX_EXTRA_BYTES.

    Rows with no key they may attend give 0 (lse -inf, or sinks[h] with sinks;
    zero gradients).

    Equivalent math (float64 reference)::

        s = softcap * tanh(scale * q @ k.transpose(-1, -2) / softcap)  # if softcap
        s = s + float_mask - alibi_slope * abs(i + Sk - Sq - j)
        s = s.masked_fill(~(bool_mask & key_padding & causal_bottom_right & window), -inf)
        out = dropout(softmax(s, -1)) @ v        # rows of all -inf -> 0
        lse = logsumexp(s, -1)
        # with sinks: a column s_sink[h] appended to s for the softmax and the
        # lse, dropped before @ v:  out *= sigmoid(lse - s_sink); lse = logaddexp(lse, s_sink)

    Raises:
        AttentionInputError / AttentionTypeError: bad input, before any kernel.
        BackendUnavailable: the selection names no backend that accepts the call.
    """
    if _compiling():  # torch.compile: decided at trace time, nothing left per call
        o = CallOptions(mask, key_padding_mask, alibi_slopes, sinks, causal, dropout_p, scale,
                        layout, return_lse, window, softcap, deterministic, max_extra_bytes)
        plan = getattr(_compile, _compile.plan_name(_compile.decide_constant(
            _compile.constant_key(q, k, v, o, backend))))
        return _run(plan, q, k, v, o)
    if (mask is None and key_padding_mask is None and alibi_slopes is None and sinks is None
            and window is None and softcap is None and return_lse is False and layout == "bhsd"
            and (causal is False or causal is True) and type(dropout_p) is float
            and (scale is None or type(scale) is float) and backend == "auto"):
        m = _memo[0]  # the remembered plain signature, all of it checked inline
        if (m is not None and deterministic is None and max_extra_bytes is None
                and m[0](q, k, v) and m[2] is causal and m[3] == dropout_p and m[4] == scale
                and _context.get() is m[10] and (m[5] is None or m[5] == _grad_enabled())
                and _pol_ctx() is None and _ver_ctx() is None and not _torch_det()
                and not (m[9] and (q.data_ptr() | k.data_ptr() | v.data_ptr()) % m[9])):
            try:
                return m[8](q, k, v)
            except Exception as exc:
                return _run(m[7], q, k, v, CallOptions(causal=causal, dropout_p=dropout_p,
                                                       scale=scale), failure=exc)
        deterministic, max_extra_bytes = _effective(deterministic, max_extra_bytes)
        if (deterministic is None or deterministic is False) and max_extra_bytes is None:
            return _plain(q, k, v, causal, dropout_p, scale)  # the common call: a shorter key
    elif (layout == "bshd" and mask is None and key_padding_mask is None and alibi_slopes is None
            and sinks is None and window is None and softcap is None and return_lse is False
            and (causal is False or causal is True) and type(dropout_p) is float
            and (scale is None or type(scale) is float) and backend == "auto"
            and deterministic is None and max_extra_bytes is None):
        out = _plain_bshd(q, k, v, causal, dropout_p, scale)
        if out is not None:
            return out
        deterministic, max_extra_bytes = _effective(deterministic, max_extra_bytes)
    else:
        deterministic, max_extra_bytes = _effective(deterministic, max_extra_bytes)
    o = CallOptions(mask, key_padding_mask, alibi_slopes, sinks, causal, dropout_p, scale,
                    layout, return_lse, window, softcap, deterministic, max_extra_bytes)
    if backend == "auto":
        selection = _context.get() or env_selection() or AUTO
    else:
        selection = resolve(backend)[0]
    return call(selection, q, k, v, o)


def _verified(plan: Plan, key: Optional[tuple], q: Tensor, k: Tensor, v: Tensor,
              o: CallOptions) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Run the call, then (the first N times per signature) check its output on
    a sample against the reference; a wrong result is quarantined and the call
    re-run on the next backend (auto) or raised (forced).  See ``verify``."""
    res = _run(plan, q, k, v, o)
    if plan.empty or _verify.skipped(o.dropout_p, q) or not _verify.due(key, _verify_budget()):
        return res
    ran = _plans.get(key, plan) if key is not None else plan  # after a fallback: the new one
    out = res[0] if o.return_lse else res
    views = [q, k, v, out] if o.layout == "bhsd" else [t.transpose(1, 2) for t in (q, k, v, out)]
    math, _ = REGISTRY.load("math")
    why = _verify.check(ran.backend, math, ran.spec, views[0], views[1], views[2],  # type: ignore[arg-type]
                        o.mask, o.key_padding_mask, ran.scale, o.alibi_slopes, views[3],
                        o.sinks)
    if why is None:
        return res
    _events.emit(_events.VERIFY, ran.backend.name, why, ran.spec, level=logging.WARNING)
    _quarantine.record(ran.backend, ran.spec, why)
    return _run(ran, q, k, v, o, failure=_verify.WrongResultError(why))


def _forward(plan: Plan, q: Tensor, k: Tensor, v: Tensor, o: CallOptions,
             cut: Union[None, bool, tuple[int, CallSpec]] = None) -> tuple[Tensor, Any]:
    """The kernel call (bhsd views): tensor options beyond the masks as keywords,
    only when given; key padding through ``forward_varlen`` for a varlen backend
    without key_padding.  First the copies the memory plan names (strides,
    pointers, key-padding slots).  Key padding that ends every row's real keys
    at one place (``maskvalues.cut_padding``) is the call on the keys before
    it, without key padding: nothing to zero, no mask to build (``cut``: that
    cut when the caller looked already, False for none)."""
    mask, kpm, spec = o.mask, o.key_padding_mask, plan.spec
    mp = plan.memory
    if mp is None:
        mp = memory_for(plan.backend, spec, q, k, v, mask)
    if cut is None and kpm is not None:
        cut = cut_padding(spec, kpm, plan.backend, takes_cut)
    if cut:
        n, spec = cut  # type: ignore[misc]
        k, v, kpm = k.narrow(2, 0, n), v.narrow(2, 0, n), None
        if mask is not None and mask.shape[-1] != 1:
            mask = mask.narrow(-1, 0, n)
    if mp.req.checks_pointers or not (mp.idle if kpm is not None else mp.copies_nothing):
        q, k, v, mask = apply_memory(mp, q, k, v, mask, kpm)
    if kpm is not None and not kpm.is_contiguous():  # (B, Sk) bools: a tiny copy
        kpm = kpm.contiguous()
    if kpm is not None and not plan.backend.capabilities.key_padding:
        from .packing import dense_via_varlen

        return dense_via_varlen(plan.backend, q, k, v, kpm, spec=spec,
                                dropout_p=plan.dropout_p, scale=plan.scale,
                                **keyword_tensors(o))
    return plan.backend.forward(q, k, v, spec=spec, mask=mask, key_padding_mask=kpm,
                                dropout_p=plan.dropout_p, scale=plan.scale,
                                **keyword_tensors(o))


def _run(plan: Plan, q: Tensor, k: Tensor, v: Tensor, o: CallOptions,
         failure: Optional[Exception] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Run a plan: layout views, the kernel, the empty-row fix, the result.
    ``failure``: the plan's kernel already raised this (bhsd): fall back at once."""
    spec = plan.spec
    q, k, v = bhsd(o, q, k, v)
    if plan.empty:
        out, lse = empty_result(q, k, v, spec)
    else:
        kpm = o.key_padding_mask
        cut = (kpm is not None and cut_padding(spec, kpm, plan.backend, takes_cut)) or False
        try:
            if failure is not None:
                raise failure
            out, lse = _forward(plan, q, k, v, o, cut)
        except Exception as exc:
            if _compiling():  # tracing: the trace's own error, no fallback traced
                raise
            plan, out, lse = _fallback(plan, exc, q, k, v, o)
        # a cut leaves no row without a key unless a mask does
        if plan.fix_rows and not (cut and o.mask is None):
            out, lse = zero_empty_rows(out, lse, alive_rows(spec, o.mask, o.key_padding_mask),
                                       (q, k, v))
    if o.layout == "bshd":
        out = out.transpose(1, 2)
    if o.return_lse:
        if o.sinks is not None:  # rows fixed to -inf above hold their sink's logit
            lse = sink_lse(lse, o.sinks.detach()[:, None])  # type: ignore[arg-type]
        return out, lse.detach()  # type: ignore[union-attr]  # no kernel differentiates it
    return out
