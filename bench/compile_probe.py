"""Which ways of calling torch's fused attention operators trace under
``torch.compile(fullgraph=True)`` on CUDA, and where ``ad.attention`` fails if it does.

For each operator (flash, efficient, cuDNN): its generated binding
(``torch._scaled_dot_product_flash_attention``, what the adapters call), its
``torch.ops.aten`` overload, and ``F.scaled_dot_product_attention`` inside
``sdpa_kernel``; then ``ad.attention`` per backend, forward and backward.  A
failure prints its exception and the innermost frames of its traceback.

    python bench/compile_probe.py [--out compile-probe.json]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attention_dispatch as ad

Tensor = torch.Tensor
aten = torch.ops.aten


def direct_calls() -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    def under(kind: SDPBackend) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        def f(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            with sdpa_kernel([kind]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return f

    return {
        "flash binding": lambda q, k, v: torch._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True)[0],
        "flash aten": lambda q, k, v: aten._scaled_dot_product_flash_attention.default(
            q, k, v, 0.0, True)[0],
        "flash sdpa_kernel": under(SDPBackend.FLASH_ATTENTION),
        "efficient binding": lambda q, k, v: torch._scaled_dot_product_efficient_attention(
            q, k, v, None, False, 0.0, True)[0],
        "efficient aten": lambda q, k, v: aten._scaled_dot_product_efficient_attention.default(
            q, k, v, None, False, 0.0, True)[0],
        "cudnn binding": lambda q, k, v: torch._scaled_dot_product_cudnn_attention(
            q, k, v, None, False, 0.0, True)[0],
        "cudnn aten": lambda q, k, v: aten._scaled_dot_product_cudnn_attention.default(
            q, k, v, None, False, 0.0, True)[0],
        "cudnn sdpa_kernel": under(SDPBackend.CUDNN_ATTENTION),
    }


def dispatcher_calls() -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    out = {}
    for name in ("auto", "sdpa-flash", "sdpa-mem-efficient", "sdpa-cudnn", "math"):
        out[f"ad {name}"] = (lambda n: lambda q, k, v: ad.attention(q, k, v, causal=True,
                                                                    backend=n))(name)
    return out


def probe(name: str, fn: Callable[[Tensor, Tensor, Tensor], Tensor], grad: bool
          ) -> dict[str, Any]:
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.float16)
               .requires_grad_(grad) for _ in range(3))
    try:
        out = torch.compile(fn, fullgraph=True)(q, k, v)
        if grad:
            out.float().sum().backward()
        want = fn(q.detach(), k.detach(), v.detach())
        return {"ok": True, "max_diff": (out.detach() - want).abs().max().item()}
    except Exception as exc:
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:1500]}",
                "traceback": "".join(tb)[-6000:]}


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="compile-probe.json")
    args = p.parse_args(argv)
    res: dict[str, Any] = {}
    for grad in (False, True):
        for name, fn in {**direct_calls(), **dispatcher_calls()}.items():
            key = f"{name} {'fwd+bwd' if grad else 'fwd'}"
            res[key] = r = probe(name, fn, grad)
            print(f"{key:<34} {'ok' if r['ok'] else r['error'][:150]}")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, results=res), f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
