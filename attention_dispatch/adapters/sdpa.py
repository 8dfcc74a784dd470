"""``sdpa``: torch's own ``scaled_dot_product_attention``, with torch choosing the kernel.

This is the call a user makes without us.  Where torch has a fused kernel of
its own that no other adapter reaches (MPS, XPU, ROCm builds), it is the
fast path; on CPU and NVIDIA GPUs the adapters of torch's individual kernels
(``sdpa-flash``, ``sdpa-cudnn``, ``sdpa-mem-efficient``) rank ahead of it, and
it is reached there by name (``backend="sdpa"``).

Translation to torch's semantics: causal is passed as ``is_causal`` only
where torch's top-left alignment equals the contract's bottom-right one
(Sq == Sk, no other mask); otherwise masks, key padding, causal, a window and
ALiBi become one additive bias (materialised, O(Sq * Sk); off the CPU on rows
padded to 16 elements, and q/k/v copied where their memory breaks the fused
kernels' rule, as torch's own call does not refuse views it reads wrong).  GQA through
``enable_gqa`` (torch >= 2.5), else K/V expanded.  Rows with no key are set
to 0 by the dispatcher; key-padding slots are zeroed first (torch's kernels
read them).  No LSE, no softcap.

Equivalent math: see :mod:`attention_dispatch.adapters.math`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch
import torch.nn.functional as F

from .._core.backend import AttentionResult, Backend
from .._core.capabilities import Capabilities
from .._core.layout import ANY_STRIDES, CUDA_ALIGNED, Buffer, StrideRequirements
from .._core.masks import expand_kv
from .._core.spec import CallSpec
from . import _estimates as est
from ._torch_common import (aligned_bias, cudnn_dead_row_grads, top_left_causal_flag,
                            torch_bias)

Tensor = torch.Tensor
#: torch's function as it was when this module was imported (``patch_sdpa``
#: replaces the attribute; this adapter must never call itself)
_TORCH_SDPA = F.scaled_dot_product_attention


def _has_enable_gqa() -> bool:
    try:
        return "enable_gqa" in inspect.signature(_TORCH_SDPA).parameters
    except (TypeError, ValueError):  # a builtin without a signature: try the keyword
        return True


class SdpaBackend(Backend):
    """torch.nn.functional.scaled_dot_product_attention (torch picks the kernel)."""

    capabilities = Capabilities(
        device_types=frozenset({"cpu", "cuda", "mps", "xpu"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        # CPU: torch's CPU kernels read any strides.  Elsewhere see stride_requirements
        strides=ANY_STRIDES,
        lse=False,
        window=True,  # materialised into the bias
        alibi=True,   # likewise
        # forward kernels: no atomics.  Backward: CPU (torch's CPU flash kernel)
        # deterministic; elsewhere torch may pick flash / memory-efficient /
        # cuDNN, whose backward is not (see capabilities_on)
        deterministic_forward=True,
        deterministic_backward=True,
    )

    def __init__(self) -> None:
        self._gqa = _has_enable_gqa()

    def describe(self) -> str:
        return f"torch {torch.__version__} scaled_dot_product_attention (torch's choice)"

    def capabilities_on(self, device: torch.device) -> Capabilities:
        """Off the CPU torch may choose a kernel whose backward accumulates with
        atomics (not deterministic there), and the fused kernels' memory rule
        applies (see :meth:`stride_requirements`)."""
        if device.type == "cpu":
            return self.capabilities
        return dataclasses.replace(self.capabilities, deterministic_backward=False,
                                   strides=CUDA_ALIGNED)

    def stride_requirements(self, spec: CallSpec) -> StrideRequirements:
        """CPU: any strides.  Elsewhere the rule of the fused kernels torch may
        pick (unit last stride, 16-byte aligned strides and data pointers, no
        stride 0): measured on an H200 (torch 2.11, bench/gpu_fuzz.py,
        2026-12-03), torch's own call gave wrong answers for views with a
        storage offset off that alignment, and did not refuse them."""
        if spec.device_type == "cpu":
            return self.capabilities.strides
        return CUDA_ALIGNED

    def nondeterminism_note(self, spec: CallSpec, backward: bool) -> str:
        return ("(torch may choose its flash, memory-efficient or cuDNN kernel, whose "
                "backward accumulates with atomics)")

    def buffers(self, spec: CallSpec) -> tuple[Buffer, ...]:
        """The additive bias of masks, non-square causal, window and ALiBi; K/V
        expanded for GQA where torch has no ``enable_gqa``."""
        other = spec.mask_kind != "none" or spec.key_padding or spec.alibi
        _, in_bias = top_left_causal_flag(spec, other_masks=other)
        return est.listed(est.bias(spec, in_bias),
                          *(est.gqa_expansion(spec) if not self._gqa else []))

    def check(self, spec: CallSpec) -> list[str]:
        out = []
        if spec.mask_grad:
            out.append("a float mask that requires grad; torch's fused kernels may give it "
                       "no gradient")
        if (spec.device_type == "cpu" and spec.requires_grad
                and spec.dtype in (torch.float16, torch.bfloat16)):
            out.append(f"gradients in {str(spec.dtype).replace('torch.', '')} on CPU; "
                       "allowed: float32/float64 (torch's CPU flash backward is inexact in "
                       "half precision)")
        return out + cudnn_dead_row_grads(spec, "torch's choice there (cuDNN)")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, spec: CallSpec,
                mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                dropout_p: float, scale: float,
                alibi_slopes: Optional[Tensor] = None) -> AttentionResult:
        other = mask is not None or key_padding_mask is not None or alibi_slopes is not None
        is_causal, in_bias = top_left_causal_flag(spec, other_masks=other)
        bias = torch_bias(spec, mask, key_padding_mask, q.dtype, in_bias, alibi_slopes)
        if bias is not None and spec.device_type != "cpu":  # rows on 16-element storage
            bias = aligned_bias(bias, spec, 16)
        kw = {}
        if spec.gqa and self._gqa:
            kw["enable_gqa"] = True
        elif spec.gqa:
            k, v = expand_kv(k, spec.heads_q), expand_kv(v, spec.heads_q)
        out = _TORCH_SDPA(q, k, v, attn_mask=bias, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, **kw)
        return out, None
