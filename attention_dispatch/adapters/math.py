"""``math``: plain PyTorch attention; supports every feature of the contract.

Equivalent math::

    s = scale * q @ k.T + float_mask        # (B, Hq, Sq, Sk), k/v expanded for GQA
    s[~keep] = -inf                          # bool mask & key padding & causal
    p = softmax(s) (0 for rows with no allowed key); p = dropout(p, dropout_p)
    out = p @ v;  lse = logsumexp(s, -1)     # -inf for rows with no allowed key
"""

from __future__ import annotations

from typing import Optional

import torch

from .._backend import AttentionResult, Backend
from .._capabilities import Capabilities
from .._masks import additive_bias, expand_kv
from .._spec import CallSpec

Tensor = torch.Tensor


def safe_softmax(s: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last axis that gives 0 (not NaN) for all -inf rows.

    Returns (p, lse) with lse = -inf for such rows; gradients stay finite.
    """
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    alive = denom > 0
    safe = torch.where(alive, denom, torch.ones_like(denom))
    p = e / safe
    # log of a safe denominator, then -inf: finite gradients through lse too
    lse = (torch.log(safe) + m).masked_fill(~alive, float("-inf")).squeeze(-1)
    return p, lse


class MathBackend(Backend):
    """Reference-quality attention in plain torch ops (materialises the scores)."""

    capabilities = Capabilities(
        device_types=frozenset({"cpu", "cuda", "mps", "xpu"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        empty_rows_exact=True,
    )

    def describe(self) -> str:
        return f"torch {torch.__version__} (matmul + softmax)"

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, spec: CallSpec,
                mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                dropout_p: float, scale: float) -> AttentionResult:
        k = expand_kv(k, spec.heads_q)
        v = expand_kv(v, spec.heads_q)
        # scores and softmax in float32 for half inputs; p is rounded to the
        # input dtype before p @ v, as fused kernels do
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        s = torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale
        bias = additive_bias(spec, mask, key_padding_mask, acc)
        if bias is not None:
            s = s + bias
        p, lse = safe_softmax(s)
        if dropout_p > 0:
            p = torch.nn.functional.dropout(p, dropout_p, training=True)
        out = torch.matmul(p.to(q.dtype), v)
        return out, (lse.float() if spec.return_lse else None)
