"""Packed variable-length calls (the core of :func:`attention_varlen`):
validation, the decision per signature, the native and the padded route.

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
``packing.dense_via_varlen``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import torch

from . import eventlog as _events, policy as _policy
from .backend import Backend
from .caches import PlanCache
from .decide import RoutePlan, candidates, reasons
from .errors import AttentionInputError, AttentionTypeError, BackendUnavailable
from .layout import StrideRequirements
from .packing import pad_varlen, unpad_varlen, varlen_alive
from .registry import REGISTRY
from .masks import sink_lse
from .spec import (FLOAT_DTYPES, CallOptions, CallSpec, _check_scalars, effective_scale,
                   keyword_tensors, sinks_grad, structured_fields)

Tensor = torch.Tensor


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
                    max_seqlen_q: Any, max_seqlen_k: Any, o: CallOptions,
                    check_values: bool = True) -> CallSpec:
    """Check every argument of a packed call; the call's CallSpec (``varlen=True``,
    batch = number of sequences, seq_q/seq_k = the max lengths)."""
    _check_packed(q, k, v)
    for name in ("mask", "key_padding_mask"):
        if getattr(o, name) is not None:
            raise AttentionInputError(name, "None for a packed call (the lengths say which "
                                      "keys are real)", "a tensor")
    _check_scalars(o.causal, o.dropout_p, o.scale, o.return_lse)
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
    grad = (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            or sinks_grad(o))
    return CallSpec(
        device_type=q.device.type, device_index=q.device.index, dtype=q.dtype, batch=batch,
        heads_q=hq, heads_kv=k.shape[1], seq_q=max_seqlen_q, seq_k=max_seqlen_k,
        head_dim=q.shape[-1], head_dim_v=v.shape[-1], layout="bshd", requires_grad=grad,
        varlen=True, **structured_fields(o, batch, hq, q.device, q.dtype))


# ------------------------------------------------------------ the decision


_plans = PlanCache("varlen.plans", 1024)
clear_plans = _plans.clear


def _dense_spec(spec: CallSpec) -> CallSpec:
    """The padded dense equivalent of a varlen call (right-aligned, key padding)."""
    return dataclasses.replace(spec, varlen=False, key_padding=True)


def decide_varlen(spec: CallSpec, selection: tuple[str, ...]
                  ) -> tuple[Optional[Backend], bool, dict[str, list[str]]]:
    """The first backend of ``selection`` that takes the call, natively
    (``forward_varlen``) or padded to a dense batch; (backend, native, reasons
    of the backends refused before it)."""
    forced = "auto" not in selection
    refused: dict[str, list[str]] = {}
    for name in candidates(selection, spec.device, spec):
        native = reasons(name, spec, forced)
        padded = reasons(name, _dense_spec(spec), forced) if native else []
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
          scale: Optional[float]) -> RoutePlan:
    inst, native, refused = decide_varlen(spec, selection)
    if inst is None:
        raise BackendUnavailable(selection, refused)
    route = "packed (forward_varlen)" if native else "padded to a dense batch"
    _events.emit(_events.DECISION, inst.name, f"selection {','.join(selection)}; {route}", spec)
    _policy.warn_if_large(inst, spec if native else _dense_spec(spec), selection)
    eff = effective_scale(scale, spec.head_dim)
    plan = RoutePlan(inst, native, spec, eff)
    _plans.store(key, plan)
    return plan


# ----------------------------------------------------------------- the call


def varlen_call(selection: tuple[str, ...], q: Tensor, k: Tensor, v: Tensor,
                cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                max_seqlen_k: int, o: CallOptions, check_values: bool = True
                ) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """A packed variable-length call (``attention_varlen``'s arguments, the
    selection resolved): validated (cu_seqlens' values too, if
    ``check_values``), decided once per signature, run."""
    spec = validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, o,
                           check_values=check_values and not torch.compiler.is_compiling())
    key = (selection, spec, o.scale, type(o.scale))
    plan = _plans.get(key)
    if plan is None:
        plan = _plan(key, spec, selection, o.scale)
    out, lse = _run(plan, q, k, v, cu_seqlens_q, cu_seqlens_k, o)
    if o.return_lse:
        if o.sinks is not None:  # rows with no key: their sink's logit
            lse = sink_lse(lse, o.sinks.detach()[:, None])  # type: ignore[arg-type]
        return out, lse.detach()  # type: ignore[union-attr]
    return out


def _empty(q: Tensor, k: Tensor, v: Tensor, spec: CallSpec) -> tuple[Tensor, Tensor]:
    out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    if spec.requires_grad:  # zero, finite gradients
        out = out + 0.0 * (q.sum() + k.sum() + v.sum())
    return out, torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)


def _run(plan: RoutePlan, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor,
         o: CallOptions) -> tuple[Tensor, Optional[Tensor]]:
    spec = plan.spec
    if q.shape[0] == 0 or k.shape[0] == 0:
        return _empty(q, k, v, spec)
    if not plan.native:
        return _run_padded(plan, q, k, v, cu_q, cu_k, o)
    q, k, v = _conform(plan.backend.stride_requirements(spec), q, k, v)
    out, lse = plan.backend.forward_varlen(
        q, k, v, spec=spec, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=spec.seq_q,
        max_seqlen_k=spec.seq_k, dropout_p=float(o.dropout_p), scale=plan.scale,
        **keyword_tensors(o))
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


def _run_padded(plan: RoutePlan, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor,
                cu_k: Tensor, o: CallOptions) -> tuple[Tensor, Optional[Tensor]]:
    """The dense route: right-aligned padding, one dense call, unpadding."""
    from .dispatch import call

    spec = plan.spec
    qd, _ = pad_varlen(q, cu_q, spec.seq_q)
    kd, kpm = pad_varlen(k, cu_k, spec.seq_k)
    vd, _ = pad_varlen(v, cu_k, spec.seq_k)
    res = call((plan.backend.name,), qd, kd, vd,
               o._replace(key_padding_mask=kpm, layout="bshd", scale=plan.scale))
    out_d, lse_d = res if spec.return_lse else (res, None)
    out = unpad_varlen(out_d, cu_q, q.shape[0])
    lse = None
    if lse_d is not None:
        lse = unpad_varlen(lse_d.transpose(1, 2), cu_q, q.shape[0]).transpose(0, 1)
    return out, lse
