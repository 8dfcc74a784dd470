"""Verify mode: check real calls against the reference while they run.

``ATTENTION_DISPATCH_VERIFY=N`` (read once; ``clear_cache()`` re-reads it) or
``with ad.verify(N):`` (context-local, like ``use_backend``; it wins over the
variable, and ``verify(0)`` turns it off inside) re-computes the first N calls
of each call signature with the reference, on a small sample of the call: the
first batch entry, the first and last query heads with their kv heads, and at
most 64 query rows (all of them when Sq <= 64, else evenly spaced ones, the
last included), in float64 on the CPU and float32 on CUDA.  The backend's rows
must obey the contract's accuracy rule against it, with the ``math`` backend
in the call's dtype on the same sample as the yardstick::

    max|backend - ref| <= 2 * max|math - ref| + atol(dtype) * (1 + max|ref|)

A mismatch emits a ``verify`` event, writes a quarantine entry (see
``_quarantine``), and then: with "auto" in the selection the backend is
demoted for the signature and the call is answered by the next eligible
backend; a forced backend raises :class:`~attention_dispatch.BackendRuntimeError`
(chained to a :class:`WrongResultError`).

Not verified: calls with dropout (random by design), calls traced by
torch.compile or captured in a CUDA graph, the lse and gradients (only the
output), and ``attention_varlen``.  Off (the default), it costs one
context-variable read per call.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from typing import Any, Iterator, Optional

import torch

from .backend import Backend
from .reference import reference_attention, within_rule
from .spec import CallSpec
from .caches import register_cache

ENV_VERIFY = "ATTENTION_DISPATCH_VERIFY"
MAX_ROWS = 64
Tensor = torch.Tensor

_var: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar(
    "attention_dispatch_verify", default=None)
_env: list[Optional[int]] = [None]
_lock = threading.Lock()
_done: dict[Any, int] = {}


class WrongResultError(RuntimeError):
    """A backend's result broke the contract's accuracy rule in verify mode."""


@contextlib.contextmanager
def verify(calls: int = 1) -> Iterator[None]:
    """Within the block, check the first ``calls`` calls of each call signature
    against the reference (see the module docstring); ``verify(0)``: off.

    Example::

        with ad.verify(3):
            model(batch)          # every attention signature checked 3 times
    """
    if not isinstance(calls, int) or isinstance(calls, bool) or calls < 0:
        from .errors import AttentionTypeError

        raise AttentionTypeError("calls", "an int >= 0", calls, "verify(3)")
    token = _var.set(calls)
    try:
        yield
    finally:
        _var.reset(token)


def budget() -> int:
    """How many calls per signature are verified now (0: off)."""
    n = _var.get()
    if n is not None:
        return n
    if _env[0] is None:
        raw = os.environ.get(ENV_VERIFY, "0").strip() or "0"
        _env[0] = int(raw) if raw.isdigit() else 0
    return _env[0]


def forget() -> None:
    """Re-read the variable and restart the per-signature counts (ad.clear_cache)."""
    with _lock:
        _env[0] = None
        _done.clear()


register_cache("verify", forget)


def due(key: Any, n: int) -> bool:
    """Whether this call of signature ``key`` is one of its first ``n``."""
    if key is None:
        return False
    with _lock:
        seen = _done.get(key, 0)
        if seen >= n:
            return False
        _done[key] = seen + 1
        return True


def skipped(dropout_p: float, q: Tensor) -> bool:
    """Calls verify mode leaves alone: dropout, CUDA graph capture."""
    return dropout_p > 0 or (q.is_cuda and torch.cuda.is_current_stream_capturing())


def _sample(spec: CallSpec) -> tuple[list[int], list[int], Tensor]:
    """Query heads, their kv heads, query rows."""
    heads = sorted({0, spec.heads_q - 1})
    group = spec.heads_q // spec.heads_kv
    kv = sorted({h // group for h in heads})
    if spec.seq_q <= MAX_ROWS:
        rows = torch.arange(spec.seq_q)
    else:
        rows = torch.linspace(0, spec.seq_q - 1, MAX_ROWS).round().long().unique()
    return heads, kv, rows


def _row_conditions(spec: CallSpec, rows: Tensor, device: torch.device,
                    slopes: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """For the sampled rows only: the causal/window keep mask (R, Sk) and the
    ALiBi bias (1, H, R, Sk) (None where the call has neither)."""
    r = rows.to(device)[:, None]
    d = torch.arange(spec.seq_k, device=device)[None, :] - (r + spec.causal_offset)
    keep = None
    left, right = spec.window if spec.window is not None else (-1, -1)
    for cond in ((d >= -left) if left >= 0 else None, (d <= right) if right >= 0 else None,
                 (d <= 0) if spec.causal else None):
        if cond is not None:
            keep = cond if keep is None else keep & cond
    bias = None
    if slopes is not None:
        bias = -(slopes[:, :, None, None].float() * d.abs().float())
    return keep, bias


def _sample_mask(spec: CallSpec, mask: Optional[Tensor], heads: Tensor, rows: Tensor,
                 slopes: Optional[Tensor], acc: torch.dtype) -> Optional[Tensor]:
    """The call's dense mask, causal, window and ALiBi on the sample, as one mask
    (bool when nothing is additive, else a float bias with -inf)."""
    full = (spec.batch, spec.heads_q, spec.seq_q, spec.seq_k)
    m = None
    if mask is not None:  # a broadcast view of the caller's mask: only the sample is copied
        m = torch.broadcast_to(mask, full)[:1].index_select(1, heads).index_select(2, rows)
    keep, alibi = _row_conditions(spec, rows, heads.device, slopes)
    if alibi is None and (m is None or m.dtype == torch.bool):
        if keep is None:
            return m
        return keep[None, None] if m is None else m & keep
    bias = torch.zeros((1, len(heads), len(rows), spec.seq_k), dtype=acc, device=heads.device)
    if m is not None:
        bias = bias + m.to(acc) if m.dtype != torch.bool else bias.masked_fill(~m, float("-inf"))
    if alibi is not None:
        bias = bias + alibi.to(acc)
    return bias if keep is None else bias.masked_fill(~keep, float("-inf"))


def check(backend: Backend, math: Backend, spec: CallSpec, q: Tensor, k: Tensor, v: Tensor,
          mask: Optional[Tensor], kpm: Optional[Tensor], scale: float,
          alibi_slopes: Optional[Tensor], out: Tensor, sinks: Optional[Tensor] = None
          ) -> Optional[str]:
    """Why ``out`` (bhsd) breaks the accuracy rule on the sample, or None.
    q, k, v: the call's bhsd views; ``math`` gives the yardstick; ``sinks``
    (Hq,) the call's attention sinks."""
    heads, kv, rows = _sample(spec)
    dev = q.device
    acc = torch.float64 if dev.type == "cpu" else torch.float32
    h, hk, r = (torch.tensor(x, device=dev) for x in (heads, kv, rows.tolist()))
    with torch.no_grad():
        qs = q[:1].index_select(1, h).index_select(2, r)
        ks, vs = k[:1].index_select(1, hk), v[:1].index_select(1, hk)
        got = out[:1].index_select(1, h).index_select(2, r)
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes.reshape(-1, spec.heads_q)[:1].index_select(1, h)
        m = _sample_mask(spec, mask, h, r, slopes, acc)
        kp = None if kpm is None else kpm[:1]
        sk = {} if sinks is None else {"sinks": sinks.index_select(0, h)}
        ref, _ = reference_attention(qs, ks, vs, mask=m, key_padding_mask=kp, scale=scale,
                                     softcap=spec.softcap, precision=acc, **sk)
        small = _sample_spec(spec, len(heads), len(kv), len(rows), m, kp is not None)
        base, _ = math.forward(qs, ks, vs, spec=small, mask=m, key_padding_mask=kp,
                               dropout_p=0.0, scale=scale, **sk)
        err = (got.to(acc) - ref).abs().max().item()
        err_math = (base.to(acc) - ref).abs().max().item()
        top = ref.abs().max().item()
    if within_rule(err, err_math, top, spec.dtype):
        return None
    return (f"{backend.name} broke the accuracy rule on a sample of the call (batch 0, heads "
            f"{heads}, {len(rows)} rows): max error {err:.3g}, math's {err_math:.3g}, "
            f"max |ref| {top:.3g}")


def _sample_spec(spec: CallSpec, hq: int, hkv: int, rows: int, mask: Optional[Tensor],
                 padding: bool) -> CallSpec:
    import dataclasses

    kind = "none" if mask is None else ("bool" if mask.dtype == torch.bool else "float")
    return dataclasses.replace(spec, batch=1, heads_q=hq, heads_kv=hkv, seq_q=rows,
                               mask_kind=kind, key_padding=padding, causal=False, window=None,
                               alibi=False, dropout=False, return_lse=False,
                               requires_grad=False, mask_grad=False)
