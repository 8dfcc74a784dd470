"""Runtime fallback, demotion memory and the numeric canary.

* A backend that raises at run time for a reason other than bad input or
  out-of-memory is *demoted* for that call signature for the rest of the
  process; the call is retried on the next eligible backend with the same
  semantics.  One warning per (backend, error type), not per call.
* The canary: the first time a backend is chosen on a device for a dtype, it
  runs once on a tiny case and is compared with the float64 reference; a
  backend that fails is demoted on that device and dtype (reason in explain()).
  ``ATTENTION_DISPATCH_CANARY=0`` turns it off.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Optional

import torch

from . import eventlog as _events
from .backend import Backend
from .errors import AttentionInputError, BackendRuntimeError
from .spec import CallSpec
from .caches import register_cache

ENV_CANARY = "ATTENTION_DISPATCH_CANARY"

_lock = threading.Lock()
_demoted: dict[tuple[str, CallSpec], str] = {}
_demoted_device: dict[tuple[str, torch.device, torch.dtype], str] = {}
_warned: set[tuple[str, str]] = set()
_canary_done: set[tuple[str, torch.device, torch.dtype]] = set()
_canary_locks: dict[tuple[str, torch.device, torch.dtype], threading.RLock] = {}
_canary_running: set[tuple[str, torch.device, torch.dtype]] = set()


class FallbackWarning(UserWarning):
    """A backend failed at run time; the call ran on another backend."""


_OOM_TEXT = ("out of memory", "can't allocate memory", "not enough memory")


def is_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError, MemoryError, or an allocator's message (the CPU
    allocator raises a RuntimeError "DefaultCPUAllocator: can't allocate memory")."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if (oom is not None and isinstance(exc, oom)) or isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(t in text for t in _OOM_TEXT)


def may_fall_back(exc: BaseException) -> bool:
    """Bad input and out-of-memory are never hidden by a fallback."""
    return isinstance(exc, Exception) and not isinstance(exc, AttentionInputError) \
        and not is_oom(exc)


def demote_or_raise(name: str, selection: tuple[str, ...], spec: CallSpec,
                    exc: Exception) -> None:
    """The rule when backend ``name`` raised at run time: bad input and
    out-of-memory re-raise ``exc``, a forced selection (no "auto") raises
    :class:`BackendRuntimeError`; otherwise ``name`` is demoted for ``spec``
    (warned once) and the caller runs the next eligible backend."""
    if not may_fall_back(exc):
        raise exc
    if "auto" not in selection:
        raise BackendRuntimeError(name, selection, exc) from exc
    demote(name, spec, exc)


def demotion_reason(name: str, spec: CallSpec) -> Optional[str]:
    """Why ``name`` is demoted for ``spec`` (signature or device-wide), or None."""
    why = _demoted.get((name, spec))
    if why is None:
        why = _demoted_device.get((name, spec.device, spec.dtype))
    return why


def demote(name: str, spec: CallSpec, exc: BaseException) -> None:
    """Remember the failure; warn once per (backend, error type)."""
    reason = f"demoted after a runtime failure: {type(exc).__name__}: {exc}"[:300]
    with _lock:
        _demoted[(name, spec)] = reason
        first = (name, type(exc).__name__) not in _warned
        _warned.add((name, type(exc).__name__))
    _events.emit(_events.DEMOTION, name, reason, spec)
    if first:
        warnings.warn(f"attention_dispatch: backend {name!r} failed at run time "
                      f"({type(exc).__name__}: {str(exc)[:200]}); falling back to the next "
                      "eligible backend for this call signature", FallbackWarning, stacklevel=4)


def forget() -> None:
    """Forget demotions, warnings and canary results (ad.clear_cache)."""
    with _lock:
        _demoted.clear()
        _demoted_device.clear()
        _warned.clear()
        _canary_done.clear()
        _canary_locks.clear()


register_cache("reliability", forget)


def canary_enabled() -> bool:
    return os.environ.get(ENV_CANARY, "1").strip().lower() not in ("0", "false", "no", "off")


def canary(backend: Backend, spec: CallSpec) -> Optional[str]:
    """Check ``backend`` once per (device, dtype) on a tiny case; the failure
    reason (also recorded as a device-wide demotion), or None if it passed."""
    key = (backend.name, spec.device, spec.dtype)
    if key in _canary_done or not canary_enabled():
        return _demoted_device.get(key)
    with _lock:
        key_lock = _canary_locks.setdefault(key, threading.RLock())
    # other threads wait for the verdict instead of using the backend meanwhile
    with key_lock:
        if key in _canary_done or key in _canary_running:  # done meanwhile, or re-entered
            return _demoted_device.get(key)
        _canary_running.add(key)
        try:
            why = _run_canary(backend, spec)  # out-of-memory propagates: tried again later
        finally:
            _canary_running.discard(key)
        with _lock:
            if why is not None:
                _demoted_device[key] = why
            _canary_done.add(key)
    _events.emit(_events.CANARY, backend.name, why or "passed", spec)
    if why is not None:
        warnings.warn(f"attention_dispatch: backend {backend.name!r} failed its numeric "
                      f"check on {spec.device} {spec.dtype}: {why}; not used there",
                      FallbackWarning, stacklevel=4)
    return why


def _run_canary(backend: Backend, spec: CallSpec) -> Optional[str]:
    """A 1x2x8 self-attention case with the call's dtype, head dims and GQA."""
    import dataclasses
    import math

    from .reference import atol, reference_attention

    tiny = dataclasses.replace(spec, batch=1, seq_q=8, seq_k=8, mask_kind="none",
                               key_padding=False, causal=False, dropout=False,
                               return_lse=False, requires_grad=False, mask_grad=False,
                               heads_q=spec.heads_q // spec.heads_kv, heads_kv=1,
                               window=None, softcap=None, alibi=False, varlen=False,
                               paged=False, block_size=0)
    if backend.supports(tiny):
        return None  # cannot express the tiny case: nothing to check
    g = torch.Generator().manual_seed(1234)
    q, k, v = (torch.randn(1, h, 8, d, generator=g) for h, d in (
        (tiny.heads_q, tiny.head_dim), (1, tiny.head_dim), (1, tiny.head_dim_v)))
    scale = 1.0 / math.sqrt(tiny.head_dim)
    try:
        with torch.no_grad():
            out, _ = backend.forward(*(t.to(spec.device, spec.dtype) for t in (q, k, v)),
                                     spec=tiny, mask=None, key_padding_mask=None,
                                     dropout_p=0.0, scale=scale)
        ref, _ = reference_attention(q, k, v)
        if tuple(out.shape) != tuple(ref.shape):
            return (f"numeric check failed: output shape {tuple(out.shape)}; expected "
                    f"{tuple(ref.shape)}")
        err = (out.double().cpu() - ref).abs().max().item()
    except Exception as exc:  # a kernel that cannot even run the tiny case
        if is_oom(exc):
            raise  # out-of-memory is never hidden, nor remembered as a failure
        return f"numeric check raised {type(exc).__name__}: {str(exc)[:200]}"
    bound = 10 * atol(spec.dtype) * (1 + ref.abs().max().item())
    if not err <= bound:  # NaN fails too
        return f"numeric check failed: max error {err:.3g} > {bound:.3g} vs the float64 reference"
    return None
