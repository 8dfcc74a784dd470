"""``math``: plain PyTorch attention; supports every feature of the contract.

Equivalent math::

    s = scale * q @ k.T                      # (B, Hq, Sq, Sk), k/v expanded for GQA
    s = softcap * tanh(s / softcap)          # if softcap
    s = s + float_mask - slope * |i + Sk - Sq - j|   # float mask, ALiBi
    s[~keep] = -inf                          # bool mask & key padding & causal & window
    p = softmax(s) (0 for rows with no allowed key); p = dropout(p, dropout_p)
    out = p @ v;  lse = logsumexp(s, -1)     # -inf for rows with no allowed key
    # sinks: softmax and lse over [s, sinks[h]] (one more column), p without it;
    # dropout then acts on the real keys' probabilities only

Packed variable-length calls (``forward_varlen``) loop over the sequences and
run the dense path on each (one host synchronisation to read the lengths).
Paged calls (``forward_paged``) gather each row's used blocks into a dense
right-aligned batch with key padding (``_core.paged.gather_dense``: slots past
a row's length are zeros, never read) and run the dense path once.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .._core.backend import AttentionResult, Backend
from .._core.capabilities import Capabilities
from .._core.layout import ANY_STRIDES
from .._core.masks import additive_bias, expand_kv, softcap_scores
from .._core.paged import dense_spec, gather_dense
from .._core.layout import Buffer
from .._core.spec import CallSpec
from . import _estimates as est

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
        strides=ANY_STRIDES,
        empty_rows_exact=True,
        window=True,
        softcap=True,
        alibi=True,
        varlen=True,
        extras=frozenset({"paged", "sinks"}),
        # matmul, softmax and elementwise ops: no atomics in either direction
        # (on CUDA, cuBLAS needs CUBLAS_WORKSPACE_CONFIG=:4096:8 for bitwise
        # reproducibility across streams; torch's deterministic mode says so)
        deterministic_forward=True,
        deterministic_backward=True,
    )

    def describe(self) -> str:
        return f"torch {torch.__version__} (matmul + softmax)"

    def buffers(self, spec: CallSpec) -> tuple[Buffer, ...]:
        """The score matrix (B*Hq*Sq*Sk*(2a + e[a != e]) bytes, see
        ``_estimates``), the bias of masks, causal, window and ALiBi, and K/V
        expanded for GQA."""
        return est.listed(est.scores(spec), est.bias(spec, causal_in_bias=spec.causal),
                          *est.gqa_expansion(spec))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, spec: CallSpec,
                mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                dropout_p: float, scale: float, alibi_slopes: Optional[Tensor] = None,
                sinks: Optional[Tensor] = None) -> AttentionResult:
        k = expand_kv(k, spec.heads_q)
        v = expand_kv(v, spec.heads_q)
        # scores and softmax in float32 for half inputs; p is rounded to the
        # input dtype before p @ v, as fused kernels do
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        s = softcap_scores(torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale, spec.softcap)
        bias = additive_bias(spec, mask, key_padding_mask, acc, alibi_slopes=alibi_slopes)
        if bias is not None:
            s = s + bias
        if sinks is not None:  # the sink column joins the softmax, then leaves
            col = sinks.to(acc).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
            p, lse = safe_softmax(torch.cat([s, col], -1))
            p = p[..., :-1]
        else:
            p, lse = safe_softmax(s)
        if dropout_p > 0:
            p = torch.nn.functional.dropout(p, dropout_p, training=True)
        out = torch.matmul(p.to(q.dtype), v)
        return out, (lse.float() if spec.return_lse else None)

    def forward_varlen(self, q: Tensor, k: Tensor, v: Tensor, *, spec: CallSpec,
                       cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                       max_seqlen_k: int, dropout_p: float, scale: float,
                       alibi_slopes: Optional[Tensor] = None,
                       sinks: Optional[Tensor] = None) -> AttentionResult:
        """Packed call: q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, Dv) ->
        out (Tq, Hq, Dv), lse (Hq, Tq) float32 or None; one dense call per sequence."""
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs, lses = [], []
        for b in range(len(cq) - 1):
            qb = q[cq[b]:cq[b + 1]].transpose(0, 1).unsqueeze(0)   # (1, Hq, Lq, D)
            kb = k[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
            vb = v[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
            sb = dataclasses.replace(spec, varlen=False, batch=1, seq_q=qb.shape[2],
                                     seq_k=kb.shape[2])
            slopes = None
            if alibi_slopes is not None:
                slopes = alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes
            if sb.seq_q == 0:
                continue
            if sb.seq_k == 0:  # no key: zeros (with zero, finite gradients), lse -inf
                ob = qb.new_zeros(qb.shape[:-1] + (v.shape[-1],)) + 0.0 * qb.sum()
                lb = torch.full(qb.shape[:-1], float("-inf"), device=q.device)
            else:
                extra = {} if sinks is None else {"sinks": sinks}
                ob, lb = self.forward(qb, kb, vb, spec=sb, mask=None, key_padding_mask=None,
                                      dropout_p=dropout_p, scale=scale, alibi_slopes=slopes,
                                      **extra)
            outs.append(ob[0].transpose(0, 1))
            lses.append(lb[0] if lb is not None else None)
        if not outs:
            out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
            lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
            return out, (lse if spec.return_lse else None)
        out = torch.cat(outs, 0)
        return out, (torch.cat(lses, -1).float() if spec.return_lse else None)

    paged_gathers = True  # forward_paged gathers, as the gathered route does

    def forward_paged(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, *, spec: CallSpec,
                      block_table: Tensor, cache_seqlens: Tensor, scale: float,
                      sinks: Optional[Tensor] = None) -> AttentionResult:
        """Paged call: q (B, Sq, Hq, D) -> out (B, Sq, Hq, Dv), lse (B, Hq, Sq) or
        None; the used blocks gathered right-aligned, then the dense path
        (bottom-right causal on the padded length = per row on the real one)."""
        kd, vd, kpm = gather_dense(k_cache, v_cache, block_table, cache_seqlens)
        out, lse = self.forward(q.transpose(1, 2), kd.transpose(1, 2), vd.transpose(1, 2),
                                spec=dense_spec(spec), mask=None, key_padding_mask=kpm,
                                dropout_p=0.0, scale=scale, sinks=sinks)
        return out.transpose(1, 2), lse
