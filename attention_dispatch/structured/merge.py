"""``merge_attention``: combine partial attention results over disjoint key sets.

Attention over keys K = K_1 ∪ ... ∪ K_n (disjoint) is a weighted sum of the
attention over each part, weighted by each part's softmax denominator.  With
the natural-log ``lse`` every backend returns, the merge is exact, and it is
the building block of chunked attention over long key sequences, of ring
attention (each device holds one key block) and of KV-cache splits.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._core import AttentionInputError, AttentionTypeError, apply_sinks


Tensor = torch.Tensor

LAYOUTS = ("bhsd", "bshd", "thd")


def _lse_view(lse: Tensor, layout: str) -> Tensor:
    """lse as it lines up with the output's leading axes (a trailing 1 added)."""
    if layout == "bhsd":
        return lse.unsqueeze(-1)                       # (B, H, S, 1)
    if layout == "bshd":
        return lse.transpose(1, 2).unsqueeze(-1)       # (B, S, H, 1)
    return lse.transpose(0, 1).unsqueeze(-1)           # thd: (H, T) -> (T, H, 1)


def _expected_lse_shape(out: Tensor, layout: str) -> tuple[int, ...]:
    if layout == "bhsd":
        return tuple(out.shape[:-1])
    if layout == "bshd":
        b, s, h = out.shape[:3]
        return (b, h, s)
    t, h = out.shape[:2]
    return (h, t)


def _check(outs: Sequence[Tensor], lses: Sequence[Tensor], layout: str) -> None:
    if layout not in LAYOUTS:
        raise AttentionInputError("layout", "'bhsd', 'bshd' or 'thd'", repr(layout))
    if not isinstance(outs, (list, tuple)) or not isinstance(lses, (list, tuple)):
        raise AttentionTypeError("outs", "lists (or tuples) of tensors",
                                 f"{type(outs).__name__} and {type(lses).__name__}")
    if len(outs) == 0 or len(outs) != len(lses):
        raise AttentionInputError("lses", f"one lse per output ({len(outs)} outputs, >= 1)",
                                  f"{len(lses)} lses")
    rank = 3 if layout == "thd" else 4
    first = outs[0]
    for n, (o, s) in enumerate(zip(outs, lses)):
        if not isinstance(o, Tensor) or not isinstance(s, Tensor):
            raise AttentionTypeError(f"outs[{n}]", "torch.Tensor outputs and lses",
                                     f"{type(o).__name__} and {type(s).__name__}")
        if o.dim() != rank or o.shape != first.shape or o.dtype != first.dtype:
            raise AttentionInputError(f"outs[{n}]", f"a {rank}-D tensor like outs[0] "
                                      f"{tuple(first.shape)} {first.dtype}",
                                      f"{tuple(o.shape)} {o.dtype}")
        want = _expected_lse_shape(o, layout)
        if tuple(s.shape) != want or not s.dtype.is_floating_point:
            raise AttentionInputError(f"lses[{n}]", f"a float tensor of shape {want} "
                                      f"(layout {layout!r})", f"{tuple(s.shape)} {s.dtype}")
        if o.device != first.device or s.device != first.device:
            raise AttentionInputError(f"outs[{n}]", f"device {first.device} (as outs[0])",
                                      f"{o.device} / lse on {s.device}")


def merge_attention(outs: Sequence[Tensor], lses: Sequence[Tensor], *, layout: str = "bhsd",
                    sinks: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Merge attention results computed over disjoint sets of keys.

    Shapes: every ``outs[n]`` is (B, H, S, Dv) with ``lses[n]`` (B, H, S)
    (layout "bhsd"); (B, S, H, Dv) with lse (B, H, S) ("bshd", as
    :func:`attention` returns them); or (T, H, Dv) with lse (H, T) ("thd", as
    :func:`attention_varlen` returns them).  Returns ``(out, lse)``: out in the
    dtype of ``outs``, lse float32, both for the union of the key sets (the
    merge itself runs in float32, float64 for float64 outputs).

    A partial whose row saw no key (lse -inf, out 0) contributes nothing; a row
    that no partial saw gives out 0 and lse -inf, without NaN.  The partials
    must use the same queries, scale and softcap, and disjoint keys.

    ``sinks`` (H,): attention sinks, applied once to the merged result (the
    partials must be computed without them): the union's softmax gains one
    virtual key per head with logit sinks[h] and a zero value.

    Gradients flow to ``outs``, ``lses`` and ``sinks``.  :func:`attention` returns its lse
    detached, so gradients of a merged output with respect to q and k miss the
    term that flows through the weights: use the merge for inference, or pass
    lses that carry gradients.

    Equivalent math::

        lse = logsumexp(stack(lses), 0)                     # -inf if all are -inf
        out = sum(exp(lse_n - lse) * out_n for n)           # 0 where lse is -inf
        if sinks is not None:
            out = out * sigmoid(lse - sinks[h]);  lse = logaddexp(lse, sinks[h])

    Raises:
        AttentionInputError / AttentionTypeError: mismatched shapes, dtypes,
            devices or counts, or an unknown layout.
    """
    _check(outs, lses, layout)
    _check_sinks(sinks, outs[0], layout)
    acc = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
    lse_all = torch.stack([s.to(acc) for s in lses])                 # (n, ...)
    top = lse_all.amax(0)
    finite = torch.isfinite(top)
    safe_top = torch.where(finite, top, torch.zeros_like(top)).detach()
    weights = torch.exp(lse_all - safe_top)                          # 0 for -inf partials
    total = weights.sum(0)
    alive = total > 0
    safe_total = torch.where(alive, total, torch.ones_like(total))
    lse = (torch.log(safe_total) + safe_top).masked_fill(~alive, float("-inf"))
    out = None
    for o, w in zip(outs, weights):
        part = o.to(acc) * _lse_view(w / safe_total, layout)
        out = part if out is None else out + part
    if out is None:
        raise AttentionInputError("outs", "at least one output", "none")
    if sinks is not None:
        out, lse = apply_sinks(out, lse, _sinks_view(sinks, layout),
                               lambda x: _lse_view(x, layout))
    return out.to(outs[0].dtype), lse.float()


def _sinks_view(sinks: Tensor, layout: str) -> Tensor:
    """(H,) sinks broadcasting against the lse: (1, H, 1), or (H, 1) for "thd"."""
    return sinks.view(-1, 1) if layout == "thd" else sinks.view(1, -1, 1)


def _check_sinks(sinks: Optional[Tensor], out: Tensor, layout: str) -> None:
    if sinks is None:
        return
    heads = out.shape[1] if layout in ("bhsd", "thd") else out.shape[2]
    if not isinstance(sinks, Tensor) or not sinks.dtype.is_floating_point:
        raise AttentionTypeError("sinks", f"a float torch.Tensor of shape (H,) = ({heads},)",
                                 type(sinks).__name__ if not isinstance(sinks, Tensor)
                                 else str(sinks.dtype))
    if tuple(sinks.shape) != (heads,):
        raise AttentionInputError("sinks", f"shape (H,) = ({heads},): one logit per head",
                                  str(tuple(sinks.shape)))
    if sinks.device != out.device:
        raise AttentionInputError("sinks", f"device {out.device} (as outs)", str(sinks.device))
