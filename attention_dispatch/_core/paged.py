"""Attention over a paged KV cache (the core of :func:`attention_paged`):
validation, the decision per signature, the native and the gathered route.

The cache is vLLM's / FA4's: k_cache (num_blocks, block_size, Hkv, D),
v_cache (num_blocks, block_size, Hkv, Dv); row b's key j (j < cache_seqlens[b])
is slot ``j % block_size`` of block ``block_table[b, j // block_size]``.
Slots past a row's length and blocks its table does not reach are never read.

Routes, in this order: a backend naming ``"paged"`` in its
``capabilities.extras`` gets the cache itself (``Backend.forward_paged``);
candidates are tried for that route first, in rank order, since any other
route copies the whole used cache.  Then, in rank order again, the gathered
route: each row's used blocks are gathered into a dense (B, M, Hkv, D) batch,
M = max_blocks * block_size, *right-aligned* (padding first) with a key
padding mask, and the dense dispatcher runs it on that backend.  Right
alignment keeps causal and window exact: dense key j' = j + M - L_b gives
j' <= i + M - Sq  <=>  j <= i + L_b - Sq, the per-row bottom-right offset.

Tensor options (``sinks``) travel in ``CallOptions``: the native route passes
them to ``forward_paged`` as keywords (``keyword_tensors``), the gathered route
hands the options to the dense call unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Union

import torch

from . import eventlog as _events, reliability as _reliability
from .backend import Backend
from .caches import PlanCache, register_cache
from .decide import RoutePlan, candidates, reasons
from .decision import ACCEPTED, CHOSEN, REFUSED, SKIPPED, BackendVerdict, Decision
from .errors import AttentionInputError, AttentionTypeError, BackendUnavailable
from .layout import StrideRequirements
from .pagedvalues import check_paged_values
from .registry import REGISTRY
from .select import BackendArg, resolve
from .guards import memo, recall
from .spec import (FLOAT_DTYPES, CallOptions, CallSpec, _check_scalars,
                   keyword_tensors)
from .spec import effective_scale, structured_fields

Tensor = torch.Tensor
NATIVE = "native (forward_paged)"
GATHERED = "gathered to a dense batch"


# -------------------------------------------------------------- validation


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_float(name: str, t: Any, ref: Optional[Tensor], layout: str) -> None:
    if not isinstance(t, Tensor):
        raise AttentionTypeError(name, "a torch.Tensor", type(t).__name__)
    if t.dim() != 4:
        raise AttentionInputError(name, f"a 4-D tensor {layout}",
                                  f"{t.dim()}-D tensor of shape {_shape(t)}")
    if t.dtype not in FLOAT_DTYPES or (ref is not None and t.dtype != ref.dtype):
        raise AttentionTypeError(name, "a floating dtype" + ("" if ref is None else
                                 f", as q ({ref.dtype})"), str(t.dtype))
    if ref is not None and t.device != ref.device:
        raise AttentionInputError(name, f"device {ref.device} (as q)", str(t.device))


def _check_int(name: str, t: Any, shape: str, dims: int, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise AttentionTypeError(name, f"a torch.Tensor {shape} int32", type(t).__name__)
    if t.dtype != torch.int32:
        raise AttentionTypeError(name, "dtype torch.int32", str(t.dtype), f"use {name}.int()")
    if t.dim() != dims:
        raise AttentionInputError(name, f"a {dims}-D tensor {shape}", _shape(t))
    if t.device != device:
        raise AttentionInputError(name, f"device {device} (as q)", str(t.device))


def _check_shapes(q: Any, kc: Any, vc: Any, bt: Any, sl: Any) -> None:
    _check_float("q", q, None, "(B, Sq, Hq, D)")
    _check_float("k_cache", kc, q, "(num_blocks, block_size, Hkv, D)")
    _check_float("v_cache", vc, q, "(num_blocks, block_size, Hkv, Dv)")
    B, _, Hq, D = q.shape
    nb, bs, hkv, dk = kc.shape
    if dk != D or D == 0:
        raise AttentionInputError("k_cache", f"head dim {D} (as q), >= 1", str(dk))
    if nb == 0 or bs == 0:
        raise AttentionInputError("k_cache", "at least one block of at least one slot",
                                  _shape(kc))
    if tuple(vc.shape[:3]) != (nb, bs, hkv) or vc.shape[3] == 0:
        raise AttentionInputError("v_cache", f"(num_blocks, block_size, Hkv) = "
                                  f"{(nb, bs, hkv)} (as k_cache), Dv >= 1", _shape(vc))
    if hkv == 0 or Hq % hkv:
        raise AttentionInputError("k_cache", f"a number of heads dividing q's {Hq}",
                                  f"{hkv} heads")
    _check_int("block_table", bt, "(B, max_blocks)", 2, q.device)
    _check_int("cache_seqlens", sl, "(B,)", 1, q.device)
    if bt.shape[0] != B or bt.shape[1] == 0:
        raise AttentionInputError("block_table", f"shape (B, max_blocks) with B = {B} (as q), "
                                  "max_blocks >= 1", _shape(bt))
    if tuple(sl.shape) != (B,):
        raise AttentionInputError("cache_seqlens", f"shape (B,) = ({B},) (as q)", _shape(sl))


def validate_paged(q: Any, k_cache: Any, v_cache: Any, block_table: Any, cache_seqlens: Any,
                   o: CallOptions, check_values: bool = True) -> CallSpec:
    """Check every argument of a paged call; the call's CallSpec (``paged=True``,
    ``seq_k`` = max_blocks * block_size, ``layout`` "bshd")."""
    _check_shapes(q, k_cache, v_cache, block_table, cache_seqlens)
    _check_scalars(o.causal, 0.0, o.scale, o.return_lse)
    if o.mask is not None or o.key_padding_mask is not None or o.alibi_slopes is not None:
        raise AttentionInputError("mask", "no mask, key padding or ALiBi for a paged call",
                                  "a tensor")
    grads = [n for n, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
                            ("sinks", o.sinks)) if t is not None and t.requires_grad]
    if torch.is_grad_enabled() and grads:
        raise AttentionInputError(grads[0], "tensors that need no gradient (attention_paged "
                                  "is forward-only)", f"{', '.join(grads)} requires grad",
                                  "call it under torch.no_grad() or pass detached tensors")
    B, Sq, Hq, D = q.shape
    nb, bs, hkv, _ = k_cache.shape
    if check_values:
        check_paged_values(block_table, cache_seqlens, Sq, nb, bs)
    return CallSpec(
        device_type=q.device.type, device_index=q.device.index, dtype=q.dtype, batch=B,
        heads_q=Hq, heads_kv=hkv, seq_q=Sq, seq_k=block_table.shape[1] * bs, head_dim=D,
        head_dim_v=v_cache.shape[-1], layout="bshd", paged=True, block_size=bs,
        **structured_fields(o, B, Hq, q.device, q.dtype))


# ------------------------------------------------------------ gathering


def gather_dense(k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                 cache_seqlens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The used blocks of every row as a dense right-aligned batch.

    Returns k (B, M, Hkv, D), v (B, M, Hkv, Dv) and the key padding mask
    (B, M) bool (True = real key), M = max_blocks * block_size: row b's key j
    sits at M - L_b + j, the first M - L_b slots are zeros.  Reads no slot
    past a row's length and no block past its used ones (NaN there changes
    nothing); no host synchronisation.

    Equivalent math::

        for b in range(B):
            L = cache_seqlens[b]
            keys = cat([k_cache[block_table[b, n]] for n in range(ceil(L / bs))])[:L]
            k[b] = cat([zeros(M - L, Hkv, D), keys])
    """
    bs = k_cache.shape[1]
    m = block_table.shape[1] * bs
    lengths = cache_seqlens.long()[:, None]
    j = torch.arange(m, device=k_cache.device)[None, :] - (m - lengths)  # (B, M)
    real = j >= 0
    jc = j.clamp(min=0)
    blocks = block_table.long().gather(1, jc // bs)
    blocks = torch.where(real, blocks, torch.zeros_like(blocks))  # block 0 exists
    slots = jc % bs
    keep = ~real[..., None, None]
    return _rows(k_cache, blocks, slots).masked_fill_(keep, 0.0), \
        _rows(v_cache, blocks, slots).masked_fill_(keep, 0.0), real


def _rows(cache: Tensor, blocks: Tensor, slots: Tensor) -> Tensor:
    """cache[blocks, slots] (B, M, Hkv, D), a fresh tensor: one index_select of
    whole (Hkv, D) rows where the cache's first two axes flatten to a view (a
    row copy, ~10x faster than two-tensor indexing on the CPU), else the
    indexing."""
    nb, bs = cache.shape[:2]
    if cache.stride(0) == bs * cache.stride(1) or nb == 1:
        flat = cache.flatten(0, 1)
        return flat.index_select(0, (blocks * bs + slots).view(-1)).view(
            *blocks.shape, *cache.shape[2:])
    return cache[blocks, slots]


# ------------------------------------------------------------ the decision


_plans = PlanCache("paged.plans", 1024)
# the last call's memo (.guards.memo): a decode loop's next call with the same
# metadata skips validation's Python and the key; the C-level checks per key
_last: list[Optional[tuple]] = [None]
_checks: dict[tuple, Any] = {}


def clear_plans() -> None:
    _plans.clear()
    _checks.clear()
    _last[0] = None


register_cache("paged.remembered", clear_plans)


def dense_spec(spec: CallSpec) -> CallSpec:
    """The gathered dense equivalent of a paged call (right-aligned, key padding)."""
    return dataclasses.replace(spec, paged=False, block_size=0, key_padding=True)


def route_reasons(name: str, spec: CallSpec, forced: bool, canary: bool = True
                  ) -> tuple[list[str], list[str]]:
    """(reasons against the native route, reasons against the gathered route)."""
    native = reasons(name, spec, forced, canary)
    gathered = reasons(name, dense_spec(spec), forced, canary) if native else []
    return native, gathered


def decide_paged(spec: CallSpec, selection: tuple[str, ...]
                 ) -> tuple[Optional[Backend], bool, dict[str, list[str]]]:
    """The backend for a paged call: the first candidate (rank order) that
    takes it natively, reading the cache in place; else, in rank order, the
    first that takes the gathered dense call, or its native route where that
    gathers too (``Backend.paged_gathers``: math); (backend, native, every
    refused candidate's reasons)."""
    forced = "auto" not in selection
    names = candidates(selection, spec.device, spec)
    native_why = {n: reasons(n, spec, forced) for n in names}
    for n in names:
        if not native_why[n] and not _gathers(n):
            return REGISTRY.load(n)[0], True, {}
    refused: dict[str, list[str]] = {}
    for n in names:
        if not native_why[n]:  # a native route that gathers, at its rank
            return REGISTRY.load(n)[0], True, refused
        gathered = reasons(n, dense_spec(spec), forced)
        if not gathered:
            return REGISTRY.load(n)[0], False, refused
        refused[n] = _merge(native_why[n], gathered)
    return None, False, refused


def _gathers(name: str) -> bool:
    """Whether ``name``'s native route gathers too (``Backend.paged_gathers``)."""
    inst, _ = REGISTRY.load(name)
    return inst is not None and inst.paged_gathers


def _merge(native: list[str], gathered: list[str]) -> list[str]:
    """Reasons against both routes: shared ones once, the others prefixed."""
    both = [r for r in native if r in gathered]
    return (both + [f"native: {r}" for r in native if r not in both]
            + [f"gathered: {r}" for r in gathered if r not in both])


def _plan(key: tuple, spec: CallSpec, selection: tuple[str, ...],
          scale: Optional[float]) -> RoutePlan:
    inst, native, refused = decide_paged(spec, selection)
    if inst is None:
        raise BackendUnavailable(selection, refused)
    route = NATIVE if native else GATHERED
    _events.emit(_events.DECISION, inst.name, f"selection {','.join(selection)}; {route}", spec)
    eff = effective_scale(scale, spec.head_dim)
    plan = RoutePlan(inst, native, spec, eff)
    _plans.store(key, plan)
    return plan


# ----------------------------------------------------------------- the call


def paged_call(selection: tuple[str, ...], q: Tensor, k_cache: Tensor, v_cache: Tensor,
               block_table: Tensor, cache_seqlens: Tensor, o: CallOptions,
               check_values: bool = True) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """A paged call (``attention_paged``'s arguments, the selection resolved):
    validated (the table's and lengths' values too, if ``check_values``),
    decided once per signature, run."""
    compiling = torch.compiler.is_compiling()
    ts = (q, k_cache, v_cache, block_table, cache_seqlens)
    hit = None if compiling else recall(_last[0], selection, ts, o)
    if hit is not None:
        key, plan = hit
        spec = plan.spec
        if check_values:
            check_paged_values(block_table, cache_seqlens, spec.seq_q, k_cache.shape[0],
                               spec.block_size)
    else:
        spec = validate_paged(q, k_cache, v_cache, block_table, cache_seqlens, o,
                              check_values=check_values and not compiling)
        key = (selection, spec, o.scale, type(o.scale))
        plan = _plans.get(key)
        if plan is None:
            plan = _plan(key, spec, selection, o.scale)
        if not compiling:
            _remember(key, plan, selection, ts, o)
    if spec.batch == 0 or spec.seq_q == 0:
        out = q.new_zeros(q.shape[:-1] + (v_cache.shape[-1],))
        lse = torch.full((spec.batch, spec.heads_q, spec.seq_q), float("-inf"),
                         device=q.device)
    else:
        args = (q, k_cache, v_cache, block_table, cache_seqlens, o)
        tried: set[tuple[str, bool]] = set()
        while True:
            try:
                out, lse = _run_plan(plan, spec, *args)
                break
            except Exception as exc:  # demote it for this signature, run the next one
                tried.add((plan.backend.name, plan.native))
                plan = _fallen_back(key, plan, spec, selection, o.scale, exc)
                if (plan.backend.name, plan.native) in tried:  # never the same route twice
                    raise
    if o.return_lse:
        return out, lse.detach()  # type: ignore[union-attr]
    return out


def _remember(key: tuple, plan: RoutePlan, selection: tuple[str, ...], ts: tuple[Tensor, ...],
              o: CallOptions) -> None:
    """Remember this call (:func:`.guards.memo`) while its plan is the cached one."""
    if len(_checks) >= 1024:  # a bound on memory, as the plans have
        _checks.clear()
    m = memo(_checks, key, plan, selection, ts, o)
    if m is None:
        return
    with _plans._lock:  # not a plan a fallback has just dropped
        if _plans.get(key) is plan:
            _last[0] = m


def _run_plan(plan: RoutePlan, spec: CallSpec, q: Tensor, k_cache: Tensor,
              v_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor, o: CallOptions
              ) -> tuple[Tensor, Any]:
    if not plan.native:
        return _run_gathered(plan, q, k_cache, v_cache, block_table, cache_seqlens, o)
    q, k_cache, v_cache = _conform(plan.backend.stride_requirements(spec), q, k_cache, v_cache)
    return plan.backend.forward_paged(
        q, k_cache, v_cache, spec=spec, block_table=block_table.contiguous(),
        cache_seqlens=cache_seqlens.contiguous(), scale=plan.scale, **keyword_tensors(o))


def _fallen_back(key: tuple, plan: RoutePlan, spec: CallSpec, selection: tuple[str, ...],
                 scale: Optional[float], exc: Exception) -> RoutePlan:
    """The plan's backend raised: as for dense calls (``demote_or_raise``), then
    the next eligible route is decided and kept."""
    name = plan.backend.name
    _reliability.demote_or_raise(name, selection, spec, exc)
    _reliability.demote(name, dense_spec(spec), exc)  # both of its routes, not the other
    _plans.pop(key, None)
    _last[0] = None
    new = _plan(key, spec, selection, scale)
    _events.emit(_events.FALLBACK, new.backend.name, f"{name} raised {type(exc).__name__}: "
                 f"{str(exc)[:200]}", spec, level=logging.INFO)
    return new


def _conform(req: StrideRequirements, *ts: Tensor) -> tuple[Tensor, ...]:
    """Tensors whose memory breaks the kernel's rule, copied contiguous (judged
    per call; a copy of a cache is the price of a layout the kernel cannot read)."""
    return tuple(t.contiguous() if req.violation(t) is not None or req.misaligned(t) else t
                 for t in ts)


def _run_gathered(plan: RoutePlan, q: Tensor, k_cache: Tensor, v_cache: Tensor,
                  block_table: Tensor, cache_seqlens: Tensor, o: CallOptions
                  ) -> tuple[Tensor, Optional[Tensor]]:
    """The dense route: gather right-aligned, one dense call on the plan's backend."""
    from .dispatch import call

    kd, vd, kpm = gather_dense(k_cache, v_cache, block_table, cache_seqlens)
    res = call((plan.backend.name,), q, kd, vd,
               o._replace(key_padding_mask=kpm, layout="bshd", scale=plan.scale))
    return res if plan.spec.return_lse else (res, None)  # type: ignore[return-value]


# ------------------------------------------------------------------ explain


def explain_paged_options(backend: BackendArg, q: Any, k_cache: Any, v_cache: Any,
                          block_table: Any, cache_seqlens: Any, o: CallOptions) -> Decision:
    """:func:`explain_paged` for a :class:`CallOptions`: the backend and route
    ``attention_paged`` would use, and each backend's reasons for both routes
    ("native: ..." and "gathered: ..."); each verdict's note names the route.
    Validates the arguments (values too); runs nothing else."""
    selection, source = resolve(backend)
    spec = validate_paged(q, k_cache, v_cache, block_table, cache_seqlens, o)
    forced = "auto" not in selection
    names = candidates(selection, spec.device, spec)
    others = [n for n in REGISTRY.names() if n not in names]
    routes = {n: route_reasons(n, spec, forced, canary=False) for n in names + others}
    # the order of decide_paged: in-place native routes, then the rest by rank
    chosen = next((n for n in names if not routes[n][0] and not _gathers(n)), None)
    if chosen is None:
        chosen = next((n for n in names if not routes[n][0] or not routes[n][1]), None)
    out = []
    for rank, n in [(i, n) for i, n in enumerate(names)] + [(None, n) for n in others]:
        native, gathered = routes[n]
        ok = not native or not gathered
        status = CHOSEN if n == chosen else ACCEPTED if ok else REFUSED
        why: tuple[str, ...] = () if ok else tuple(_merge(native, gathered))
        if rank is None and ok:
            status, why = SKIPPED, ("not in the selection " + ",".join(selection),)
        out.append(BackendVerdict(n, status, why, rank, _route_note(n, native) if ok else None))
    return Decision(chosen, selection, source, spec, tuple(out))


def _route_note(name: str, native: list[str]) -> str:
    """An accepting verdict's note: its route, and what the native one needs."""
    inst, _ = REGISTRY.load(name)
    if not native:
        tail = inst is not None and inst.paged_reads_tail
        return f"route: {NATIVE}" + ("; reads a row's last block whole: the slots past "
                                     "its length must be finite" if tail else "")
    pages = inst is not None and "paged" in inst.capabilities.extras
    return f"route: {GATHERED}" + (f" (native refused: {'; '.join(native)})" if pages else "")
