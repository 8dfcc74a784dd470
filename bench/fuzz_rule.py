"""The accuracy rule of the fuzzers in bench/ (gpu_fuzz.py, gpu_fuzz_paged.py):
per-output errors against the float64 reference reduced on the device, and the
judgement of one example with one device->host transfer::

    max|backend - ref| <= 2 * max|math - ref| + atol(dtype) * (1 + max|ref|)

with lse = -inf exactly where the reference has it."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from attention_dispatch.testing import atol

Tensor = torch.Tensor
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "fp64": torch.float64}
NAMES = ("out", "lse", "dq", "dk", "dv", "dsinks")


def errors(got: list[Optional[Tensor]], ref: list[Optional[Tensor]]) -> list[Tensor]:
    """One 0-d float64 device tensor per requested output: max|got - ref|
    (inf for a non-finite value, a wrong shape or lse -inf rows that differ).
    No host synchronisation: the caller reads every error of an example at once."""
    out = []
    for name, a, r in zip(NAMES, got, ref):
        if r is None:
            continue
        if a is None or a.shape != r.shape:
            out.append(r.new_tensor(math.inf))
            continue
        if r.numel() == 0:
            out.append(r.new_zeros(()))
            continue
        a = a.double()
        differ = None
        if name == "lse":
            dead = torch.isneginf(r)
            differ = (torch.isneginf(a) != dead).any()
            a, r = a.masked_fill(dead, 0.0), r.masked_fill(dead, 0.0)
        d = torch.nan_to_num((a - r).abs(), nan=math.inf).amax()
        if differ is not None:
            d = torch.where(differ, r.new_tensor(math.inf), d)
        out.append(d)
    return out


def magnitudes(ref: list[Optional[Tensor]]) -> list[Tensor]:
    out = []
    for name, r in zip(NAMES, ref):
        if r is None:
            continue
        if name == "lse":
            r = r.masked_fill(torch.isneginf(r), 0.0)
        out.append(r.abs().max() if r.numel() else r.new_zeros(()))
    return out


def describe(exc: BaseException) -> str:
    """"Type: first line" of ``exc`` and of each exception chained below it."""
    parts = []
    seen: Optional[BaseException] = exc
    while seen is not None and len(parts) < 4:
        first = str(seen).strip().splitlines()[0][:300] if str(seen).strip() else ""
        parts.append(f"{type(seen).__name__}: {first}")
        seen = seen.__cause__ or seen.__context__
    return " <- ".join(parts)


def judge(spec: Any, ref: list[Optional[Tensor]], per: list[tuple[str, list[Tensor]]],
          crashed: dict[str, str]) -> dict[str, dict[str, str]]:
    """name -> {output: why} for every backend that broke the rule on this example.
    ``per[0]`` is math's errors.  One device->host transfer per example."""
    flat = [e for _, es in per for e in es] + magnitudes(ref)
    values = torch.stack([e.double().reshape(()) for e in flat]).tolist()
    k = len(per[0][1])
    tops = values[len(values) - k:]
    math_err = values[:k]
    outs = [n for n in NAMES if ref[NAMES.index(n)] is not None]
    viol: dict[str, dict[str, str]] = {n: {"raised": why} for n, why in crashed.items()}
    for j, (name, _) in enumerate(per):
        if name == "math":
            continue
        errs = values[j * k:(j + 1) * k]
        for o, e, em, top in zip(outs, errs, math_err, tops):
            dt = DTYPES[spec.dtype] if o != "lse" or spec.dtype != "fp64" else torch.float32
            bound = 2 * em + atol(dt) * (1 + top)
            if not e <= bound:
                viol.setdefault(name, {})[o] = f"error {e:.4g} > bound {bound:.4g} (math {em:.4g})"
    return viol
