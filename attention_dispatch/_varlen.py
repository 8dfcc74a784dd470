"""Packed variable-length attention (:func:`attention_varlen`) and the
pad/unpad helpers that move between packed and dense batches.

The packed form is flash-attn's: the sequences of a batch stored back to back,
q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, Dv), sequence b being
``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]`` and ``k[cu_seqlens_k[b]:cu_seqlens_k[b + 1]]``.

Routes: a backend that declares ``capabilities.varlen`` gets the packed
tensors (``Backend.forward_varlen``); any other is given the equivalent dense
batch: sequences *right-aligned* in (B, max_seqlen, H, D) (padding first),
keys padded likewise with a key padding mask.  Right alignment keeps every
position-dependent feature exact: with Lq, Lk a sequence's lengths and
Mq, Mk the padded ones, dense query i' = i + Mq - Lq and key j' = j + Mk - Lk
give i' + Mk - Mq - j' = i + Lk - Lq - j, the per-sequence bottom-right
offset, for causal, windows and ALiBi alike.  The reverse (dense key padding
→ packed keys) serves varlen backends without key padding: see
:func:`dense_via_varlen`.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from ._layout import StrideRequirements
from ._backend import Backend
from ._errors import AttentionInputError, AttentionTypeError, BackendUnavailable
from ._registry import REGISTRY
from ._select import AUTO, BackendArg, _context, env_selection, resolve
from ._spec import (FLOAT_DTYPES, CallSpec, _check_scalars, check_alibi, check_softcap,
                    check_window)

Tensor = torch.Tensor


# ----------------------------------------------------------------- helpers


def seqlens(cu_seqlens: Tensor) -> Tensor:
    """(B + 1,) cumulative starts -> (B,) lengths (same dtype and device)."""
    return cu_seqlens[1:] - cu_seqlens[:-1]


def cu_seqlens_from_lengths(lengths: Tensor) -> Tensor:
    """(B,) lengths -> (B + 1,) int32 [0, l0, l0 + l1, ...]."""
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def _dense_index(cu_seqlens: Tensor, max_seqlen: int) -> tuple[Tensor, Tensor]:
    """(B, M) token index of each right-aligned dense slot, and whether it is real."""
    start, lengths = cu_seqlens[:-1].long(), seqlens(cu_seqlens).long()
    p = torch.arange(max_seqlen, device=cu_seqlens.device)
    idx = start[:, None] + p[None, :] - (max_seqlen - lengths)[:, None]
    return idx, idx >= start[:, None]


def pad_varlen(x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> tuple[Tensor, Tensor]:
    """Packed (T, H, D) -> dense (B, M, H, D) with each sequence right-aligned
    (its padding first), and the (B, M) bool mask of real slots.

    Differentiable; no host synchronisation.  M = ``max_seqlen`` must be at
    least the longest sequence.
    """
    idx, real = _dense_index(cu_seqlens, max_seqlen)
    if x.shape[0] == 0:
        return x.new_zeros((idx.shape[0], max_seqlen) + tuple(x.shape[1:])), real
    dense = x[idx.clamp(0, x.shape[0] - 1)]
    return dense.masked_fill(~real[:, :, None, None], 0.0), real


def token_positions(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """For each of ``total`` packed tokens: (its sequence index, its position
    inside the sequence), int64 (T,) each; no host synchronisation."""
    t = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), t, right=True)
    return seq, t - cu_seqlens.long()[seq]


def unpad_varlen(dense: Tensor, cu_seqlens: Tensor, total: int) -> Tensor:
    """Dense right-aligned (B, M, ...) -> packed (T, ...): inverse of :func:`pad_varlen`."""
    seq, pos = token_positions(cu_seqlens, total)
    lengths = seqlens(cu_seqlens).long()
    return dense[seq, pos + dense.shape[1] - lengths[seq]]


def varlen_alive(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, total_q: int, causal: bool,
                 window: Optional[tuple[int, int]]) -> Tensor:
    """(Tq,) bool: whether each packed query has a key it may attend
    (bottom-right causal and window per sequence)."""
    seq, i = token_positions(cu_seqlens_q, total_q)
    lq, lk = seqlens(cu_seqlens_q).long()[seq], seqlens(cu_seqlens_k).long()[seq]
    centre = i + lk - lq
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    lo = centre - left if left >= 0 else torch.zeros_like(centre)
    hi = centre + right if right >= 0 else lk - 1
    return (lk > 0) & (lo.clamp(min=0) <= torch.minimum(hi, lk - 1))


# -------------------------------------------------------------- validation


def _check_packed(q: Any, k: Any, v: Any) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise AttentionTypeError(name, "a torch.Tensor", type(t).__name__)
        if t.dim() != 3:
            raise AttentionInputError(name, "a packed 3-D tensor (total_tokens, H, D)",
                                      f"{t.dim()}-D tensor of shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES or t.dtype != q.dtype:
            raise AttentionTypeError(name, f"a floating dtype, as q ({q.dtype})", str(t.dtype))
        if t.device != q.device:
            raise AttentionInputError(name, f"device {q.device} (as q)", str(t.device))
    if k.shape[-1] != q.shape[-1] or q.shape[-1] == 0:
        raise AttentionInputError("k", f"head dim {q.shape[-1]} (as q), >= 1", str(k.shape[-1]))
    if tuple(v.shape[:2]) != tuple(k.shape[:2]):
        raise AttentionInputError("v", f"(Tk, Hkv) = {tuple(k.shape[:2])} (as k)",
                                  str(tuple(v.shape)))
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise AttentionInputError("k", f"a number of heads dividing q's {q.shape[1]}",
                                  f"{k.shape[1]} heads")


def _check_cu(name: str, cu: Any, device: torch.device) -> None:
    if not isinstance(cu, Tensor):
        raise AttentionTypeError(name, "a torch.Tensor (B + 1,) int32", type(cu).__name__)
    if cu.dtype != torch.int32:
        raise AttentionTypeError(name, "dtype torch.int32", str(cu.dtype),
                                 f"use {name}.int()")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise AttentionInputError(name, "a 1-D tensor (B + 1,)", str(tuple(cu.shape)))
    if cu.device != device:
        raise AttentionInputError(name, f"device {device} (as q)", str(cu.device))


def _check_cu_values(name: str, cu: Tensor, total: int, max_name: str, max_seqlen: int) -> None:
    """The values (one host synchronisation): 0 first, non-decreasing, the
    total last, no sequence longer than max_seqlen."""
    vals = cu.tolist()
    lengths = [b - a for a, b in zip(vals, vals[1:])]
    if vals[0] != 0 or vals[-1] != total or any(n < 0 for n in lengths):
        raise AttentionInputError(name, f"cumulative starts: 0 first, non-decreasing, "
                                  f"{total} (the packed total) last", str(vals[:8])[:-1]
                                  + (", ...]" if len(vals) > 8 else "]"))
    if lengths and max(lengths) > max_seqlen:
        raise AttentionInputError(max_name, f">= the longest sequence ({max(lengths)})",
                                  str(max_seqlen))


def validate_varlen(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any,
                    max_seqlen_q: Any, max_seqlen_k: Any, *, causal: Any, dropout_p: Any,
                    scale: Any, window: Any, softcap: Any, alibi_slopes: Any,
                    return_lse: Any, check_values: bool = True) -> CallSpec:
    """Check every argument of :func:`attention_varlen`; the call's CallSpec
    (``varlen=True``, batch = number of sequences, seq_q/seq_k = the max lengths)."""
    _check_packed(q, k, v)
    _check_scalars(causal, dropout_p, scale, return_lse)
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise AttentionTypeError(name, "an int >= 0", repr(m))
    _check_cu("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise AttentionInputError("cu_seqlens_k", f"shape {tuple(cu_seqlens_q.shape)} (as "
                                  "cu_seqlens_q: one entry per sequence + 1)",
                                  str(tuple(cu_seqlens_k.shape)))
    if check_values:
        _check_cu_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q)
        _check_cu_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k)
    batch, hq = cu_seqlens_q.shape[0] - 1, q.shape[1]
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return CallSpec(
        device_type=q.device.type, device_index=q.device.index, dtype=q.dtype, batch=batch,
        heads_q=hq, heads_kv=k.shape[1], seq_q=max_seqlen_q, seq_k=max_seqlen_k,
        head_dim=q.shape[-1], head_dim_v=v.shape[-1], layout="bshd", causal=causal,
        dropout=dropout_p > 0, return_lse=return_lse, requires_grad=grad,
        window=check_window(window), softcap=check_softcap(softcap),
        alibi=check_alibi(alibi_slopes, batch, hq, q.device), varlen=True)


# ------------------------------------------------------------ the decision


class _VarlenPlan(NamedTuple):
    backend: Backend
    native: bool  # forward_varlen; else the padded dense call
    spec: CallSpec
    scale: float


_plans: dict[tuple, _VarlenPlan] = {}
_lock = threading.Lock()


def clear_plans() -> None:
    """Forget cached varlen decisions (called by ``ad.clear_cache()``)."""
    with _lock:
        _plans.clear()


def _dense_spec(spec: CallSpec) -> CallSpec:
    """The padded dense equivalent of a varlen call (right-aligned, key padding)."""
    return dataclasses.replace(spec, varlen=False, key_padding=True)


def decide_varlen(spec: CallSpec, selection: tuple[str, ...]
                  ) -> tuple[Optional[Backend], bool, dict[str, list[str]]]:
    """The first backend of ``selection`` that takes the call, natively
    (``forward_varlen``) or padded to a dense batch; (backend, native, reasons
    of the backends refused before it)."""
    from ._dispatch import _candidates, _reasons

    forced = "auto" not in selection
    refused: dict[str, list[str]] = {}
    for name in _candidates(selection, spec.device, spec):
        native = _reasons(name, spec, forced)
        padded = _reasons(name, _dense_spec(spec), forced) if native else []
        if not native or not padded:
            inst, _ = REGISTRY.load(name)
            return inst, not native, refused
        inst, _ = REGISTRY.load(name)
        if inst is None or not inst.capabilities.varlen:
            refused[name] = padded  # the padded route is its only one: say what stops it
        else:
            refused[name] = native + [f"padded: {r}" for r in padded if r not in native]
    return None, False, refused


def _plan(key: Optional[tuple], spec: CallSpec, selection: tuple[str, ...],
          scale: Optional[float]) -> _VarlenPlan:
    inst, native, refused = decide_varlen(spec, selection)
    if inst is None:
        raise BackendUnavailable(selection, refused)
    eff = float(scale) if scale is not None else 1.0 / math.sqrt(spec.head_dim)
    plan = _VarlenPlan(inst, native, spec, eff)
    if key is not None:
        with _lock:
            if len(_plans) >= 1024:
                _plans.clear()
            _plans[key] = plan
    return plan


def _meta(t: Any) -> Any:
    return None if t is None else (t.shape, t.dtype, t.device, t.requires_grad)


# ----------------------------------------------------------------- the call


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                     cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                     causal: bool = False, dropout_p: float = 0.0,
                     scale: Optional[float] = None, window: Optional[tuple[int, int]] = None,
                     softcap: Optional[float] = None, alibi_slopes: Optional[Tensor] = None,
                     backend: BackendArg = "auto", return_lse: bool = False
                     ) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention over a packed batch of variable-length sequences.

    Shapes (flash-attn's varlen convention): q (Tq, Hq, D), k (Tk, Hkv, D),
    v (Tk, Hkv, Dv); cu_seqlens_q/k (B + 1,) int32 cumulative starts
    ([0, L0, L0 + L1, ..., T]); max_seqlen_q/k ints >= the longest sequence.
    Returns out (Tq, Hq, Dv) in q's dtype, and with ``return_lse`` lse
    (Hq, Tq) float32, detached.  Sequences of length 0 are allowed (a query
    with no key gives 0, lse -inf).

    Every other argument means what it means in :func:`attention`, per
    sequence: causal is bottom-right inside each sequence (query i of a
    sequence with Lq queries and Lk keys sees key j iff j <= i + Lk - Lq), and
    so are the window and the ALiBi distance.  ``alibi_slopes`` is (Hq,) or
    (B, Hq) float32.  Validating cu_seqlens reads them on the host (one
    synchronisation per call; skipped while torch.compile traces).

    Backends that declare ``capabilities.varlen`` run the packed tensors; any
    other runs the equivalent padded dense batch (see the module docstring).

    Equivalent math::

        for b in range(B):
            qs, ks, vs = q[cq[b]:cq[b+1]], k[ck[b]:ck[b+1]], v[ck[b]:ck[b+1]]
            out[cq[b]:cq[b+1]] = attention(qs, ks, vs, layout="bshd", causal=causal, ...)

    Raises:
        AttentionInputError / AttentionTypeError: bad input, before any kernel.
        BackendUnavailable: no backend of the selection takes the call.
    """
    if backend == "auto":
        selection = _context.get() or env_selection() or AUTO
    else:
        selection = resolve(backend)[0]
    spec = validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal=causal, dropout_p=dropout_p, scale=scale, window=window,
                           softcap=softcap, alibi_slopes=alibi_slopes, return_lse=return_lse,
                           check_values=not torch.compiler.is_compiling())
    key = (selection, spec, scale, type(scale))
    plan = _plans.get(key)
    if plan is None:
        plan = _plan(key, spec, selection, scale)
    out, lse = _run(plan, q, k, v, cu_seqlens_q, cu_seqlens_k, float(dropout_p), alibi_slopes)
    if return_lse:
        return out, lse.detach()  # type: ignore[union-attr]
    return out


