"""``sdpa-cudnn``: cuDNN's fused attention through torch, called directly.

``aten._scaled_dot_product_cudnn_attention``: float16/bfloat16, sm80+, head
dims multiples of 8 up to 128, dropout, LSE, additive bias, GQA natively on
torch >= 2.11 (else folded or K/V expanded, see ``_torch_common``).  Its ``is_causal``
is top-left, so it is used only where that equals bottom-right (Sq == Sk);
other causal calls put the causal mask into the bias.  cuDNN returns garbage
for query rows with no allowed key: the dispatcher zeroes them (and their
gradients), which costs nothing for calls that cannot have such rows.

Equivalent math: see :mod:`attention_dispatch.adapters.math`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .._core.backend import AttentionResult, Backend
from .._core.capabilities import Capabilities
from .._core.layout import CUDA_ALIGNED, Buffer
from .._core.spec import CallSpec
from . import _estimates as est
from ._torch_common import (aligned_bias, cudnn_dead_row_grads, gqa_buffers, native_gqa_cuda,
                            top_left_causal_flag, torch_bias, traced_sdpa, with_gqa)

Tensor = torch.Tensor


class SdpaCudnnBackend(Backend):
    """cuDNN attention (torch's sdpa-cudnn kernel)."""

    capabilities = Capabilities(
        device_types=frozenset({"cuda"}),
        strides=CUDA_ALIGNED,
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        max_head_dim=128,
        head_dim_multiple=8,
        different_v_head_dim=False,
        min_compute_capability=(8, 0),
        # forward: deterministic; backward: torch's documentation warns that
        # with cuDNN "this operator may select a nondeterministic algorithm"
        deterministic_forward=True,
        deterministic_backward=False,
    )

    def describe(self) -> str:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        return f"torch {torch.__version__} cuDNN {cudnn}"

    def nondeterminism_note(self, spec: CallSpec, backward: bool) -> str:
        return "(torch documents cuDNN attention's backward as possibly non-deterministic)"

    def buffers(self, spec: CallSpec) -> tuple[Buffer, ...]:
        """The additive bias (built, then copied onto 8-aligned rows) and K/V
        expanded for GQA where the operator has no native GQA and folding is
        not exact."""
        _, in_bias = top_left_causal_flag(spec, False)
        gqa = gqa_buffers(spec, native_gqa_cuda(spec))
        return est.listed(est.bias(spec, in_bias, copies=2), *gqa)

    def probe(self, device: torch.device) -> list[str]:
        out = super().probe(device)
        if not out and not torch.backends.cudnn.is_available():
            out.append("cuDNN is not available in this torch build")
        return out

    def check(self, spec: CallSpec) -> list[str]:
        out = []
        if spec.mask_grad:
            out.append("a float mask that requires grad; cuDNN attention gives no gradient "
                       "for attn_bias")
        if spec.seq_q == 1 and spec.seq_k == 1:  # measured: "s_q = s_kv = 1 is not supported"
            out.append("Sq = Sk = 1; cuDNN's frontend refuses it")
        return out + cudnn_dead_row_grads(spec)

    def plain_call(self, spec: CallSpec, scale: float, dropout_p: float, q: Tensor, k: Tensor,
                   v: Tensor) -> Optional[Callable[[Tensor, Tensor, Tensor], Tensor]]:
        """:func:`_kernel` alone where nothing goes into a bias and GQA needs no
        folding or expansion, arguments passed positionally (keyword parsing is
        host time); None otherwise."""
        is_causal, in_bias = top_left_causal_flag(spec, False)
        if (dropout_p != 0.0 or in_bias or spec.mask_kind != "none" or spec.key_padding
                or spec.return_lse or (spec.gqa and not native_gqa_cuda(spec))):
            return None
        kernel, lse = torch._scaled_dot_product_cudnn_attention, spec.requires_grad
        if scale == 1.0 / math.sqrt(spec.head_dim):
            return lambda q, k, v: kernel(q, k, v, None, lse, 0.0, is_causal)[0]
        return lambda q, k, v: kernel(q, k, v, None, lse, 0.0, is_causal, False, scale=scale)[0]

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, spec: CallSpec,
                mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                dropout_p: float, scale: float) -> AttentionResult:
        return with_gqa(_kernel, q, k, v, spec, native=native_gqa_cuda(spec), mask=mask,
                        kpm=key_padding_mask, dropout_p=dropout_p, scale=scale)


def _kernel(q: Tensor, k: Tensor, v: Tensor, spec: CallSpec, *, mask: Optional[Tensor],
            kpm: Optional[Tensor], dropout_p: float, scale: float) -> AttentionResult:
    """One cuDNN call on (B, H, S, D) views (Hkv < Hq where native, see with_gqa).

    The operator takes its causal flag together with a bias (unlike torch's
    F.scaled_dot_product_attention front end): with Sq == Sk a mask or key
    padding goes into the bias while causal stays the flag, so the kernel
    skips the blocks above the diagonal and the bias stays (B, 1, 1, Sk) for
    key padding instead of a materialised (B, 1, Sq, Sk) causal bias."""
    is_causal, in_bias = top_left_causal_flag(spec, False)
    if torch.compiler.is_compiling():
        return _traced(q, k, v, spec, mask, kpm, dropout_p, scale, is_causal, in_bias)
    bias = torch_bias(spec, mask, kpm, q.dtype, in_bias)
    if bias is not None:
        bias = aligned_bias(bias, spec, 8)
    res = torch._scaled_dot_product_cudnn_attention(  # aten op, generated binding
        q, k, v, bias, spec.return_lse or spec.requires_grad, dropout_p, is_causal,
        False, scale=scale)
    out, lse = res[0], res[1]
    if spec.return_lse:
        lse = lse.reshape(spec.batch, spec.heads_q, spec.seq_q).float()
    return out, (lse if spec.return_lse else None)


def _traced(q: Tensor, k: Tensor, v: Tensor, spec: CallSpec, mask: Optional[Tensor],
            kpm: Optional[Tensor], dropout_p: float, scale: float, is_causal: bool,
            in_bias: bool) -> AttentionResult:
    """:func:`_kernel` under torch.compile: F.sdpa restricted to cuDNN (causal
    into the bias beside a mask, which F.sdpa takes no flag with), or, for
    the LSE, the operator's ``torch.ops.aten`` overload (see ``traced_sdpa``)."""
    if spec.return_lse:
        bias = torch_bias(spec, mask, kpm, q.dtype, in_bias)
        res = torch.ops.aten._scaled_dot_product_cudnn_attention.default(
            q, k, v, None if bias is None else aligned_bias(bias, spec, 8), True, dropout_p,
            is_causal, False, scale=scale)
        return res[0], res[1].reshape(spec.batch, spec.heads_q, spec.seq_q).float()
    with_mask = mask is not None or kpm is not None or in_bias
    bias = torch_bias(spec, mask, kpm, q.dtype, in_bias or (is_causal and with_mask))
    return traced_sdpa(q, k, v, "cudnn", bias=bias, is_causal=is_causal and not with_mask,
                       dropout_p=dropout_p, scale=scale), None
