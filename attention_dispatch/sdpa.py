"""torch's ``scaled_dot_product_attention``, dispatched: a drop-in and a patch.

:func:`scaled_dot_product_attention` has torch's signature and semantics and
runs through :func:`attention_dispatch.attention` (auto selection,
``use_backend``, ``ATTENTION_DISPATCH_BACKEND``, events); :func:`explain_sdpa`
says which backend such a call runs on.  :func:`patch_sdpa` routes
``torch.nn.functional.scaled_dot_product_attention`` through it for code that
calls torch's function.  No module of this package calls torch's function (the
adapters call torch's aten kernels directly), so a patched process never calls
itself; :data:`TORCH_SDPA` is torch's own function, captured at import.

Translation into the contract (docs/integrations.md):

* ``is_causal`` is top-left (query ``i`` sees key ``j <= i``); the contract's
  ``causal`` is bottom-right.  Sq == Sk: the same.  Sq < Sk: keys ``j >= Sq``
  are never seen, so K/V (and the mask's key axis) are sliced to the first Sq
  keys (views) and the call is square-causal.  Sq > Sk:
  ``window=(-1, Sq - Sk)`` without ``causal`` (``j <= i`` exactly).  No
  ``(Sq, Sk)`` mask is built for either.
* ``enable_gqa``: grouped, query head ``h`` reads kv head ``h // (Hq // Hkv)``,
  as in the contract.
* Inputs of any rank >= 2 with torch's broadcasting of the leading dims.
* A bool ``attn_mask`` of shape (B|1, 1, 1, S) (the same keys for every head
  and query: padding) is given as ``key_padding_mask``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional

import torch

from ._core import (AttentionInputError, AttentionTypeError, BackendArg, Decision, attention,
                    explain)


Tensor = torch.Tensor

#: torch's own function (the C++ binding), whatever is patched later.
TORCH_SDPA: Callable[..., Tensor] = torch._C._nn.scaled_dot_product_attention

_RENAMED = {"q": "query", "k": "key", "v": "value", "mask": "attn_mask", "causal": "is_causal"}


class _Call:
    """One translated call: bhsd q, k, v, attention() keywords, output shape."""

    __slots__ = ("q", "k", "v", "kwargs", "out_shape", "drop_all")

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, kwargs: dict[str, Any],
                 out_shape: tuple[int, ...], drop_all: bool) -> None:
        self.q, self.k, self.v = q, k, v
        self.kwargs, self.out_shape, self.drop_all = kwargs, out_shape, drop_all


def _check_args(query: Any, key: Any, value: Any, attn_mask: Any, dropout_p: Any,
                is_causal: Any, enable_gqa: Any) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise AttentionTypeError(name, "a torch.Tensor", type(t).__name__)
        if t.dim() < 2:
            raise AttentionInputError(name, "a tensor of rank >= 2 (..., L, E)",
                                      f"{t.dim()}-D tensor")
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise AttentionTypeError("attn_mask", "a bool or float torch.Tensor or None",
                                 type(attn_mask).__name__)
    if attn_mask is not None and attn_mask.dtype != torch.bool \
            and not attn_mask.dtype.is_floating_point:
        raise AttentionTypeError("attn_mask", "dtype bool (True = may attend) or a float "
                                 "dtype (added to the scores)", str(attn_mask.dtype))
    for name, flag in (("is_causal", is_causal), ("enable_gqa", enable_gqa)):
        if not isinstance(flag, bool):
            raise AttentionTypeError(name, "a bool", type(flag).__name__)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) \
            or not 0.0 <= dropout_p <= 1.0:
        raise AttentionInputError("dropout_p", "a float in [0, 1]", repr(dropout_p))


def _heads(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool
           ) -> tuple[int, int]:
    """(heads of q after broadcasting, heads of k/v after broadcasting)."""
    hq, hk, hv = (t.shape[-3] if t.dim() >= 3 else 1 for t in (query, key, value))
    if enable_gqa:
        if hk != hv:
            raise AttentionInputError("value", f"{hk} heads (as key) with enable_gqa=True",
                                      f"{hv} heads")
        if hk == 0 or hq % hk:
            raise AttentionInputError("key", f"a number of heads dividing query's {hq} "
                                      "(enable_gqa=True)", f"{hk} heads")
        return hq, hk
    try:
        h = torch.broadcast_shapes((hq,), (hk,), (hv,))[0]
    except RuntimeError:
        raise AttentionInputError("key", f"{hq} heads (as query) or 1, or enable_gqa=True "
                                  "for grouped heads", f"key {hk}, value {hv} heads") from None
    # one kv head shared by every query head is the contract's MQA: no expansion
    return h, (hk if hk == hv else h)


def _to_bhsd(t: Tensor, batch: tuple[int, ...], heads: int) -> Tensor:
    """(..., H|1, L, E) -> (prod(batch), heads, L, E): broadcast, then fold."""
    shape = batch + (heads,) + tuple(t.shape[-2:])
    if tuple(t.shape) != shape:
        while t.dim() < len(shape):
            t = t.unsqueeze(0)
        t = t.expand(shape)
    return t.reshape((-1,) + shape[-3:]) if len(batch) != 1 else t


def _fold_mask(mask: Tensor, batch: tuple[int, ...], heads: int, sq: int, sk: int) -> Tensor:
    """attn_mask broadcastable to batch + (Hq, Sq, Sk) -> at most 4-D, same meaning."""
    full = batch + (heads, sq, sk)
    try:
        torch.broadcast_shapes(tuple(mask.shape), full)
    except RuntimeError:
        raise AttentionInputError("attn_mask", f"a shape broadcastable to {full}",
                                  str(tuple(mask.shape))) from None
    if len(batch) == 1 and mask.dim() <= 4:
        return mask if mask.dim() >= 2 else mask.reshape(1, -1)
    while mask.dim() < len(full):
        mask = mask.unsqueeze(0)
    lead = mask.shape[:len(batch)]
    if all(n == 1 for n in lead):
        return mask.reshape(mask.shape[len(batch):])
    return mask.expand(batch + tuple(mask.shape[len(batch):])).reshape(
        (-1,) + tuple(mask.shape[len(batch):]))


def _translate(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
               dropout_p: float, is_causal: bool, scale: Optional[float],
               enable_gqa: bool) -> _Call:
    _check_args(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    hq, hkv = _heads(query, key, value, enable_gqa)
    try:
        batch = tuple(torch.broadcast_shapes(*(t.shape[:-3] for t in (query, key, value))))
    except RuntimeError:
        raise AttentionInputError("key", f"leading dims broadcastable with query's "
                                  f"{tuple(query.shape[:-3])}",
                                  f"{tuple(key.shape[:-3])}") from None
    rank = max(t.dim() for t in (query, key, value))
    sq, sk, ev = query.shape[-2], key.shape[-2], value.shape[-1]
    out_shape = (batch + (hq, sq, ev))[-rank:] if rank >= 3 else (sq, ev)
    fold = batch if batch else (1,)
    q, k, v = _to_bhsd(query, fold, hq), _to_bhsd(key, fold, hkv), _to_bhsd(value, fold, hkv)
    mask = None if attn_mask is None else _fold_mask(attn_mask, fold, hq, sq, sk)
    kwargs: dict[str, Any] = {"mask": mask, "scale": scale,
                              "dropout_p": 0.0 if dropout_p >= 1.0 else float(dropout_p)}
    if is_causal and sq <= sk:
        if sq < sk:  # top-left: keys j >= Sq are never seen; the rest is square
            k, v = k[:, :, :sq], v[:, :, :sq]
            if mask is not None and mask.shape[-1] != 1:
                kwargs["mask"] = mask[..., :sq]
        kwargs["causal"] = True
    elif is_causal:  # Sq > Sk: j <= i + (Sk - Sq) + right with right = Sq - Sk
        kwargs["window"] = (-1, sq - sk)
    m = kwargs["mask"]
    if m is not None and m.dtype == torch.bool and m.dim() == 4 and m.shape[1:3] == (1, 1):
        # the same keys for every head and query: key padding, which kernels take natively
        kwargs["mask"] = None
        kwargs["key_padding_mask"] = m[:, 0, 0].expand(q.shape[0], k.shape[2])
    return _Call(q, k, v, kwargs, out_shape, drop_all=dropout_p >= 1.0)


def _renamed(exc: AttentionInputError) -> AttentionInputError:
    """An error of attention() with the argument named as in torch's signature."""
    if type(exc) not in (AttentionInputError, AttentionTypeError) \
            or exc.argument not in _RENAMED:
        return exc
    return type(exc)(_RENAMED[exc.argument], exc.expected, exc.got)


