"""Facts derived from the values of small bool masks on the CPU, remembered by
those values.

What a call needs from a mask's values - its additive bias, which query rows
have no key, where key padding ends, the index of the padded K/V slots - is
derived once per distinct value instead of once per call, for bool masks on
the CPU of at most :data:`LIMIT` elements.  The cache key is the mask's shape
and its bytes (the values themselves, read on the host: no device sync on the
CPU), so a mask changed in place is another key: nothing is keyed on a
tensor's identity.  Larger masks, float masks, other devices, traced calls
(and hosts without numpy) derive everything per call, as before.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch

from .caches import register_cache
from .spec import CallSpec

Tensor = torch.Tensor
#: the most elements a mask may have for its derived facts to be remembered
LIMIT = 4096
#: the most elements of a remembered tensor (a bias may be (B, 1, Sq, Sk))
MAX_TENSOR = 1 << 16
_MAX_ENTRIES = 256  # of at most MAX_TENSOR elements each: a few tens of MiB at most
_MISS = object()
_derived: dict[tuple, Any] = {}
register_cache("masks.values", _derived.clear)
_compiling = torch.compiler.is_compiling
_BOOL = torch.bool


def value_key(t: Optional[Tensor]) -> Optional[tuple]:
    """``()`` for None; ``(shape, bytes)`` of a small bool CPU tensor; None
    where the values are not remembered (then derive per call)."""
    if t is None:
        return ()
    if t.dtype is not _BOOL or not t.is_cpu or t.numel() > LIMIT or _compiling():
        return None
    try:
        return (t.shape, t.numpy().tobytes())
    except (RuntimeError, TypeError):  # no numpy, a tensor subclass, a functorch wrapper
        return None


def derived(key: tuple, make: Callable[[], Any]) -> Any:
    """The value remembered under ``key`` (computed by ``make`` the first time).
    ``make`` must return what depends on nothing but the key: tensors it returns
    are shared by every call with this key and never written.  ``make`` runs
    outside inference mode (a tensor made there could not be saved for a later
    call's backward), and a result holding a tensor of more than
    :data:`MAX_TENSOR` elements (e.g. a bias with causal folded in) is returned
    but not remembered, so the cache stays a few MiB."""
    hit = _derived.get(key, _MISS)
    if hit is _MISS:
        with torch.inference_mode(False):
            hit = make()
        if _size(hit) > MAX_TENSOR:
            return hit
        if len(_derived) >= _MAX_ENTRIES:
            _derived.clear()
        _derived[key] = hit
    return hit


def _size(value: Any) -> int:
    """The elements of the largest tensor in ``value`` (a tensor or a tuple)."""
    if isinstance(value, Tensor):
        return value.numel()
    if isinstance(value, tuple):
        return max((_size(x) for x in value), default=0)
    return 0


def padding_end(kpm: Tensor) -> Optional[tuple[int, bool]]:
    """``(n, dense)`` of a key padding mask (B, Sk): ``n`` one past the last
    real key of any batch row (0: no real key), ``dense`` whether every key
    before ``n`` is real in every row.  None where not remembered."""
    vk = value_key(kpm)
    if vk is None:
        return None
    return derived(("end", vk), lambda: _padding_end(kpm))


def _padding_end(kpm: Tensor) -> tuple[int, bool]:
    real = kpm.any(0)
    n = int(real.nonzero().max()) + 1 if bool(real.any()) else 0
    return n, bool(kpm[:, :n].all())


def shorter(spec: CallSpec, seq_k: int, key_padding: bool) -> CallSpec:
    """``spec`` with ``seq_k`` keys (and key padding or not), remembered per
    spec object (held by the entry, so its id is not reused meanwhile)."""
    got = _derived.get(("spec", id(spec), seq_k, key_padding))
    if got is not None and got[0] is spec:
        return got[1]
    new = dataclasses.replace(spec, seq_k=seq_k, key_padding=key_padding)
    derived(("spec", id(spec), seq_k, key_padding), lambda: (spec, new))
    return new


def padded_slots(kpm: Tensor) -> Tensor:
    """``~kpm[:, None, :, None]``: the K/V slots (B, 1, Sk, 1) key padding excludes."""
    vk = value_key(kpm)
    if vk is None:
        return ~kpm[:, None, :, None]
    return derived(("slots", vk), lambda: ~kpm[:, None, :, None])


def cut_padding(spec: CallSpec, kpm: Tensor, backend: object = None,
                takes: Optional[Callable[[Any, CallSpec], bool]] = None
                ) -> Optional[tuple[int, CallSpec]]:
    """Where every key before the last real key of any batch row is real and
    nothing depends on Sk's value (no causal, window, ALiBi; a dense call):
    ``(n, spec)``, the call on the first ``n`` keys without key padding - the
    same result, and no key padding slot is read or needs zeroing.  None
    otherwise (and for a batch without any real key: rows with no key), and
    where ``takes(backend, shorter spec)`` is False (the dispatcher's test that
    the backend takes the shorter call as it took the longer one)."""
    if (spec.causal or spec.window is not None or spec.alibi or spec.varlen or spec.paged
            or not spec.key_padding):
        return None
    vk = value_key(kpm)
    if vk is None:
        return None
    key = ("cut", id(spec), vk, id(backend))
    got = _derived.get(key)  # the entry holds spec and backend: their ids stay theirs
    if got is None or got[0] is not spec or got[1] is not backend:
        n, dense = derived(("end", vk), lambda: _padding_end(kpm))
        cut = (n, shorter(spec, n, False)) if dense and n else None
        if cut is not None and takes is not None and not takes(backend, cut[1]):
            cut = None
        got = (spec, backend, cut)
        derived(key, lambda: got)
    return got[2]


def cut_call(plan: Any, q: Tensor, k: Tensor, v: Tensor, kpm: Tensor,
             make: Callable[..., Callable[[Tensor, Tensor, Tensor], Tensor]],
             takes: Optional[Callable[[Any, CallSpec], bool]] = None) -> Optional[Tensor]:
    """``out`` of a key-padding call with nothing else to do (``Plan.cut``: no
    copies, mask, lse or tensor option) as the plain kernel call on the keys
    before its cut (:func:`cut_padding`), q, k, v bhsd views; None where the
    call has no cut.  ``make(backend, spec, scale, dropout_p, q, k, v)`` gives
    the plain call, built once per plan and cut."""
    cut = cut_padding(plan.spec, kpm, plan.backend, takes)
    if cut is None:
        return None
    n, spec = cut
    k, v = k.narrow(2, 0, n), v.narrow(2, 0, n)
    got = _derived.get(("plain", id(plan), n))  # the entry holds plan: its id stays its own
    if got is None or got[0] is not plan:
        got = (plan, make(plan.backend, spec, plan.scale, plan.dropout_p, q, k, v))
        derived(("plain", id(plan), n), lambda: got)
    return got[1](q, k, v)