def _empty(q: Tensor, k: Tensor, v: Tensor, spec: CallSpec) -> tuple[Tensor, Tensor]:
    out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    if spec.requires_grad:  # zero, finite gradients
        out = out + 0.0 * (q.sum() + k.sum() + v.sum())
    return out, torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)


def _run(plan: _VarlenPlan, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor,
         dropout_p: float, alibi_slopes: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    spec = plan.spec
    if q.shape[0] == 0 or k.shape[0] == 0:
        return _empty(q, k, v, spec)
    if not plan.native:
        return _run_padded(plan, q, k, v, cu_q, cu_k, dropout_p, alibi_slopes)
    extra = {} if alibi_slopes is None else {"alibi_slopes": alibi_slopes}
    q, k, v = _conform(plan.backend.stride_requirements(spec), q, k, v)
    out, lse = plan.backend.forward_varlen(
        q, k, v, spec=spec, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=spec.seq_q,
        max_seqlen_k=spec.seq_k, dropout_p=dropout_p, scale=plan.scale, **extra)
    if not plan.backend.capabilities.empty_rows_exact:
        alive = varlen_alive(cu_q, cu_k, q.shape[0], spec.causal, spec.window)
        out = out.masked_fill(~alive[:, None, None], 0.0)
        if lse is not None:
            lse = lse.masked_fill(~alive[None, :], float("-inf"))
    return out, lse


def _conform(req: StrideRequirements, q: Tensor, k: Tensor, v: Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Packed (T, H, D) tensors whose memory breaks the kernel's rule, copied
    contiguous (judged per call: a varlen call reads its lengths on the host anyway)."""
    def fix(t: Tensor) -> Tensor:
        bad = req.violation(t) is not None or req.misaligned(t)
        return t.clone(memory_format=torch.contiguous_format) if bad else t
    return fix(q), fix(k), fix(v)


def _run_padded(plan: _VarlenPlan, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor,
                cu_k: Tensor, dropout_p: float, alibi_slopes: Optional[Tensor]
                ) -> tuple[Tensor, Optional[Tensor]]:
    """The dense route: right-aligned padding, one dense call, unpadding."""
    from ._dispatch import attention

    spec = plan.spec
    qd, _ = pad_varlen(q, cu_q, spec.seq_q)
    kd, kpm = pad_varlen(k, cu_k, spec.seq_k)
    vd, _ = pad_varlen(v, cu_k, spec.seq_k)
    res = attention(qd, kd, vd, key_padding_mask=kpm, causal=spec.causal, dropout_p=dropout_p,
                    scale=plan.scale, layout="bshd", backend=plan.backend.name,
                    return_lse=spec.return_lse, window=spec.window, softcap=spec.softcap,
                    alibi_slopes=alibi_slopes)
    out_d, lse_d = res if spec.return_lse else (res, None)
    out = unpad_varlen(out_d, cu_q, q.shape[0])
    lse = None
    if lse_d is not None:
        lse = unpad_varlen(lse_d.transpose(1, 2), cu_q, q.shape[0]).transpose(0, 1)
    return out, lse


def dense_via_varlen(backend: Backend, q: Tensor, k: Tensor, v: Tensor, kpm: Tensor, *,
                     spec: CallSpec, dropout_p: float, scale: float
                     ) -> tuple[Tensor, Optional[Tensor]]:
    """A dense key-padding call on a varlen backend without key padding: the
    real keys packed, every batch row's Sq queries one sequence.

    Shapes: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D|Dv) bhsd views, kpm (B, Sk)
    -> out (B, Hq, Sq, Dv), lse (B, Hq, Sq) or None.  Exact only when nothing
    depends on key positions (``_capabilities.key_padding_as_varlen``).
    One host synchronisation (the packed key count).
    """
    B, Hq, Sq, _ = q.shape
    kp, vp = k.transpose(1, 2)[kpm], v.transpose(1, 2)[kpm]          # (Tk, Hkv, D)
    if kp.shape[0] == 0:  # no real key anywhere: every row is empty
        out = q.new_zeros(q.shape[:-1] + (v.shape[-1],)) + 0.0 * (q.sum() + k.sum() + v.sum())
        return out, torch.full((B, Hq, Sq), float("-inf"), device=q.device)
    qp = q.transpose(1, 2).reshape(B * Sq, Hq, q.shape[-1])
    cu_q = torch.arange(0, (B + 1) * Sq, Sq, dtype=torch.int32, device=q.device)
    cu_k = cu_seqlens_from_lengths(kpm.sum(-1, dtype=torch.int32))
    vspec = dataclasses.replace(spec, varlen=True, key_padding=False, causal=False)
    out, lse = backend.forward_varlen(qp, kp, vp, spec=vspec, cu_seqlens_q=cu_q,
                                      cu_seqlens_k=cu_k, max_seqlen_q=Sq,
                                      max_seqlen_k=spec.seq_k, dropout_p=dropout_p,
                                      scale=scale)
    out = out.reshape(B, Sq, Hq, -1).transpose(1, 2)
    if lse is not None:
        lse = lse.reshape(Hq, B, Sq).transpose(0, 1)
    return out, lse


_hook_lock = threading.Lock()


def _install_hooks() -> None:
    """Let ``ad.clear_cache()`` and registry changes forget varlen decisions."""
    from . import _dispatch

    with _hook_lock:
        if clear_plans not in _dispatch.CLEAR_HOOKS:
            _dispatch.CLEAR_HOOKS.append(clear_plans)


_install_hooks()
