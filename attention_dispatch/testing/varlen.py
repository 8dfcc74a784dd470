"""Conformance for packed variable-length calls (re-exported by
:mod:`attention_dispatch.testing`): a per-sequence float64 reference, a case
matrix with ragged lengths (0 and 1 included) and a checker with the same
accuracy rule as the dense suite."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from .dense import CheckResult, alibi_slopes_for, judge, reference_attention, structure_label

Tensor = torch.Tensor


@dataclass(frozen=True)
class VarlenCase:
    """One packed case.  ``seqlens_k`` None means the query lengths (self
    attention); ``extra_max`` makes max_seqlen larger than the longest
    sequence (an upper bound, as flash-attn allows)."""

    seqlens_q: tuple[int, ...] = (5, 0, 1, 9, 3)
    seqlens_k: Optional[tuple[int, ...]] = None
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 32
    head_dim_v: Optional[int] = None
    dtype: torch.dtype = torch.float32
    causal: bool = False
    window: Optional[tuple[int, int]] = None
    softcap: Optional[float] = None
    alibi: str = "none"  # "none", "heads" (Hq,), "batch" (B, Hq)
    grad: bool = False
    lse: bool = False
    scale: Optional[float] = None
    extra_max: int = 0

    @property
    def lengths_k(self) -> tuple[int, ...]:
        return self.seqlens_q if self.seqlens_k is None else self.seqlens_k

    def __str__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        parts = [dt, "q" + ",".join(map(str, self.seqlens_q))]
        if self.seqlens_k is not None:
            parts.append("k" + ",".join(map(str, self.seqlens_k)))
        parts.append(f"h{self.heads_q}/{self.heads_kv}")
        parts.append(f"d{self.head_dim}" + (f"dv{self.head_dim_v}" if self.head_dim_v else ""))
        for flag in ("causal", "grad", "lse"):
            if getattr(self, flag):
                parts.append(flag)
        parts += structure_label(self.window, self.softcap, self.alibi)
        if self.scale is not None:
            parts.append(f"scale{self.scale}")
        if self.extra_max:
            parts.append(f"max+{self.extra_max}")
        return "-".join(parts)


def varlen_cases(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16,
                                                   torch.float16)) -> list[VarlenCase]:
    """Ragged self and cross attention (lengths 0 and 1, Lq > Lk), with and
    without causal; GQA/MQA; windows; softcap; ALiBi; lse; gradients."""
    out: list[VarlenCase] = []
    for dtype in dtypes:
        b = VarlenCase(dtype=dtype)
        out += [replace(b, causal=c, seqlens_q=q, seqlens_k=k) for c, (q, k) in
                itertools.product((False, True), [((5, 0, 1, 9, 3), None),
                                                  ((3, 1, 0, 7, 6), (5, 0, 4, 7, 2)),
                                                  ((12,), (12,))])]
        out += [
            replace(b, grad=True, lse=True, causal=True, seqlens_k=(7, 2, 0, 9, 1)),
            replace(b, heads_kv=1, head_dim_v=16, lse=True, extra_max=3),
            replace(b, window=(2, 1), grad=True), replace(b, window=(3, 0), causal=True, lse=True),
            replace(b, window=(-1, 0), seqlens_k=(8, 3, 1, 4, 0)),
            replace(b, softcap=1.0, causal=True, lse=True),
            replace(b, alibi="heads", causal=True, grad=True),
            replace(b, alibi="batch", seqlens_k=(9, 1, 2, 3, 4), lse=True),
            replace(b, alibi="heads", softcap=2.0, window=(4, 2), causal=True, heads_kv=4,
                    grad=True, lse=True, scale=0.3),
        ]
    return out


def _cu(lengths: tuple[int, ...]) -> Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def make_varlen_inputs(case: VarlenCase, device: Any = "cpu", seed: int = 0) -> dict[str, Any]:
    """Packed q, k, v, cu_seqlens and the keyword arguments for ``case``."""
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(case.seqlens_q), sum(case.lengths_k)
    dv = case.head_dim_v or case.head_dim

    def rnd(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=case.dtype)

    slopes = None
    if case.alibi != "none":
        batch = len(case.seqlens_q) if case.alibi == "batch" else None
        slopes = alibi_slopes_for(case.heads_q, batch, g).to(device)
    return dict(q=rnd(tq, case.heads_q, case.head_dim), k=rnd(tk, case.heads_kv, case.head_dim),
                v=rnd(tk, case.heads_kv, dv), cu_seqlens_q=_cu(case.seqlens_q).to(device),
                cu_seqlens_k=_cu(case.lengths_k).to(device),
                max_seqlen_q=max(case.seqlens_q, default=0) + case.extra_max,
                max_seqlen_k=max(case.lengths_k, default=0) + case.extra_max,
                causal=case.causal, window=case.window, softcap=case.softcap,
                alibi_slopes=slopes, scale=case.scale)


def reference_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                     cu_seqlens_k: Tensor, *, causal: bool = False,
                     scale: Optional[float] = None, window: Optional[tuple[int, int]] = None,
                     softcap: Optional[float] = None, alibi_slopes: Optional[Tensor] = None
                     ) -> tuple[Tensor, Tensor]:
    """Float64 packed reference: :func:`reference_attention` on each sequence.

    q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, Dv) -> out (Tq, Hq, Dv),
    lse (Hq, Tq).  Sequences of length 0 are skipped (queries) or give out 0
    and lse -inf (keys).
    """
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs, ks, vs = (t[a:e].transpose(0, 1)[None] for t, a, e in
                      ((q, cq[b], cq[b + 1]), (k, ck[b], ck[b + 1]), (v, ck[b], ck[b + 1])))
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes
        o, s = reference_attention(qs, ks, vs, causal=causal, scale=scale, window=window,
                                   softcap=softcap, alibi_slopes=slopes)
        outs.append(o[0].transpose(0, 1))
        lses.append(s[0])
    return torch.cat(outs, 0), torch.cat(lses, -1)


def _run(backend: str, case: VarlenCase, inputs: dict[str, Any], grad_out: Optional[Tensor]
         ) -> list[Tensor]:
    from ..structured import attention_varlen

    q, k, v = (inputs[n].detach().clone().requires_grad_(case.grad) for n in "qkv")
    kw = {n: inputs[n] for n in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                 "max_seqlen_k")}
    res = attention_varlen(q, k, v, **kw, causal=case.causal, window=case.window,
                           softcap=case.softcap, alibi_slopes=inputs["alibi_slopes"],
                           scale=case.scale, backend=backend, return_lse=case.lse)
    out, lse = res if case.lse else (res, None)
    dv = case.head_dim_v or case.head_dim
    if out.dtype != case.dtype or tuple(out.shape) != (q.shape[0], case.heads_q, dv):
        raise AssertionError(f"{case}: out {tuple(out.shape)} {out.dtype}")
    if lse is not None and (lse.dtype != torch.float32
                            or tuple(lse.shape) != (case.heads_q, q.shape[0])):
        raise AssertionError(f"{case}: lse {tuple(lse.shape)} {lse.dtype}; expected (Hq, Tq)")
    got = [out.detach().cpu()] + ([lse.cpu()] if lse is not None else [])
    if case.grad:
        out.backward(grad_out.to(out.device, out.dtype))  # type: ignore[union-attr]
        got += [t.grad.cpu() if t.grad is not None else torch.zeros(t.shape) for t in (q, k, v)]
    return got


def check_backend_varlen(backend: str, case: VarlenCase, device: Any = "cpu",
                         seed: int = 0) -> CheckResult:
    """:func:`attention_dispatch.testing.check_backend` for a packed case."""
    inputs = make_varlen_inputs(case, device, seed)
    dv = case.head_dim_v or case.head_dim
    grad_out = None
    if case.grad:
        g = torch.Generator().manual_seed(seed + 1)
        grad_out = torch.randn(inputs["q"].shape[0], case.heads_q, dv, generator=g)
    q, k, v = (inputs[n].detach().cpu().double().requires_grad_(case.grad) for n in "qkv")
    slopes = inputs["alibi_slopes"]
    ref_out, ref_lse = reference_varlen(
        q, k, v, inputs["cu_seqlens_q"].cpu(), inputs["cu_seqlens_k"].cpu(),
        causal=case.causal, scale=case.scale, window=case.window, softcap=case.softcap,
        alibi_slopes=None if slopes is None else slopes.cpu())
    refs = [ref_out.detach()] + ([ref_lse.detach()] if case.lse else [])
    if case.grad:
        ref_out.backward(grad_out.double())  # type: ignore[union-attr]
        refs += [t.grad if t.grad is not None else torch.zeros(t.shape) for t in (q, k, v)]
    names = ["out"] + (["lse"] if case.lse else []) + (["dq", "dk", "dv"] if case.grad else [])
    got = _run(backend, case, inputs, grad_out)
    base = _run("math", case, inputs, grad_out)
    return judge(backend, case, case.dtype, names, got, base, refs)
