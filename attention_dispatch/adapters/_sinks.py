"""Attention sinks for kernels that return an LSE and whose backward takes
``(out, lse)``: the exact correction, forward and backward.

The kernel runs without the sink; its result is corrected, and its own
backward runs against the corrected output and LSE, which makes its
probabilities ``exp(x - lse')`` the sink-aware ones: dq, dk and dv are exact,
and the sinks' gradient is one reduction.

Equivalent math (per row, ``L`` the kernel's LSE, ``s`` the head's sink)::

    L' = logaddexp(L, s);  out' = exp(L - L') * out          # 0 for a row with no key
    dq, dk, dv = kernel_backward(dout', q, k, v, out=out', lse=L')
    dsink = -sum_rows exp(s - L') * rowsum(dout' * out')
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

Tensor = torch.Tensor
Forward = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
Backward = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor],
                    tuple[Tensor, Tensor, Tensor]]


class _LseSinks(torch.autograd.Function):
    """(q, k, v, sinks) -> (out', lse' float32, float64 for float64 outputs); the
    LSE output is not differentiable."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, fwd: Forward,
                bwd: Backward) -> tuple[Tensor, Tensor]:
        out, lse = fwd(q, k, v)
        acc = torch.float64 if out.dtype == torch.float64 else torch.float32
        raw = lse.to(acc)
        # rows with no key: -inf (kernels write +inf, NaN or 0 with out 0 there;
        # a finite value is harmless: out is 0 and no key has weight)
        raw = torch.where(torch.isnan(raw) | torch.isposinf(raw), float("-inf"), raw)
        s = sinks.detach().to(acc).view(1, -1, 1)
        lse_s = torch.logaddexp(raw, s)
        out_s = (out.to(acc) * torch.exp(raw - lse_s).unsqueeze(-1)).to(out.dtype)
        ctx.save_for_backward(q, k, v, out_s, lse_s, sinks)
        ctx.bwd, ctx.lse_dtype = bwd, lse.dtype
        ctx.mark_non_differentiable(lse_s)
        return out_s, lse_s

    @staticmethod
    def backward(ctx: Any, dout: Tensor, _dlse: Optional[Tensor]) -> tuple:
        q, k, v, out_s, lse_s, sinks = ctx.saved_tensors
        dout = dout.contiguous()
        dq = dk = dv = dsink = None
        if any(ctx.needs_input_grad[:3]):
            dq, dk, dv = ctx.bwd(dout, q, k, v, out_s, lse_s.to(ctx.lse_dtype))
        if ctx.needs_input_grad[3]:
            p_sink = torch.exp(sinks.detach().to(lse_s.dtype).view(1, -1, 1) - lse_s)
            delta = (dout.to(lse_s.dtype) * out_s.to(lse_s.dtype)).sum(-1)
            dsink = (-(p_sink * delta).sum((0, 2))).to(sinks.dtype)
        return dq, dk, dv, dsink, None, None


def sinks_via_lse(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, fwd: Forward,
                  bwd: Backward) -> tuple[Tensor, Tensor]:
    """Attention with sinks (Hq,) from a sink-free kernel: q (B, Hq, Sq, D),
    k/v (B, Hkv, Sk, D|Dv) as the kernel takes them; ``fwd(q, k, v)`` ->
    (out (B, Hq, Sq, Dv), lse (B, Hq, Sq)); ``bwd(dout, q, k, v, out, lse)`` ->
    (dq, dk, dv).  Returns (out', lse' float32 or float64), differentiable in q, k,
    v and sinks."""
    return _LseSinks.apply(q, k, v, sinks, fwd, bwd)
