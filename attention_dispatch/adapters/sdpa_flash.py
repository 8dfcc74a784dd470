"""``sdpa-flash``: torch's flash-attention kernels, called directly.

* CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` - takes an
  additive mask (bool masks, key padding and non-square causal are turned
  into one), native GQA, no dropout, Dv == D.  Sliding windows and ALiBi are
  taken on the CPU as part of that additive mask: it is *materialised*
  ((B|1, Hq|1, Sq, Sk) in the input dtype), so they cost O(Sq * Sk) memory
  here, unlike the ``flex`` backend; no softcap (it is not additive).
  Attention sinks: the kernel's LSE corrected and its backward run against the
  corrected output (exact; ``_sinks``).
* CUDA: ``aten._scaled_dot_product_flash_attention`` (FA2 vendored in torch,
  sm80+) - no mask of any kind, causal is bottom-right natively, dropout,
  float16/bfloat16, head dim a multiple of 8 up to 256, GQA natively on
  torch >= 2.11 (else folded into the query sequence where exact, or K/V
  expanded).

Equivalent math: see :mod:`attention_dispatch.adapters.math`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch

from .._core.backend import AttentionResult, Backend
from .._core.capabilities import Capabilities
from .._core.layout import CUDA_ALIGNED, StrideRequirements
from .._core.layout import Buffer
from .._core.maskvalues import padding_end, shorter
from .._core.spec import CallSpec
from . import _estimates as est
from ._sinks import sinks_via_lse
from ._torch_common import (gqa_buffers, half_only_on_cuda, native_gqa_cuda,
                            top_left_causal_flag, torch_bias, with_gqa)

Tensor = torch.Tensor
# the aten kernels through torch's generated bindings: the same operator as
# ``torch.ops.aten.<name>`` (same dispatch: autocast, modes, autograd), ~5 us
# less host time per call than the schema-matching ``torch.ops`` path
_cpu_kernel = torch._scaled_dot_product_flash_attention_for_cpu


class SdpaFlashBackend(Backend):
    """torch's flash kernels (CPU flash kernel; FA2 on CUDA)."""

    capabilities = Capabilities(
        device_types=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        different_v_head_dim=False,
        min_compute_capability=(8, 0),
        dropout=True,
        window=True,  # CPU only (materialised bias); check() refuses it on CUDA
        alibi=True,   # CPU only, likewise
        extras=frozenset({"sinks"}),  # CPU only (through the LSE, _sinks), likewise
        # forward: no atomics (FA2's split-KV partial results are combined by a
        # separate kernel in a fixed order).  Backward: the CPU kernel reduces in
        # a fixed order; CUDA's FA2 backward accumulates dQ with atomics (torch
        # makes it deterministic only under torch.use_deterministic_algorithms(
        # True) at backward time, which a decision cannot rely on): see
        # capabilities_on
        deterministic_forward=True,
        deterministic_backward=True,
    )

    def describe(self) -> str:
        return f"torch {torch.__version__} flash kernel"

    def stride_requirements(self, spec: CallSpec) -> StrideRequirements:
        """CPU: a unit last stride (the kernel reads rows as contiguous
        vectors and gives wrong answers otherwise); CUDA: FA2's aligned rule."""
        return CUDA_ALIGNED if spec.device_type == "cuda" else self.capabilities.strides

    def capabilities_on(self, device: torch.device) -> Capabilities:
        """CPU: no dropout.  CUDA: float16/bfloat16, D <= 256, no mask of any
        kind, no window, no ALiBi (see :meth:`check`)."""
        if device.type == "cpu":
            return dataclasses.replace(self.capabilities, dropout=False)
        return dataclasses.replace(self.capabilities, dtypes=frozenset({torch.float16,
                                                                        torch.bfloat16}),
                                   max_head_dim=256, mask_kinds=frozenset(), key_padding=False,
                                   window=False, alibi=False, deterministic_backward=False)

    def nondeterminism_note(self, spec: CallSpec, backward: bool) -> str:
        return ("(torch's CUDA flash backward accumulates dQ with atomics; deterministic "
                "only under torch.use_deterministic_algorithms(True) at backward time)")

    def buffers(self, spec: CallSpec) -> tuple[Buffer, ...]:
        """CPU: the additive bias of masks, key padding, non-square causal, window
        and ALiBi (materialised).  CUDA: K/V expanded for GQA where neither native
        nor folded."""
        if spec.device_type == "cpu":
            _, in_bias = top_left_causal_flag(spec, other_masks=False)
            return est.listed(est.bias(spec, in_bias))
        return tuple(gqa_buffers(spec, native_gqa_cuda(spec)))

    def check(self, spec: CallSpec) -> list[str]:
        if spec.device_type == "cpu":
            out = ["dropout_p > 0; torch's CPU flash kernel cannot drop out"] if spec.dropout else []
            if spec.mask_grad:
                out.append("a float mask that requires grad; torch's CPU flash kernel gives "
                           "no gradient for attn_mask")
            if spec.requires_grad and spec.dtype in (torch.float16, torch.bfloat16):
                # found by tests/test_fuzz.py: its backward loses precision in half
                # types (bf16 dq/dk up to ~4x math's error, past the contract's bound)
                out.append(f"gradients in {str(spec.dtype).replace('torch.', '')} on CPU; "
                           "allowed: float32/float64 (the CPU flash backward is inexact in "
                           "half precision)")
            return out
        out = half_only_on_cuda(spec)
        if spec.mask_kind != "none" or spec.key_padding:
            out.append("a mask or key_padding_mask; torch's CUDA flash kernel takes no attn_mask")
        if spec.window is not None or spec.alibi:
            out.append(f"window={spec.window}, alibi={spec.alibi} on CUDA; allowed: neither "
                       "(torch's CUDA flash kernel takes no bias; use flex or flash-attn)")
        if spec.sinks:
            out.append("sinks on CUDA; this backend applies them on the CPU only (use "
                       "flash-attn or flex)")
        if spec.head_dim > 256 or spec.head_dim % 8:
            out.append(f"head_dim={spec.head_dim} on CUDA; allowed: multiples of 8 up to 256")
        return out

    def plain_call(self, spec: CallSpec, scale: float, dropout_p: float, q: Tensor, k: Tensor,
                   v: Tensor) -> Optional[Callable[[Tensor, Tensor, Tensor], Tensor]]:
        """The kernel alone where no bias is needed (see :meth:`forward`): CPU,
        and CUDA where GQA needs no folding."""
        if dropout_p != 0.0:
            return None
        if spec.device_type == "cuda":
            return _plain_cuda(spec, scale)
        return _plain_cpu(spec, scale)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, spec: CallSpec,
                mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                dropout_p: float, scale: float, alibi_slopes: Optional[Tensor] = None,
                sinks: Optional[Tensor] = None) -> AttentionResult:
        if spec.device_type != "cpu":
            return with_gqa(_cuda_kernel, q, k, v, spec, native=native_gqa_cuda(spec),
                            dropout_p=dropout_p, scale=scale)
        if key_padding_mask is not None:
            k, v, mask, key_padding_mask, spec = _drop_padded_tail(k, v, mask, key_padding_mask,
                                                                   spec)
        # the CPU kernel takes is_causal together with a mask (and then skips the
        # blocks above the diagonal): the causal flag is used wherever top-left
        # equals bottom-right, whatever other masks come with it
        is_causal, in_bias = top_left_causal_flag(spec, other_masks=False)
        bias = torch_bias(spec, mask, key_padding_mask, q.dtype, in_bias, alibi_slopes)
        if sinks is not None:
            out, lse = _cpu_with_sinks(q, k, v, sinks, is_causal, bias, scale)
            return out, (lse.float() if spec.return_lse else None)
        if bias is None:  # keyword parsing costs host time: only what is given
            out, lse = _cpu_kernel(q, k, v, 0.0, is_causal, scale=scale)
        else:
            out, lse = _cpu_kernel(q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale)
        return out, (lse.float() if spec.return_lse else None)


