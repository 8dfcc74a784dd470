"""Interleaved kv-head grouping on top of the contract's grouped one.

The contract (and torch's ``enable_gqa``, flash-attn, transformers) groups
query heads: query head ``h`` reads kv head ``h // (Hq // Hkv)``.  Some code
(x-transformers and others) interleaves them: query head ``h`` reads kv head
``h % Hkv``.  Passing interleaved heads to a grouped kernel is silently wrong
(different outputs, no error).  These helpers reorder the *query* heads (one
copy of q and of the output; K, V and the weights stay as they are).

Equivalent math (g = Hq // Hkv)::

    grouped[:, c * g + a] = interleaved[:, a * Hkv + c]     # a < g, c < Hkv
    interleaved_attention(q, k, v)[:, h] == attention over q[:, h], k[:, h % Hkv], v[:, h % Hkv]
"""

from __future__ import annotations

from typing import Any, Union

import torch

import attention_dispatch as ad

Tensor = torch.Tensor


def _check(x: Any, heads_kv: Any, axis: int, name: str) -> int:
    """The number of heads on ``axis``; a typed error if it is not a multiple of heads_kv."""
    if not isinstance(x, Tensor):
        raise ad.AttentionTypeError(name, "a torch.Tensor", type(x).__name__)
    if isinstance(heads_kv, bool) or not isinstance(heads_kv, int) or heads_kv < 1:
        raise ad.AttentionTypeError("heads_kv", "an int >= 1", repr(heads_kv))
    if x.dim() <= axis or x.shape[axis] % heads_kv:
        got = tuple(x.shape)
        raise ad.AttentionInputError(name, f"a head axis (dim {axis}) that is a multiple of "
                                     f"heads_kv={heads_kv}", f"shape {got}")
    return int(x.shape[axis])


def _axis(layout: str) -> int:
    if layout not in ("bhsd", "bshd"):
        raise ad.AttentionInputError("layout", "'bhsd' or 'bshd'", repr(layout))
    return 1 if layout == "bhsd" else 2


def _reorder(x: Tensor, axis: int, first: int, second: int) -> Tensor:
    """Head index f * second + s -> s * first + f along ``axis``."""
    if first == 1 or second == 1:
        return x
    return x.unflatten(axis, (first, second)).transpose(axis, axis + 1).flatten(axis, axis + 1)


def interleaved_to_grouped(x: Tensor, heads_kv: int, layout: str = "bhsd") -> Tensor:
    """Reorder the heads of ``x`` (queries, or anything with one entry per
    query head) from interleaved order (head ``h`` reads kv head ``h % Hkv``)
    to the contract's grouped order (head ``h`` reads kv head ``h // g``).

    ``x``: (B, H, S, D) for ``layout="bhsd"``, (B, S, H, D) for ``"bshd"``;
    ``H % heads_kv == 0``.  Returns a new tensor of the same shape (a copy).
    """
    axis = _axis(layout)
    h = _check(x, heads_kv, axis, "x")
    return _reorder(x, axis, h // heads_kv, heads_kv)


def grouped_to_interleaved(x: Tensor, heads_kv: int, layout: str = "bhsd") -> Tensor:
    """The inverse of :func:`interleaved_to_grouped` (e.g. for the output)."""
    axis = _axis(layout)
    h = _check(x, heads_kv, axis, "x")
    return _reorder(x, axis, heads_kv, h // heads_kv)


def _head_axis(t: Tensor, heads_q: int, from_right: int) -> int:
    """The head axis of a broadcastable per-head tensor, or -1 if it has none."""
    axis = t.dim() - from_right
    return axis if axis >= 0 and heads_q > 1 and t.shape[axis] == heads_q else -1


def interleaved_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any
                          ) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """:func:`attention_dispatch.attention` with interleaved kv heads: query
    head ``h`` reads kv head ``h % Hkv`` (x-transformers' convention).

    Same arguments and result as :func:`attention_dispatch.attention`; a mask
    with a head axis of size Hq and per-head ALiBi slopes are reordered with
    the queries, and the output (and lse) come back in the caller's head order.
    With ``Hkv == 1`` or ``Hkv == Hq`` both conventions agree and nothing is copied.

    Equivalent math::

        heads = torch.arange(Hq) % Hkv
        out = attention(q, k[:, heads], v[:, heads], **kwargs)   # bhsd
    """
    layout = kwargs.get("layout", "bhsd")
    axis = _axis(layout)
    heads_kv = _check(k, 1, axis, "k")
    heads_q = _check(q, heads_kv, axis, "q")
    groups = heads_q // heads_kv
    if groups == 1 or heads_kv == 1:
        return ad.attention(q, k, v, **kwargs)
    mask, slopes = kwargs.get("mask"), kwargs.get("alibi_slopes")
    if isinstance(mask, Tensor) and (ax := _head_axis(mask, heads_q, 3)) >= 0:
        kwargs["mask"] = _reorder(mask, ax, groups, heads_kv)
    if isinstance(slopes, Tensor) and (ax := _head_axis(slopes, heads_q, 1)) >= 0:
        kwargs["alibi_slopes"] = _reorder(slopes, ax, groups, heads_kv)
    res = ad.attention(_reorder(q, axis, groups, heads_kv), k, v, **kwargs)
    if isinstance(res, tuple):
        out, lse = res
        return _reorder(out, axis, heads_kv, groups), _reorder(lse, 1, heads_kv, groups)
    return _reorder(res, axis, heads_kv, groups)
