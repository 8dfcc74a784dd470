"""Host time of one attention call and of one forward+backward step, by way of calling cuDNN.

torch's own ``F.scaled_dot_product_attention`` (cuDNN chosen), the operator's
generated binding as the ``sdpa-cudnn`` adapter calls it, its
``torch.ops.aten`` overload, ``ad.attention`` (auto) and the plan's remembered
kernel call, each issued ``--calls`` times back to back after a
synchronisation (the GPU runs behind), best of ``--repeats``; the device
is synchronised between repeats.  Shows where host time goes when the kernels
are the same (bench/step_profile.py has the device side).

    python bench/host_per_call.py [--case 16x32x1024x64] [--out host-per-call.json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

import attention_dispatch as ad
from attention_dispatch._core import dispatch as _dispatch

Tensor = torch.Tensor


def variants(q: Tensor, k: Tensor, v: Tensor) -> dict[str, Callable[[], Tensor]]:
    binding = torch._scaled_dot_product_cudnn_attention
    overload = torch.ops.aten._scaled_dot_product_cudnn_attention.default
    lse = q.requires_grad
    ad.attention(q, k, v, causal=True)
    ad.attention(q, k, v, causal=True)
    memo = _dispatch._memo[0]
    out = {
        "torch F.sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "binding": lambda: binding(q, k, v, None, lse, 0.0, True)[0],
        "aten overload": lambda: overload(q, k, v, None, lse, 0.0, True)[0],
        "ad.attention": lambda: ad.attention(q, k, v, causal=True),
    }
    if memo is not None:
        out["remembered call"] = (lambda f: lambda: f(q, k, v))(memo[8])
    return out


def host_us(fn: Callable[[], Any], calls: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    torch.cuda.synchronize()
    return best


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", default="16x32x1024x64", help="BxHxSxD, causal, bf16")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="host-per-call.json")
    a = p.parse_args(argv)
    b, h, s, d = (int(x) for x in a.case.split("x"))
    res: dict[str, Any] = {}
    for grad in (False, True):
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
                   .requires_grad_(grad) for _ in range(3))
        g = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
        fns = variants(q, k, v)
        if grad:
            def step(f: Callable[[], Tensor]) -> Callable[[], None]:
                def run() -> None:
                    for t in (q, k, v):
                        t.grad = None
                    f().backward(g)
                return run
            fns = {n: step(f) for n, f in fns.items()}
        for fn in fns.values():
            fn()
        mode = "fwd+bwd" if grad else "fwd"
        res[mode] = {n: round(host_us(f, a.calls, a.repeats), 1) for n, f in fns.items()}
        print(f"{a.case} {mode} (auto -> {ad.explain(q, k, v, causal=True).backend}), "
              "host us per call: " + "  ".join(f"{n} {t}" for n, t in res[mode].items()))
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"), case=a.case)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, host_us=res), f, indent=1)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    from attention_dispatch._core.autotuning import isolated_cache

    with isolated_cache():
        raise SystemExit(main())
