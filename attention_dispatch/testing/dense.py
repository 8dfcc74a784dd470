"""Dense conformance: the case matrix, inputs, the checker and its accuracy rule
(see the package docstring)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from .._core import ATOL, atol, reference_attention, within_rule  # noqa: F401  (public via testing)

Tensor = torch.Tensor


def structure_label(window: Optional[tuple[int, int]], softcap: Optional[float],
                    alibi: str) -> list[str]:
    """Case-id parts for the structured-attention features that are on."""
    parts = []
    if window is not None:
        parts.append(f"window{window[0]},{window[1]}")
    if softcap is not None:
        parts.append(f"softcap{softcap}")
    if alibi != "none":
        parts.append(f"alibi-{alibi}")
    return parts


@dataclass(frozen=True)
class Case:
    """One conformance case.  ``mask`` is one of "none", "bool", "float",
    "padding", "bool+padding", "float+padding"; ``empty_rows`` forces some
    query rows to have no allowed key.  Structured attention: ``window``
    (left, right), ``softcap`` and ``alibi`` ("none", "heads" for (Hq,) slopes,
    "batch" for (B, Hq) slopes)."""

    batch: int = 2
    heads_q: int = 4
    heads_kv: int = 4
    seq_q: int = 16
    seq_k: int = 16
    head_dim: int = 32
    head_dim_v: Optional[int] = None
    dtype: torch.dtype = torch.float32
    layout: str = "bhsd"
    mask: str = "none"
    causal: bool = False
    empty_rows: bool = False
    grad: bool = False
    lse: bool = False
    scale: Optional[float] = None
    window: Optional[tuple[int, int]] = None
    softcap: Optional[float] = None
    alibi: str = "none"

    def __str__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        parts = [dt, self.layout, f"b{self.batch}", f"h{self.heads_q}/{self.heads_kv}",
                 f"q{self.seq_q}k{self.seq_k}", f"d{self.head_dim}"]
        if self.head_dim_v:
            parts.append(f"dv{self.head_dim_v}")
        parts.append(f"mask-{self.mask}")
        for flag in ("causal", "empty_rows", "grad", "lse"):
            if getattr(self, flag):
                parts.append(flag)
        if self.scale is not None:
            parts.append(f"scale{self.scale}")
        return "-".join(parts + structure_label(self.window, self.softcap, self.alibi))


def default_cases(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16,
                                                    torch.float16),
                  head_dims: tuple[int, ...] = (32,)) -> list[Case]:
    """The case matrix: layouts; Sq<Sk, Sq=Sk, Sq>Sk with causal; GQA and MQA;
    every mask kind alone and with causal; empty rows with gradients; lse."""
    cases: list[Case] = []
    shapes = [(16, 16), (7, 19), (19, 7), (1, 33)]
    heads = [(4, 4), (4, 2), (4, 1)]
    for dtype, d in itertools.product(dtypes, head_dims):
        base = Case(dtype=dtype, head_dim=d)
        for (sq, sk), causal, layout in itertools.product(shapes, (False, True), ("bhsd", "bshd")):
            cases.append(replace(base, seq_q=sq, seq_k=sk, causal=causal, layout=layout))
        for hq, hkv in heads[1:]:
            cases.append(replace(base, heads_q=hq, heads_kv=hkv, causal=True, seq_q=9, seq_k=13))
        for mask, causal in itertools.product(
                ("bool", "float", "padding", "bool+padding", "float+padding"), (False, True)):
            cases.append(replace(base, mask=mask, causal=causal, seq_q=11, seq_k=21))
        for mask in ("bool", "padding", "float"):
            cases.append(replace(base, mask=mask, empty_rows=True, grad=True))
        cases.append(replace(base, causal=True, seq_q=12, seq_k=5, grad=True))  # empty rows
        cases.append(replace(base, grad=True, causal=True, seq_q=10, seq_k=14,
                             heads_kv=2, layout="bshd"))
        cases.append(replace(base, grad=True, mask="bool+padding", seq_q=8, seq_k=24))
        cases.append(replace(base, lse=True, causal=True, seq_q=6, seq_k=10))
        cases.append(replace(base, lse=True, mask="padding", empty_rows=True))
        cases.append(replace(base, scale=0.3, mask="float"))
        cases.append(replace(base, head_dim_v=2 * d))
    return cases


def structured_cases(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16,
                                                       torch.float16)) -> list[Case]:
    """Sliding windows (with and without causal, Sq < Sk, = Sk, > Sk, rows
    left without keys), softcap, ALiBi ((Hq,) and (B, Hq) slopes), their
    combinations with GQA, key padding, masks and layouts; lse and gradients."""
    out: list[Case] = []
    for dtype in dtypes:
        b = Case(dtype=dtype)
        out += [replace(b, window=w, causal=c, seq_q=sq, seq_k=sk)
                for (sq, sk), w, c in itertools.product(
                    [(16, 16), (7, 19), (19, 7)], [(3, 2), (4, -1), (-1, 2), (0, 0)],
                    (False, True))]
        out += [
            replace(b, window=(2, 0), seq_q=19, seq_k=7, grad=True, lse=True),  # empty rows
            replace(b, window=(5, 1), causal=True, mask="padding", empty_rows=True, lse=True),
            replace(b, window=(3, 3), heads_kv=2, layout="bshd", grad=True, seq_q=9, seq_k=13),
            replace(b, window=(6, -1), causal=True, mask="bool", seq_q=11, seq_k=21),
            replace(b, softcap=1.0), replace(b, softcap=0.5, causal=True, grad=True),
            replace(b, softcap=2.0, mask="float+padding", lse=True, seq_q=11, seq_k=21),
            replace(b, softcap=1.0, heads_kv=1, layout="bshd", lse=True, seq_q=1, seq_k=33),
            replace(b, alibi="heads"), replace(b, alibi="batch", causal=True, lse=True),
            replace(b, alibi="heads", seq_q=7, seq_k=19, causal=True, grad=True),
            replace(b, alibi="batch", seq_q=19, seq_k=7, mask="padding", grad=True),
            replace(b, alibi="heads", window=(4, 1), causal=True, heads_kv=2, lse=True),
            replace(b, alibi="batch", softcap=1.0, window=(3, 2), heads_kv=1, grad=True,
                    lse=True, seq_q=10, seq_k=14, layout="bshd"),
            replace(b, softcap=1.5, window=(2, 0), causal=True, scale=0.5, seq_q=12, seq_k=12),
        ]
    return out


def alibi_slopes_for(heads: int, batch: Optional[int] = None,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """ALiBi slopes 2^(-8 (h + 1) / H) (Press et al.), (H,) float32; with
    ``batch`` a (B, H) tensor scaled per row by a random factor in [0.5, 1.5)."""
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])
    if batch is None:
        return slopes.float()
    return (slopes[None, :] * (0.5 + torch.rand(batch, 1, generator=generator))).float()


def reduced_case(spec: Any, max_seq: int = 64, grad: bool = False) -> Case:
    """A small conformance case standing for a real call (a ``CallSpec``): the
    call's dtype, head dims, GQA ratio, layout, mask kinds, causal and lse, with
    at most 2 batches, 4 query heads and ``max_seq`` positions; gradients
    checked if ``grad``.  Used where "correct" must be checked cheaply for a
    large call (autotune, bench)."""
    ratio = spec.heads_q // spec.heads_kv
    hq = max(ratio, min(spec.heads_q, 4))
    mask = spec.mask_kind
    if spec.key_padding:
        mask = "padding" if mask == "none" else f"{mask}+padding"
    return Case(batch=min(spec.batch, 2), heads_q=hq, heads_kv=hq // ratio,
                seq_q=min(spec.seq_q, max_seq), seq_k=min(spec.seq_k, max_seq),
                head_dim=spec.head_dim,
                head_dim_v=spec.head_dim_v if spec.head_dim_v != spec.head_dim else None,
                dtype=spec.dtype, layout=spec.layout, mask=mask, causal=spec.causal,
                lse=spec.return_lse, grad=grad)


def make_inputs(case: Case, device: Any = "cpu", seed: int = 0) -> dict[str, Any]:
    """Random q, k, v (in the case's layout) and masks for ``case``."""
    g = torch.Generator().manual_seed(seed)
    dv = case.head_dim_v or case.head_dim

    def rnd(h: int, s: int, d: int) -> Tensor:
        t = torch.randn(case.batch, h, s, d, generator=g)
        if case.layout == "bshd":
            t = t.transpose(1, 2).contiguous()
        return t.to(device=device, dtype=case.dtype)

    b, sq, sk = case.batch, case.seq_q, case.seq_k
    kw: dict[str, Any] = dict(q=rnd(case.heads_q, sq, case.head_dim),
                              k=rnd(case.heads_kv, sk, case.head_dim),
                              v=rnd(case.heads_kv, sk, dv))
    mask = None
    if case.mask.startswith("bool"):
        mask = torch.rand(b, 1, sq, sk, generator=g) > 0.3
        if case.empty_rows:
            mask[:, :, sq // 2] = False
    elif case.mask.startswith("float"):
        mask = torch.randn(b, case.heads_q, sq, sk, generator=g).to(case.dtype)
        mask = mask.masked_fill(torch.rand(b, case.heads_q, sq, sk, generator=g) < 0.2,
                                float("-inf"))
        if case.empty_rows:
            mask[:, :, 1] = float("-inf")
    kpm = None
    if case.mask.endswith("padding"):
        lens = torch.randint(1, sk + 1, (b,), generator=g)
        if case.empty_rows:
            lens[0] = 0
        kpm = torch.arange(sk)[None, :] < lens[:, None]
    kw["mask"] = None if mask is None else mask.to(device)
    kw["key_padding_mask"] = None if kpm is None else kpm.to(device)
    kw["causal"] = case.causal
    kw["scale"] = case.scale
    kw["window"] = case.window
    kw["softcap"] = case.softcap
    kw["alibi_slopes"] = None
    if case.alibi != "none":
        slopes = alibi_slopes_for(case.heads_q, b if case.alibi == "batch" else None, g)
        kw["alibi_slopes"] = slopes.to(device)
    return kw


def _bhsd(t: Tensor, layout: str) -> Tensor:
    return t.transpose(1, 2) if layout == "bshd" else t


def _run(backend: str, case: Case, inputs: dict[str, Any], grad_out: Optional[Tensor]
         ) -> tuple[Tensor, Optional[Tensor], list[Tensor]]:
    from .._core import attention

    q, k, v = (inputs[n].detach().clone().requires_grad_(case.grad) for n in "qkv")
    res = attention(q, k, v, mask=inputs["mask"], key_padding_mask=inputs["key_padding_mask"],
                    causal=case.causal, scale=case.scale, layout=case.layout,
                    backend=backend, return_lse=case.lse, window=case.window,
                    softcap=case.softcap, alibi_slopes=inputs.get("alibi_slopes"))
    out, lse = res if case.lse else (res, None)
    _check_result(case, out, lse)
    grads: list[Tensor] = []
    if case.grad:
        out.backward(grad_out.to(out.dtype))
        grads = [q.grad, k.grad, v.grad]
    return _bhsd(out, case.layout), lse, [_bhsd(g_, case.layout) for g_ in grads]


def _check_result(case: Case, out: Tensor, lse: Optional[Tensor]) -> None:
    """dtype, shape and layout of out and lse, as the contract states them."""
    dv = case.head_dim_v or case.head_dim
    want = (case.batch, case.heads_q, case.seq_q, dv)
    if case.layout == "bshd":
        want = (case.batch, case.seq_q, case.heads_q, dv)
    if out.dtype != case.dtype or tuple(out.shape) != want:
        raise AssertionError(f"{case}: out {tuple(out.shape)} {out.dtype}; expected {want} "
                             f"{case.dtype}")
    if lse is not None and (lse.dtype != torch.float32
                            or tuple(lse.shape) != (case.batch, case.heads_q, case.seq_q)):
        raise AssertionError(f"{case}: lse {tuple(lse.shape)} {lse.dtype}; expected "
                             f"{(case.batch, case.heads_q, case.seq_q)} float32")


def _max_err(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    if not torch.isfinite(a).all():
        return float("inf")
    return (a.double() - b.double()).abs().max().item()


@dataclass
class CheckResult:
    """Errors of one backend on one case, beside math's, and the bound."""

    backend: str
    case: Case
    errors: dict[str, float]
    math_errors: dict[str, float]
    bounds: dict[str, float]

    @property
    def ok(self) -> bool:
        return all(self.errors[n] <= self.bounds[n] for n in self.errors)


def reference_for(case: Case, inputs: dict[str, Any], grad_out: Optional[Tensor]
                  ) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Float64 reference output, lse and (if ``case.grad``) gradients, bhsd."""
    q, k, v = (_bhsd(inputs[n], case.layout).detach().cpu().double().requires_grad_(case.grad)
               for n in "qkv")
    mask, kpm = inputs["mask"], inputs["key_padding_mask"]
    slopes = inputs.get("alibi_slopes")
    out, lse = reference_attention(q, k, v, mask=None if mask is None else mask.cpu(),
                                   key_padding_mask=None if kpm is None else kpm.cpu(),
                                   causal=case.causal, scale=case.scale, window=case.window,
                                   softcap=case.softcap,
                                   alibi_slopes=None if slopes is None else slopes.cpu())
    grads = []
    if case.grad:
        out.backward(grad_out.double())
        grads = [q.grad, k.grad, v.grad]
    return out.detach(), lse.detach(), grads


def check_backend(backend: str, case: Case, device: Any = "cpu", seed: int = 0) -> CheckResult:
    """Run ``backend`` on ``case`` and assert the contract's accuracy rule for
    the output, the lse (if requested) and the gradients (if requested).

    Raises AssertionError with every error and bound on a violation, and
    propagates BackendUnavailable when the backend refuses the case.
    """
    inputs = make_inputs(case, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    dv = case.head_dim_v or case.head_dim
    grad_out = None
    if case.grad:
        grad_out = torch.randn(case.batch, case.heads_q, case.seq_q, dv, generator=g)
        grad_out_dev = grad_out.to(device)
        if case.layout == "bshd":
            grad_out_dev = grad_out_dev.transpose(1, 2).contiguous()
    ref_out, ref_lse, ref_grads = reference_for(case, inputs, grad_out)
    got = _run(backend, case, inputs, grad_out_dev if case.grad else None)
    base = _run("math", case, inputs, grad_out_dev if case.grad else None)
    names = ["out"] + (["lse"] if case.lse else []) + (["dq", "dk", "dv"] if case.grad else [])

    def flat(res: tuple) -> list[Tensor]:
        out, lse, grads = res
        return [out.cpu()] + ([lse.cpu()] if case.lse else []) + [x.cpu() for x in grads]

    refs = [ref_out] + ([ref_lse] if case.lse else []) + ref_grads
    return judge(backend, case, case.dtype, names, flat(got), flat(base), refs)


def judge(backend: str, case: Any, dtype: torch.dtype, names: list[str], got: list[Tensor],
          base: list[Tensor], refs: list[Tensor]) -> CheckResult:
    """The accuracy rule on matched lists (backend, math, float64 reference).

    For "lse" entries -inf must appear exactly where the reference has it.
    Raises AssertionError listing every violation.
    """
    errors, math_errors, bounds = {}, {}, {}
    for name, a, m, r in zip(names, got, base, refs):
        if name == "lse":  # -inf exactly where the reference has it, then compare the rest
            dead = torch.isneginf(r)
            if not torch.equal(torch.isneginf(a), dead):
                errors[name] = float("inf")
            a, m, r = (x.double().masked_fill(dead, 0.0) for x in (a, m, r))
        errors.setdefault(name, _max_err(a, r))
        math_errors[name] = _max_err(m, r)
        scale = 1.0 + (r.abs().max().item() if r.numel() else 0.0)
        bounds[name] = 2 * math_errors[name] + atol(dtype) * scale
    result = CheckResult(backend, case, errors, math_errors, bounds)
    if not result.ok:
        rows = [f"  {n}: error {errors[n]:.3g} > bound {bounds[n]:.3g} (math {math_errors[n]:.3g})"
                for n in names if errors[n] > bounds[n]]
        raise AssertionError(f"backend {backend!r} violates the contract on {case}:\n"
                             + "\n".join(rows))
    return result
