"""What a K stored transposed costs: time and peak memory, side by side.

For one call (default: B=1, H=16, n=8192, D=128, bfloat16 on CUDA; B=1, H=8,
n=2048, D=64, float32 on the CPU) this times, in interleaved rounds
(``attention_dispatch.bench.run.time_interleaved``: a random order per round,
CUDA events and the median on CUDA, the minimum on the CPU):

* ``auto contiguous``: ``ad.attention(q, k, v)`` with plain tensors;
* ``auto k transposed``: the same values with K stored transposed
  (``k.stride(-1) != 1``, from ``k.transpose(-1, -2).contiguous().transpose(-1, -2)``);
* ``torch contiguous`` / ``torch k transposed``: torch's own
  ``F.scaled_dot_product_attention`` on the same tensors (what a user calls
  without us);
* ``copy of k``: ``k.contiguous()`` alone (the copy the dispatcher makes).

It records which backend auto ran for each (``explain()``), the copies
``explain()`` names, whether any fallback event was emitted (there must be
none), and on CUDA the peak memory each call allocates beyond its inputs
(``torch.cuda.max_memory_allocated`` after a reset).  ``--causal`` and
``--backward`` (forward+backward) change the call.  Writes JSON to --out.

Usage::

    python bench/layout_bench.py --device cuda --out layout-h200.json
    python bench/layout_bench.py --device cpu --out layout-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any, Callable

import torch
import torch.nn.functional as F

import attention_dispatch as ad
from attention_dispatch.bench.run import time_interleaved

Tensor = torch.Tensor


def inputs(a: argparse.Namespace, device: torch.device) -> dict[str, Tensor]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    g = torch.Generator(device=device).manual_seed(0)
    shape = (a.batch, a.heads, a.seq, a.head_dim)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    kt = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, last stride = n
    return {"q": q, "k": k, "v": v, "kt": kt}


def calls(t: dict[str, Tensor], causal: bool, backward: bool) -> dict[str, Callable[[], Any]]:
    def step(fn: Callable[..., Tensor], k: Tensor) -> Callable[[], Any]:
        if not backward:
            return lambda: fn(t["q"], k, t["v"], causal)
        leaves = [x.detach().requires_grad_() for x in (t["q"], k, t["v"])]
        return lambda: fn(*leaves, causal).sum().backward()

    def auto(q: Tensor, k: Tensor, v: Tensor, c: bool) -> Tensor:
        return ad.attention(q, k, v, causal=c)

    def torch_sdpa(q: Tensor, k: Tensor, v: Tensor, c: bool) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=c)

    return {"auto contiguous": step(auto, t["k"]), "auto k transposed": step(auto, t["kt"]),
            "torch contiguous": step(torch_sdpa, t["k"]),
            "torch k transposed": step(torch_sdpa, t["kt"]),
            "copy of k": lambda: t["kt"].contiguous()}


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory allocated by one call beyond what was allocated before it."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    p.add_argument("--causal", action="store_true")
    p.add_argument("--backward", action="store_true")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    a.heads = a.heads or (16 if cuda else 8)
    a.seq = a.seq or (8192 if cuda else 2048)
    a.head_dim = a.head_dim or (128 if cuda else 64)
    a.dtype = a.dtype or ("bf16" if cuda else "fp32")
    t = inputs(a, device)
    ad.clear_events()
    fns = calls(t, a.causal, a.backward)
    peaks = {n: peak_mib(f, device) for n, f in fns.items()}
    ms = time_interleaved(fns, device, rounds=a.rounds)
    plain = ad.explain(t["q"], t["k"], t["v"], causal=a.causal)
    tr = ad.explain(t["q"], t["kt"], t["v"], causal=a.causal)
    report = {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor(),
        "torch": torch.__version__, "call": vars(a),
        "ms": {n: round(v, 4) for n, v in ms.items()},
        "peak_mib_beyond_inputs": {n: round(v, 2) for n, v in peaks.items()},
        "backend_contiguous": plain.backend, "backend_k_transposed": tr.backend,
        "copies_k_transposed": list(tr.copies),
        "fallback_events": [str(e) for e in ad.events() if e.kind != "decision"],
        "transposed_over_contiguous": round(ms["auto k transposed"] / ms["auto contiguous"], 3),
        "torch_transposed_over_auto_transposed":
            round(ms["torch k transposed"] / ms["auto k transposed"], 3),
    }
    print(json.dumps(report, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
