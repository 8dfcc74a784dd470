"""Block backward of ring attention: the gradients of one (query shard, kv
block) pair against the GLOBAL output and lse, added into accumulators.

Implementations, chosen by ``impl``:

* ``"fused"``: torch's flash backward kernel, given the global ``out`` and
  ``lse`` (the kernel recomputes p = exp(scale q k^T - lse) and
  delta = rowsum(dout * out) from exactly what it is given):
  CUDA: ``aten._scaled_dot_product_flash_attention_backward`` (fp16/bf16,
  head dim a multiple of 8 up to 256, sm80+); CPU:
  ``aten._scaled_dot_product_flash_attention_for_cpu_backward``.
  GQA is expanded per call (kv heads repeated, dk/dv summed per group), and the
  heads are processed in chunks so the kernel's temporaries stay small.
* ``"cudnn"`` (CUDA; what "auto" takes there where it applies): the same with cuDNN's
  backward, ``aten._scaled_dot_product_cudnn_attention_backward`` (fp16/bf16,
  head dim a multiple of 8 up to 128, sm80+; lse passed as (B, H, S, 1)).
* ``"torch"``: the same math in plain torch (float32, float64 for float64),
  query rows in chunks to bound the memory of the score block.

``"auto"`` takes cuDNN's kernel on CUDA where it applies (on 2 H100s at
n=128k, bf16, causal zig-zag, fwd+bwd: 1.88x one GPU with cuDNN's backward,
1.23x with the flash backward; bench/ring_bench.py, 2026-11-26), else the
flash kernel where :func:`fused_reason` allows it, and
falls back to plain torch (once warned, remembered per signature) if the
kernel raises.  All tensors are (B, H, S, D) views; lse is (B, Hq, Sq).
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Optional

import torch

from .._core import AttentionInputError


Tensor = torch.Tensor

#: elements of one (rows x keys) score block in the plain-torch path
SCORE_BUDGET = 1 << 25
#: bytes of the (expanded) query chunk of one fused-kernel call
HEAD_CHUNK_BYTES = 512 << 20

_failed: set[tuple] = set()


class _PartialFailure(RuntimeError):
    """The fused kernel failed after adding part of the result: no fallback."""

_lock = threading.Lock()


def fused_reason(q: Tensor, k: Tensor, v: Tensor, kernel: str = "fused") -> Optional[str]:
    """Why the fused backward ``kernel`` ("fused": flash, or "cudnn") cannot
    take these tensors (None: it can)."""
    D, Dv = q.shape[-1], v.shape[-1]
    top = 128 if kernel == "cudnn" else 256
    if D != Dv:
        return f"head dims differ (q/k {D}, v {Dv})"
    if q.device.type == "cuda":
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"dtype {q.dtype} on CUDA; the {kernel} kernel takes float16/bfloat16"
        if D % 8 or D > top:
            return f"head dim {D}; the {kernel} kernel takes multiples of 8 up to {top}"
        if torch.cuda.get_device_capability(q.device) < (8, 0):
            return f"the {kernel} kernel needs sm80 or newer"
        if kernel == "cudnn" and not torch.backends.cudnn.is_available():
            return "cuDNN is not available in this torch build"
        return None
    if q.device.type == "cpu" and kernel != "cudnn":
        return None
    return f"device {q.device.type}; the {kernel} backward kernel does not run there"


def _signature(q: Tensor, k: Tensor) -> tuple:
    return (q.device.type, q.dtype, q.shape[-1], q.shape[1] == k.shape[1])


def _cudnn_call(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor,
                causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """cuDNN's backward, equal head counts; its lse is (B, H, S, 1) float32."""
    seed = torch.zeros((), dtype=torch.long, device=q.device)
    offset = torch.zeros((), dtype=torch.long, device=q.device)
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward.default(
        dout, q, k, v, out, lse.float().unsqueeze(-1).contiguous(), seed, offset, None, None,
        None, q.shape[2], k.shape[2], 0.0, causal, scale=scale)


def _fused_call(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor,
                causal: bool, scale: float, kernel: str) -> tuple[Tensor, Tensor, Tensor]:
    """One kernel call, equal head counts (B, H, S, D) -> (dq, dk, dv)."""
    if kernel == "cudnn":
        return _cudnn_call(q, k, v, out, dout, lse, causal, scale)
    if q.device.type == "cuda":
        seed = torch.empty(2, dtype=torch.uint64, device=q.device)
        offset = torch.empty((), dtype=torch.uint64, device=q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward.default(
            dout, q, k, v, out, lse.float().contiguous(), None, None, q.shape[2], k.shape[2],
            0.0, causal, seed, offset, scale=scale)
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
        dout, q, k, v, out, lse, 0.0, causal, attn_mask=None, scale=scale)


