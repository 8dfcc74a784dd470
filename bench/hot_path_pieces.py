"""What the plain call's host time is made of, piece by piece, on the CPU.

Tiny tensors (B=1, H=2, S=8, D=16, float32, no_grad), after two calls so the
signature is remembered.  Each piece timed alone (min of repeated timeit runs,
microseconds per call), beside the whole call and torch's own
``F.scaled_dot_product_attention``:

* ``kernel``: torch's CPU flash operator through its binding (what auto runs);
* ``plain``: the plan's plain call (the operator behind one Python function);
* ``signature check``: the C-level check of q, k, v (``guards.tensor_check``);
* ``keyword-only defaults``: a Python function with attention()'s 15
  keyword-only parameters, beside one with none (the difference);
* ``is_compiling``: ``torch.compiler.is_compiling()``;
* ``attention``, ``torch F.sdpa``: the whole calls.

    python bench/hot_path_pieces.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
import timeit
from typing import Any, Callable

import torch
import torch.nn.functional as F

import attention_dispatch as ad
from attention_dispatch._core import dispatch as _dispatch


def _us(fn: Callable[[], Any], number: int = 20000, repeat: int = 7) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def _kw(q: Any, k: Any, v: Any, *, mask: Any = None, key_padding_mask: Any = None,
        causal: bool = False, dropout_p: float = 0.0, scale: Any = None, layout: str = "bhsd",
        backend: str = "auto", return_lse: bool = False, window: Any = None,
        softcap: Any = None, alibi_slopes: Any = None, sinks: Any = None,
        deterministic: Any = None, max_extra_bytes: Any = None) -> None:
    return None


def _pos(q: Any, k: Any, v: Any) -> None:
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    with torch.no_grad():
        ad.attention(q, k, v)
        ad.attention(q, k, v)
        m = _dispatch._memo[0]
        if m is None:
            raise SystemExit("the plain signature was not remembered (environment policy?)")
        check, plain = m[0], m[8]
        kernel = torch._scaled_dot_product_flash_attention_for_cpu
        us = {
            "kernel": _us(lambda: kernel(q, k, v)[0]),
            "plain": _us(lambda: plain(q, k, v)),
            "signature check": _us(lambda: check(q, k, v)),
            "keyword-only defaults": _us(lambda: _kw(1, 2, 3)) - _us(lambda: _pos(1, 2, 3)),
            "is_compiling": _us(torch.compiler.is_compiling),
            "attention": _us(lambda: ad.attention(q, k, v)),
            "torch F.sdpa": _us(lambda: F.scaled_dot_product_attention(q, k, v)),
        }
    for name, t in us.items():
        print(f"{name:<24}{t:8.3f} us")
    print(f"attention / torch F.sdpa: {us['attention'] / us['torch F.sdpa']:.3f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device="cpu", torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                           us=us), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
