"""``sdpa-mem-efficient``: torch's memory-efficient (cutlass) CUDA kernel.

Called as ``aten._efficient_attention_forward`` on (B, S, H, D) views, the entry
torch itself uses for bottom-right causal (``custom_mask_type=2``), so causal
needs no materialised mask for any Sq/Sk.  Masks and key padding become one
additive bias on storage padded to 16 elements per row (the kernel's alignment
rule).  Its bottom-right mode is wrong when Sq > Sk (measured on an H100,
torch 2.11: errors of ~3 on rows that have keys), so those causal calls put the
causal mask into the bias instead.  Dropout, LSE, Dv != D; GQA by expanding K/V.

Equivalent math: see :mod:`attention_dispatch.adapters.math`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._core.backend import AttentionResult, Backend
from .._core.capabilities import Capabilities
from .._core.layout import CUDA_ALIGNED, Buffer
from .._core.spec import CallSpec
from . import _estimates as est
from ._torch_common import _folded_spec, aligned_bias, torch_bias, traced_sdpa, with_gqa

Tensor = torch.Tensor

_NO_CAUSAL, _CAUSAL_BOTTOM_RIGHT = 0, 2


class SdpaMemEfficientBackend(Backend):
    """torch's memory-efficient attention on CUDA."""

    capabilities = Capabilities(
        device_types=frozenset({"cuda"}),
        strides=CUDA_ALIGNED,
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        max_head_dim=512,
        head_dim_multiple=8,
        min_compute_capability=(5, 0),
        # forward: no atomics; backward: dQ (and, split over keys, dK/dV) are
        # accumulated with atomics
        deterministic_forward=True,
        deterministic_backward=False,
    )

    def describe(self) -> str:
        return f"torch {torch.__version__} memory-efficient kernel"

    def nondeterminism_note(self, spec: CallSpec, backward: bool) -> str:
        return ("(torch's memory-efficient backward accumulates gradients with atomics; "
                "deterministic only under torch.use_deterministic_algorithms(True))")

    def buffers(self, spec: CallSpec) -> tuple[Buffer, ...]:
        """The additive bias (built, then copied onto 16-aligned rows) and K/V
        expanded for GQA unless folded."""
        in_bias = spec.causal and spec.seq_q > spec.seq_k
        gqa = est.gqa_expansion(spec) if _folded_spec(spec) is None else []
        return est.listed(est.bias(spec, in_bias, copies=2), *gqa)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, spec: CallSpec,
                mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                dropout_p: float, scale: float) -> AttentionResult:
        return with_gqa(_kernel, q, k, v, spec, mask=mask, kpm=key_padding_mask,
                        dropout_p=dropout_p, scale=scale)


def _kernel(q: Tensor, k: Tensor, v: Tensor, spec: CallSpec, *, mask: Optional[Tensor],
            kpm: Optional[Tensor], dropout_p: float, scale: float) -> AttentionResult:
    """One kernel call on (B, H, S, D) views with Hq == Hkv."""
    causal_in_bias = spec.causal and spec.seq_q > spec.seq_k
    if torch.compiler.is_compiling() and spec.requires_grad and not spec.return_lse:
        # F.sdpa (top-left is_causal): the flag only where Sq == Sk and no mask
        flag = spec.causal and spec.seq_q == spec.seq_k and mask is None and kpm is None
        bias = torch_bias(spec, mask, kpm, q.dtype, spec.causal and not flag)
        return traced_sdpa(q, k, v, "efficient", bias=bias, is_causal=flag,
                           dropout_p=dropout_p, scale=scale), None
    bias = torch_bias(spec, mask, kpm, q.dtype, causal_in_bias)
    if bias is not None:
        bias = aligned_bias(bias, spec, 16)
    res = torch.ops.aten._efficient_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        bias=bias, cu_seqlens_q=None, cu_seqlens_k=None,
        max_seqlen_q=None, max_seqlen_k=None, dropout_p=dropout_p,
        custom_mask_type=(_CAUSAL_BOTTOM_RIGHT if spec.causal and not causal_in_bias
                          else _NO_CAUSAL),
        compute_log_sumexp=spec.return_lse or spec.requires_grad, scale=scale)
    out, lse = res[0].transpose(1, 2), res[1]
    if spec.return_lse:
        lse = lse[..., : spec.seq_q].float()
    return out, (lse if spec.return_lse else None)