def _cpu_with_sinks(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, is_causal: bool,
                    bias: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """The CPU kernel with attention sinks: its LSE corrected, its own backward
    run against the corrected output and LSE (exact; see ``_sinks``)."""
    aten = torch.ops.aten

    def fwd(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale)

    def bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
            ) -> tuple[Tensor, Tensor, Tensor]:
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, is_causal, attn_mask=bias, scale=scale)

    return sinks_via_lse(q, k, v, sinks, fwd, bwd)


def _plain_cpu(spec: CallSpec, scale: float) -> Optional[Callable[[Tensor, Tensor, Tensor],
                                                                   Tensor]]:
    """The CPU kernel call of :meth:`SdpaFlashBackend.forward` for a call
    without masks (no bias to build), or None where a bias is needed."""
    if (spec.device_type != "cpu" or spec.mask_kind != "none" or spec.key_padding
            or spec.window is not None or spec.alibi or spec.return_lse or spec.sinks):
        return None
    is_causal, in_bias = top_left_causal_flag(spec, other_masks=False)
    if in_bias:
        return None
    kernel = _cpu_kernel
    # keyword parsing costs ~3 us a call: leave out what equals the kernel's
    # default (its default scale is the same double, 1 / sqrt(D))
    if scale == 1.0 / math.sqrt(spec.head_dim):
        if not is_causal:
            return lambda q, k, v: kernel(q, k, v)[0]
        return lambda q, k, v: kernel(q, k, v, 0.0, True)[0]
    return lambda q, k, v: kernel(q, k, v, 0.0, is_causal, scale=scale)[0]


