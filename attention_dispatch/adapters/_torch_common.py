"""Translation helpers shared by the adapters of torch's fused SDPA kernels."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import torch

from .._core.maskvalues import derived, value_key
from .._core.masks import additive_bias, expand_kv
from .._core.layout import Buffer
from .._core.spec import CallSpec
from . import _estimates as est

Tensor = torch.Tensor


def top_left_causal_flag(spec: CallSpec, other_masks: bool) -> tuple[bool, bool]:
    """Translate bottom-right causal for a kernel whose ``is_causal`` is top-left.

    Returns ``(is_causal, causal_in_bias)``: use the kernel flag only where the
    two alignments agree (Sq == Sk) and no other mask is given (a window counts
    as one); with Sq == 1 the bottom-right mask admits every key, so nothing is
    masked at all.
    """
    other_masks = other_masks or spec.window is not None
    if not spec.causal or spec.seq_q == 1:
        return False, False
    if spec.seq_q == spec.seq_k and not other_masks:
        return True, False
    return False, True


def torch_bias(spec: CallSpec, mask: Optional[Tensor], kpm: Optional[Tensor],
               dtype: torch.dtype, causal_in_bias: bool,
               alibi_slopes: Optional[Tensor] = None) -> Optional[Tensor]:
    """Additive bias in ``dtype`` with the masks the kernel cannot take natively
    (a window and ALiBi included: materialised, O(Sq * Sk))."""
    if (mask is None and kpm is None and not causal_in_bias and spec.window is None
            and alibi_slopes is None):
        return None
    if alibi_slopes is None and spec.device_type == "cpu":
        km, kk = value_key(mask), value_key(kpm)
        if km is not None and kk is not None:  # small bool CPU masks: once per value
            return derived(("bias", km, kk, dtype, causal_in_bias, spec.seq_q, spec.seq_k,
                            spec.window, spec.device_type),
                           lambda: _bias(spec, mask, kpm, dtype, causal_in_bias, None))
    return _bias(spec, mask, kpm, dtype, causal_in_bias, alibi_slopes)


def _bias(spec: CallSpec, mask: Optional[Tensor], kpm: Optional[Tensor], dtype: torch.dtype,
          causal_in_bias: bool, alibi_slopes: Optional[Tensor]) -> Optional[Tensor]:
    bias = additive_bias(spec, mask, kpm, dtype, causal=causal_in_bias,
                         alibi_slopes=alibi_slopes)
    # torch's kernels take 2-D or 4-D masks only; the contract allows any
    # mask broadcastable to (B, Hq, Sq, Sk), e.g. a 3-D (Hq, Sq, Sk) one
    if bias is not None and bias.dim() == 3:
        bias = bias.unsqueeze(0)
    return bias


def aligned_bias(bias: Tensor, spec: CallSpec, align: int) -> Tensor:
    """Expand ``bias`` to (B, Hq, Sq, Sk) on storage whose rows are padded to a
    multiple of ``align`` elements (the memory-efficient kernel's rule)."""
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    b = spec.batch if bias.shape[0] != 1 else 1
    h = spec.heads_q if bias.shape[1] != 1 else 1
    sq = spec.seq_q if bias.shape[2] != 1 else 1  # a key padding bias stays (B, 1, 1, Sk)
    pad = (-spec.seq_k) % align
    store = bias.new_empty(b, h, sq, spec.seq_k + pad)
    store[..., : spec.seq_k] = bias
    return store[..., : spec.seq_k].expand(spec.batch, spec.heads_q, spec.seq_q, spec.seq_k)


def cudnn_dead_row_grads(spec: CallSpec, kernel: str = "cuDNN's backward") -> list[str]:
    """cuDNN's backward gives non-finite dq/dk/dv for a fully masked query row
    at Sq = 1 where the answer is 0 (measured by GPU fuzzing: H100, cuDNN 9.19;
    H200, torch 2.11, cuDNN 9.19, also through torch's own call, which picks
    cuDNN there): the reason against such calls, for every CUDA path that
    reaches cuDNN (``kernel`` names it)."""
    if (spec.device_type == "cuda" and spec.seq_q == 1 and spec.requires_grad
            and spec.may_have_empty_rows):
        return [f"gradients at Sq = 1 with a mask or key padding on CUDA; {kernel} gives "
                "non-finite gradients for a fully masked row there"]
    return []


def half_only_on_cuda(spec: CallSpec) -> list[str]:
    """The fused CUDA kernels take float16/bfloat16 only."""
    if spec.device_type == "cuda" and spec.dtype not in (torch.float16, torch.bfloat16):
        return [f"dtype {str(spec.dtype).replace('torch.', '')} on CUDA; allowed: float16/bfloat16"]
    return []


def _folded_spec(spec: CallSpec) -> Optional[CallSpec]:
    """The call with GQA folded into the query sequence, where that is exact:
    every query head of a group then reads its kv head as one longer query
    sequence (B, Hkv, g*Sq, D).  Needs masks that do not depend on the query
    head or position: no dense mask, window or ALiBi, and causal only at Sq == 1
    (where bottom-right causal admits every key)."""
    if (not spec.gqa or (spec.causal and spec.seq_q > 1) or spec.mask_kind != "none"
            or spec.window is not None or spec.alibi):
        return None
    groups = spec.heads_q // spec.heads_kv
    return dataclasses.replace(spec, heads_q=spec.heads_kv, seq_q=groups * spec.seq_q,
                               causal=False)


# torch's CUDA flash and cuDNN aten operators take K/V with fewer heads than Q
# (grouped: query head h reads kv head h // (Hq // Hkv)), forward and backward
# (dK/dV summed over each group), as F.sdpa(enable_gqa=True) hands them over.
# Measured exact on torch 2.11 (cuDNN 9.19, H200) against a float64 reference,
# and faster than folding at decode (B=1, Sk=32k: the native call lets both
# kernels split the keys); older versions fold or expand K/V as before.
NATIVE_GQA_TORCH = (2, 11)


def native_gqa_cuda(spec: CallSpec) -> bool:
    """Whether torch's CUDA flash / cuDNN operators take this GQA call's K/V
    unexpanded (CUDA, torch >= :data:`NATIVE_GQA_TORCH`)."""
    return spec.device_type == "cuda" and _torch_version() >= NATIVE_GQA_TORCH


@functools.lru_cache(maxsize=None)  # read on every CUDA call: parsed once
def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def gqa_buffers(spec: CallSpec, native: bool) -> list[Buffer]:
    """The K/V copy :func:`with_gqa` makes for ``spec`` (none when folded); when
    native, with gradients, the dK/dV the backward keeps at Hq heads before
    summing each group (FA2's backward does; counted for cuDNN too, unmeasured)."""
    if native:
        return [est.kv_copy(spec, spec.heads_q, f"dK/dV at {spec.heads_q} heads in the "
                            "backward (GQA)")] if spec.gqa and spec.requires_grad else []
    if _folded_spec(spec) is not None:
        return []
    return est.gqa_expansion(spec)


def with_gqa(kernel: Callable[..., tuple[Tensor, Optional[Tensor]]], q: Tensor, k: Tensor,
             v: Tensor, spec: CallSpec, *, native: bool = False,
             **kw: object) -> tuple[Tensor, Optional[Tensor]]:
    """Run ``kernel(q, k, v, spec, **kw)`` on a GQA call: K/V unexpanded where
    the kernel takes GQA natively (``native``, e.g. :func:`native_gqa_cuda` for
    torch's flash and cuDNN operators), else folded (no K/V copy; decode reads
    K/V once) where exact, else with K/V expanded to Hq heads."""
    if native:
        return kernel(q, k, v, spec, **kw)
    folded = _folded_spec(spec)
    if folded is None:
        return kernel(q, expand_kv(k, spec.heads_q), expand_kv(v, spec.heads_q), spec, **kw)
    b, hq, sq, d = q.shape
    out, lse = kernel(q.reshape(b, spec.heads_kv, folded.seq_q, d), k, v, folded, **kw)
    out = out.reshape(b, hq, sq, out.shape[-1])
    return out, (None if lse is None else lse.reshape(b, hq, sq))


def traced_sdpa(q: Tensor, k: Tensor, v: Tensor, kind: str, *, bias: Optional[Tensor],
                is_causal: bool, dropout_p: float, scale: float) -> Tensor:
    """Under ``torch.compile``: torch's own SDPA function (the binding
    ``torch._C._nn.scaled_dot_product_attention``, which stays torch's when a
    user routes ``F.scaled_dot_product_attention`` to this package) inside ``sdpa_kernel([kind])`` ("cudnn" or "efficient"), the form dynamo and
    inductor trace forward and backward.  Measured on an H200 (torch 2.11,
    bench/compile_probe.py, docs/results/compile-probe-h200-2026-12-03.json):
    dynamo cannot wrap the outputs of the operators' generated bindings
    (``torch._scaled_dot_product_cudnn_attention``: ``AssertionError`` in
    ``handle_traced_output``), and inductor's meta function of
    ``_efficient_attention_backward`` breaks (``got multiple values for
    argument 'scale'``).  ``is_causal`` is top-left here: callers pass it only
    where Sq == Sk and no bias is given (else causal is in ``bias``).  K/V with
    fewer heads than q are expanded (a copy: F.sdpa's ``enable_gqa`` is not
    taken by every kernel it may be restricted to)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.CUDNN_ATTENTION if kind == "cudnn" else SDPBackend.EFFICIENT_ATTENTION
    if k.shape[1] != q.shape[1]:
        k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    with sdpa_kernel([backend]):
        return torch._C._nn.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