def _sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
          dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool,
          backend: BackendArg) -> Tensor:
    call = _translate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    try:
        out = attention(call.q, call.k, call.v, backend=backend, **call.kwargs)
    except AttentionInputError as exc:
        new = _renamed(exc)
        if new is exc:
            raise
        raise new from exc
    if call.drop_all:  # dropout_p == 1: every weight dropped, as torch does
        out = out * 0.0  # type: ignore[operator]
    return out.reshape(call.out_shape)  # type: ignore[union-attr]


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, *, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``, on the backend
    :func:`attention_dispatch.attention` picks (auto, ``use_backend``,
    ``ATTENTION_DISPATCH_BACKEND``).

    Same signature (``scale`` and ``enable_gqa`` keyword-only, as in torch) and
    semantics: query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev)
    -> (..., Hq, L, Ev); leading dims broadcast; ``attn_mask`` bool (True =
    may attend) or float (added to the scores), broadcastable to (..., Hq, L, S);
    ``is_causal`` top-left (query i sees key j <= i; combines with attn_mask);
    ``enable_gqa``: query head h reads kv head h // (Hq // Hkv); without it the
    heads broadcast; ``dropout_p`` in [0, 1] drops weights and rescales by
    1 / (1 - p) whenever > 0 (like torch: also in eval mode).

    A query row with no key it may attend gives 0, with zero gradients (torch
    2.13's CPU kernels give 0 too; the contract guarantees it on every backend).

    Equivalent math::

        s = scale * query @ key.transpose(-1, -2)      # scale = 1/sqrt(E) if None
        s = s + attn_mask if float, s.masked_fill(~attn_mask, -inf) if bool
        s = s.masked_fill(j > i, -inf) if is_causal    # top-left
        out = dropout(softmax(s, -1), dropout_p) @ value   # rows of all -inf -> 0

    Raises:
        AttentionInputError / AttentionTypeError: naming torch's argument
            (``query``, ``attn_mask``, ...), before any kernel runs.
        BackendUnavailable: the selection has no backend that takes the call.
    """
    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, "auto")


def explain_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                 dropout_p: float = 0.0, is_causal: bool = False, *,
                 scale: Optional[float] = None, enable_gqa: bool = False,
                 backend: BackendArg = "auto") -> Decision:
    """Which backend :func:`scaled_dot_product_attention` runs these arguments
    on, and why every other backend refuses them (see
    :func:`attention_dispatch.explain`); ``decision.spec`` is the translated
    call (sliced keys, window).  Nothing runs."""
    call = _translate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return explain(call.q, call.k, call.v, backend=backend, **call.kwargs)


@contextlib.contextmanager
def patch_sdpa(backend: BackendArg = "auto") -> Iterator[Callable[..., Tensor]]:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` through
    :func:`scaled_dot_product_attention` inside the ``with`` block; the
    previous function is restored on exit, also when the block raises.

    ``backend``: as in :func:`attention_dispatch.attention` ("auto" defers to
    ``use_backend`` and ``ATTENTION_DISPATCH_BACKEND``).  Yields the function
    installed.

    Limits: process-wide (every thread sees the patch while it lasts; do not
    enter it from several threads at once); code that bound the function
    before the patch (``from torch.nn.functional import
    scaled_dot_product_attention``) or calls ``torch._C._nn`` directly is not
    routed.  Nested patches restore in reverse order.
    """
    if backend == "auto":
        fn: Callable[..., Tensor] = scaled_dot_product_attention
    else:
        fn = functools.partial(_patched, backend=backend)
    functional = torch.nn.functional
    previous = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = fn  # type: ignore[assignment]
    try:
        yield fn
    finally:
        functional.scaled_dot_product_attention = previous  # type: ignore[assignment]


def _patched(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
             dropout_p: float = 0.0, is_causal: bool = False, *, scale: Optional[float] = None,
             enable_gqa: bool = False, backend: BackendArg = "auto") -> Tensor:
    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend)
