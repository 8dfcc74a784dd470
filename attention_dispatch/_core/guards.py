"""A C-level check that tensors still have a call signature's metadata.

The hot path of :func:`~attention_dispatch.attention` remembers the last plain
call's plan together with a check of its q, k, v: the same Python type,
dispatch keys (device type), dtype, device index, ``requires_grad``, sizes and
strides, compared in C++ (torch's guard checker, ~3x cheaper than building and
hashing the decision cache key).  Where torch does not provide the checker, or
it fails the self-test below, :func:`tensor_check` gives None and every call
builds the full key.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .spec import TENSOR_OPTIONS, CallOptions

Check = Callable[..., bool]
_state: dict[str, bool] = {}


def _make(ts: tuple[torch.Tensor, ...]) -> Check:
    from torch._C._dynamo.guards import TensorGuards

    return TensorGuards(*ts, dynamic_dims_sizes=[list(t.shape) for t in ts],
                        dynamic_dims_strides=[list(t.stride()) for t in ts]).check


def _self_test() -> bool:
    """The checker accepts equal metadata and refuses each difference the
    decision cache key holds (shape, stride, dtype, requires_grad, count)."""
    try:
        a = torch.zeros(1, 2, 3, 4)
        check = _make((a, a))
        wide = torch.zeros(1, 2, 3, 8)[..., :4]
        others = (torch.zeros(1, 2, 3, 5), wide, a.double(), a.clone().requires_grad_(),
                  torch.zeros(1, 2, 3, 4, 1)[..., 0].transpose(0, 1))
        if not check(a, torch.zeros(1, 2, 3, 4)):
            return False
        return not any(check(a, o) for o in others)
    except Exception:
        return False


def tensor_check(*ts: torch.Tensor) -> Optional[Check]:
    """``check(*others) -> bool``: True iff each of ``others`` has the type,
    dispatch keys, dtype, device, requires_grad, sizes and strides of the
    tensor in the same place of ``ts`` (storage offsets and values are not
    compared); a tensor given twice in ``ts`` (``q is k``) must be given twice
    in the same places.  None where unavailable."""
    ok = _state.get("ok")
    if ok is None:
        ok = _state["ok"] = _self_test()
    if not ok:
        return None
    firsts = [next(i for i, u in enumerate(ts) if u is t) for t in ts]
    try:
        inner = _make(tuple(t for i, t in enumerate(ts) if firsts[i] == i))
    except Exception:
        return None
    if firsts == list(range(len(ts))):
        return inner
    # torch's checker refuses one tensor passed twice (q is k is v in
    # self-attention): check each tensor once, and the same aliasing
    keep = [i for i, f in enumerate(firsts) if f == i]
    same = [(i, f) for i, f in enumerate(firsts) if f != i]

    count = len(ts)

    def check(*others: torch.Tensor) -> bool:
        if len(others) != count:
            return False
        for i, f in same:
            if others[i] is not others[f]:
                return False
        return inner(*[others[i] for i in keep])

    return check


def never(*ts: "torch.Tensor") -> bool:
    """The check of a signature that cannot be remembered (no C-level check)."""
    return False


# ------------------------------------------- the last call of an entry point
#
# A memo is (check, selection, scalar options, option types, given tensor
# options, grad mode or None, key, plan): ``attention``'s general calls and
# ``attention_paged`` remember their last call's so, and the next call with the
# same metadata skips validation's Python and the cache key.


def memo(checks: dict[Any, Check], key: Any, plan: Any, selection: tuple[str, ...],
         ts: tuple[torch.Tensor, ...], o: CallOptions) -> Optional[tuple]:
    """The memo of a call (tensors ``ts`` and options ``o``) decided as
    ``plan`` under ``key``; None where no C-level check exists.  The check is
    made once per key and kept in ``checks`` (the caller clears it with its
    plans)."""
    given = [i for i in range(TENSOR_OPTIONS) if o[i] is not None]
    check = checks.get(key)
    if check is None:
        check = checks[key] = tensor_check(*ts, *[o[i] for i in given]) or never
    if check is never:
        return None
    needs = any(t.requires_grad for t in ts) or any(o[i].requires_grad for i in given)
    return (check, selection, o[TENSOR_OPTIONS:], tuple(map(type, o)), given,
            torch.is_grad_enabled() if needs else None, key, plan)


def recall(m: Optional[tuple], selection: tuple[str, ...], ts: tuple[torch.Tensor, ...],
           o: CallOptions) -> Optional[tuple[Any, Any]]:
    """(key, plan) of memo ``m`` when this call has its metadata: the tensors
    and the tensor options given checked in C (type, dtype, device, sizes,
    strides, requires_grad), the selection, which options are given, the
    scalar options' values and, where a tensor requires grad, the grad mode."""
    if (m is not None and m[1] == selection and m[3] == tuple(map(type, o))
            and m[2] == o[TENSOR_OPTIONS:] and m[0](*ts, *[o[i] for i in m[4]])
            and (m[5] is None or m[5] == torch.is_grad_enabled())):
        return m[6], m[7]
    return None
