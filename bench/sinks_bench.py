"""Attention sinks on CUDA: the cost of ``sinks=`` on FA4 (``learnable_sink``).

B=1, S=16384, Hq=32, Hkv=8 (GQA), D=128, bfloat16, causal: the same call with
and without sinks through ``backend="flash-attn"`` (and flex for comparison
where it runs), forward and forward+backward, timed side by side
(``time_interleaved``: CUDA events, a random order each round, the median).
The outputs with sinks are checked against math's on a slice of the rows
first.  Goal: sinks cost <= 3% on FA4.

Usage::

    python bench/sinks_bench.py --out sinks-h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any, Callable

import torch

import attention_dispatch as ad
from attention_dispatch._core.timing import time_interleaved

Tensor = torch.Tensor


def _inputs(s: int, grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, s, 128, device="cuda", generator=g, dtype=torch.bfloat16)
               .requires_grad_(grad) for h in (32, 8, 8))
    sinks = torch.randn(32, device="cuda", generator=g).requires_grad_(grad)
    return q, k, v, sinks


def _fn(backend: str, q: Tensor, k: Tensor, v: Tensor, sinks: Any, backward: bool
        ) -> Callable[[], Any]:
    def run() -> Any:
        out = ad.attention(q, k, v, causal=True, sinks=sinks, backend=backend)
        if backward:
            out.sum().backward()
        return out
    return run


def _check(backend: str, s: int) -> float:
    """Max error of ``backend`` with sinks vs math on the last 256 query rows."""
    q, k, v, sinks = _inputs(s, False)
    rows = slice(s - 256, s)
    got = ad.attention(q, k, v, causal=True, sinks=sinks, backend=backend)[:, :, rows]
    want = ad.attention(q[:, :, rows], k, v, causal=True, sinks=sinks, backend="math")
    return (got.float() - want.float()).abs().max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--backends", default="flash-attn,flex")
    ap.add_argument("--out", default="sinks-bench.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "python": platform.python_version(), "seq": args.seq, "runs": {}}
    for backend in args.backends.split(","):
        try:
            err = _check(backend, args.seq)
        except ad.BackendUnavailable as exc:
            print(f"{backend}: refused: {exc}")
            continue
        for backward in (False, True):
            q, k, v, sinks = _inputs(args.seq, backward)
            fns = {"no sinks": _fn(backend, q, k, v, None, backward),
                   "sinks": _fn(backend, q, k, v, sinks, backward)}
            ms = time_interleaved(fns, dev, budget_s=3.0, max_reps=30)
            name = f"{backend} {'fwd+bwd' if backward else 'fwd'}"
            ratio = ms["sinks"] / ms["no sinks"]
            result["runs"][name] = {**ms, "ratio": ratio, "max_err_vs_math": err}
            print(f"{name}: no sinks {ms['no sinks']:.3f} ms, sinks {ms['sinks']:.3f} ms "
                  f"(x{ratio:.3f}); max error vs math {err:.3g}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    from attention_dispatch._core.autotuning import isolated_cache

    with isolated_cache():  # stored tuning decisions neither apply nor change
        main()