def _plain_cuda(spec: CallSpec, scale: float) -> Optional[Callable[[Tensor, Tensor, Tensor],
                                                                    Tensor]]:
    """:func:`_cuda_kernel` without masks, dropout or LSE, arguments passed
    positionally (keyword parsing is host time); None where GQA is folded."""
    if (spec.mask_kind != "none" or spec.key_padding or spec.window is not None or spec.alibi
            or spec.return_lse or spec.sinks or (spec.gqa and not native_gqa_cuda(spec))):
        return None
    kernel, causal = torch._scaled_dot_product_flash_attention, spec.causal
    if scale == 1.0 / math.sqrt(spec.head_dim):
        return lambda q, k, v: kernel(q, k, v, 0.0, causal)[0]
    return lambda q, k, v: kernel(q, k, v, 0.0, causal, False, scale=scale)[0]


def _drop_padded_tail(k: Tensor, v: Tensor, mask: Optional[Tensor], kpm: Tensor,
                      spec: CallSpec) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor, CallSpec]:
    """Keys after the last real key of every batch row take no part: cut them
    (views, no copy), so the CPU kernel skips their blocks.  Only where nothing
    depends on Sk's value (not causal, no window, no ALiBi); a CPU host read of
    the mask costs no device sync.  Not under torch.compile: the cut depends on
    the mask's values (a data-dependent shape), so a traced call keeps all keys."""
    if spec.causal or spec.window is not None or spec.alibi or torch.compiler.is_compiling():
        return k, v, mask, kpm, spec
    end = padding_end(kpm)  # remembered per value for small masks
    if end is None:
        real = kpm.any(0)
        n = int(real.nonzero().max()) + 1 if bool(real.any()) else 1
    else:
        n = max(end[0], 1)
    if n >= spec.seq_k:
        return k, v, mask, kpm, spec
    if mask is not None and mask.shape[-1] != 1:
        mask = mask.narrow(-1, 0, n)
    return k.narrow(2, 0, n), v.narrow(2, 0, n), mask, kpm.narrow(1, 0, n), shorter(spec, n, True)


def _cuda_kernel(q: Tensor, k: Tensor, v: Tensor, spec: CallSpec, *, dropout_p: float,
                 scale: float) -> AttentionResult:
    """torch's CUDA flash kernel on (B, H, S, D) views (Hkv < Hq where native,
    see with_gqa); its is_causal is bottom-right.  Under torch.compile through
    its ``torch.ops.aten`` overload: dynamo cannot wrap the outputs of the
    generated binding on CUDA (see ``_torch_common.traced_sdpa``)."""
    op = (torch.ops.aten._scaled_dot_product_flash_attention.default
          if torch.compiler.is_compiling() else torch._scaled_dot_product_flash_attention)
    res = op(q, k, v, dropout_p, spec.causal, False, scale=scale)
    return res[0], (res[1].float() if spec.return_lse else None)