def _fused(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor,
           causal: bool, scale: float, into: tuple[Tensor, Tensor, Tensor],
           kernel: str = "fused") -> None:
    """Fused kernel over chunks of kv heads (GQA expanded inside each chunk)."""
    B, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    per_kv_head = B * G * Sq * D * q.element_size()
    step = max(1, min(Hkv, HEAD_CHUNK_BYTES // max(1, per_kv_head)))
    dq, dk, dv = into
    for h0 in range(0, Hkv, step):
        h1 = min(Hkv, h0 + step)
        hq = slice(h0 * G, h1 * G)
        kc, vc = k[:, h0:h1], v[:, h0:h1]
        if G > 1:
            kc, vc = kc.repeat_interleave(G, 1), vc.repeat_interleave(G, 1)
        try:
            gq, gk, gv = _fused_call(q[:, hq], kc, vc, out[:, hq], dout[:, hq], lse[:, hq],
                                     causal, scale, kernel)
        except Exception as exc:
            if h0 == 0:  # nothing added yet: the caller may fall back
                raise
            raise _PartialFailure("the fused backward failed after some heads were "
                                  "accumulated") from exc
        dq[:, hq] += gq
        if G > 1:
            gk = gk.unflatten(1, (h1 - h0, G)).sum(2, dtype=dk.dtype)
            gv = gv.unflatten(1, (h1 - h0, G)).sum(2, dtype=dv.dtype)
        dk[:, h0:h1] += gk
        dv[:, h0:h1] += gv


def _plain(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor,
           causal: bool, scale: float, into: tuple[Tensor, Tensor, Tensor]) -> None:
    """Plain torch, one query-head group and one chunk of rows at a time.

    Query head h = kv * G + g reads kv head kv, so the heads ``g::G`` of q line
    up with k's heads and dk/dv sum over g without expanding k or v.
    """
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf, vf = k.to(acc), v.to(acc)
    step = max(1, SCORE_BUDGET // max(1, B * Hkv * Sk))
    cols = torch.arange(Sk, device=q.device)
    dq, dk, dv = into
    for g in range(G):
        for a in range(0, Sq, step):
            b = min(Sq, a + step)
            qc = q[:, g::G, a:b].to(acc)
            dc = dout[:, g::G, a:b].to(acc)
            lc = lse[:, g::G, a:b].to(acc).unsqueeze(-1)
            lc = torch.where(torch.isneginf(lc), torch.full_like(lc, math.inf), lc)
            delta = (dc * out[:, g::G, a:b].to(acc)).sum(-1, keepdim=True)
            s = torch.matmul(qc, kf.transpose(-1, -2)) * scale
            if causal:  # bottom-right: key j visible to row i iff j <= i + Sk - Sq
                limit = torch.arange(a, b, device=q.device)[:, None] + (Sk - Sq)
                s = s.masked_fill(cols[None, :] > limit, -math.inf)
            p = torch.exp(s - lc)
            dv += torch.matmul(p.transpose(-1, -2), dc)
            ds = p * (torch.matmul(dc, vf.transpose(-1, -2)) - delta)
            dq[:, g::G, a:b] += torch.matmul(ds, kf) * scale
            dk += torch.matmul(ds.transpose(-1, -2), qc) * scale


def block_grads(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, *,
                causal: bool, scale: float, impl: str,
                into: tuple[Tensor, Tensor, Tensor]) -> None:
    """Add this block's dq, dk, dv into ``into`` (bhsd views, any float dtype).

    Shapes: q, out, dout (B, Hq, Sq, D); k, v (B, Hkv, Sk, D); lse (B, Hq, Sq)
    float32, the GLOBAL lse of these query rows.  ``impl``: "auto", "fused",
    "cudnn", "torch" (see the module docstring).

    Equivalent math::

        p = exp(scale * q @ k[heads]^T - lse)          (causal: bottom-right mask)
        dv += (p^T @ dout) summed per group;  ds = p * (dout @ v[heads]^T - rowsum(dout * out))
        dq += scale * ds @ k[heads];          dk += (scale * ds^T @ q) summed per group
    """
    if impl == "torch":
        return _plain(q, k, v, out, dout, lse, causal, scale, into)
    reason = fused_reason(q, k, v, "cudnn" if impl == "cudnn" else "fused")
    if impl in ("fused", "cudnn"):
        if reason is not None:
            raise AttentionInputError("backward_impl", "'auto' or 'torch' for these tensors",
                                      repr(impl), reason)
        return _fused(q, k, v, out, dout, lse, causal, scale, into, impl)
    key = _signature(q, k)
    kernel = "fused"
    if q.device.type == "cuda" and fused_reason(q, k, v, "cudnn") is None:
        kernel, reason = "cudnn", None  # measured on 2 H100s at 128k: 1.88x vs 1.23x (flash)
    if reason is not None or key in _failed:
        return _plain(q, k, v, out, dout, lse, causal, scale, into)
    try:
        return _fused(q, k, v, out, dout, lse, causal, scale, into, kernel)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        if isinstance(exc, (torch.OutOfMemoryError, _PartialFailure)):
            raise
        with _lock:
            _failed.add(key)
        warnings.warn(f"ring attention: the fused backward kernel failed on {key} "
                      f"({type(exc).__name__}: {str(exc)[:200]}); using the plain-torch "
                      "block backward from now on", RuntimeWarning, stacklevel=2)
    return _plain(q, k, v, out, dout, lse, causal, scale, into)
