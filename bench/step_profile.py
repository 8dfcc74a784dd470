"""Where a dense call's time goes against torch's own call, forward or forward+backward.

For each case of the default grid where auto's kernel is torch's (or close
to it) and the grid's auto/torch-default ratio is near 1, each call - torch's
own ``F.scaled_dot_product_attention`` (``enable_gqa`` for GQA), ``ad.attention``
with auto, and with each named backend - gets four figures, in one process:

* ``host_us``: host time per step, 10 steps issued back to back after a
  synchronisation (a step's backward runs on autograd's device thread, so
  part of it may not be counted here);
* ``kernels_us``: device time per step, the sum of the CUDA kernels'
  durations from torch.profiler over 5 steps, with the longest kernels'
  names (an extra kernel, e.g. a copy, shows here);
* ``isolated_us``: one step timed with CUDA events from an idle GPU (host
  latency and kernels; medians, interleaved rounds: the grid's method,
  :func:`attention_dispatch._core.timing.time_interleaved`);
* ``pipelined_us``: 10 steps back to back, then a synchronisation, per step
  (a training loop with work queued ahead).

    python bench/step_profile.py [--cases 16x32x32x1024x64xcf,...] [--out step-profile.json]

A case is BxHqxHkvxSxD, then flags: c causal, f forward+backward.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

import attention_dispatch as ad
from attention_dispatch._core.timing import time_interleaved
from decode_profile import host_and_pipelined, kernels

Tensor = torch.Tensor
NAMED = ("sdpa-cudnn", "flash-attn")
# the grid's rows below 0.98 against torch's call (docs/results/bench-grid-h200-2026-12-03.json)
CASES = "16x32x32x1024x64xcf,16x16x16x1024x128xcf,8x32x32x2048x64xcf,4x16x16x4096x128xcf," \
        "4x32x8x4096x128xc,8x32x8x1x4096x128xc"


def parse(case: str) -> dict[str, Any]:
    parts = case.split("x")
    flags = parts[-1] if not parts[-1].isdigit() else ""
    nums = [int(p) for p in (parts[:-1] if flags else parts)]
    sq, sk = (nums[3], nums[4]) if len(nums) == 6 else (nums[3], nums[3])
    return dict(b=nums[0], hq=nums[1], hkv=nums[2], sq=sq, sk=sk, d=nums[-1],
                causal="c" in flags, grad="f" in flags)


def steps(c: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """One step of each call on the same random bfloat16 inputs (bhsd)."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(h: int, s: int) -> Tensor:
        return torch.randn(c["b"], h, s, c["d"], device="cuda", dtype=torch.bfloat16,
                           generator=g).requires_grad_(c["grad"])

    q, k, v = rnd(c["hq"], c["sq"]), rnd(c["hkv"], c["sk"]), rnd(c["hkv"], c["sk"])
    causal = c["causal"] and c["sq"] > 1  # Sq = 1 causal admits every key
    extra = {"enable_gqa": True} if c["hq"] != c["hkv"] else {}
    fwds: dict[str, Callable[[], Tensor]] = {
        "torch-default": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                 **extra),
        "auto": lambda: ad.attention(q, k, v, causal=c["causal"])}
    for name in NAMED:
        fwds[name] = (lambda n: lambda: ad.attention(q, k, v, causal=c["causal"],
                                                     backend=n))(name)
    if not c["grad"]:
        return fwds
    grad = torch.randn(c["b"], c["hq"], c["sq"], c["d"], device="cuda", dtype=torch.bfloat16)

    def step(fwd: Callable[[], Tensor]) -> Callable[[], Any]:
        def run() -> None:
            for t in (q, k, v):
                t.grad = None
            fwd().backward(grad)
        return run

    return {n: step(f) for n, f in fwds.items()}


def run_case(case: str, rounds: int) -> dict[str, Any]:
    c = parse(case)
    fns = {}
    for name, fn in steps(c).items():
        try:
            for _ in range(3):
                fn()
            fns[name] = fn
        except Exception as exc:  # a backend that refuses or fails: shown, not timed
            print(f"  {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    rows: dict[str, dict[str, Any]] = {n: {} for n in fns}
    for name, fn in fns.items():
        rows[name]["host_us"], rows[name]["pipelined_us"] = host_and_pipelined(fn, 10)
        rows[name]["kernels_us"], rows[name]["kernels"] = kernels(fn, 5)
    iso = time_interleaved(fns, torch.device("cuda"), rounds=rounds)
    for name in fns:
        rows[name]["isolated_us"] = iso[name] * 1e3
    chosen = ad.explain(*_like(c), causal=c["causal"]).backend
    print(f"{case}: auto -> {chosen}")
    print(f"  {'call':<16}{'host':>9}{'kernels':>10}{'isolated':>10}{'pipelined':>11}  kernels")
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["isolated_us"]):
        print(f"  {name:<16}{r['host_us']:9.1f}{r['kernels_us']:10.1f}{r['isolated_us']:10.1f}"
              f"{r['pipelined_us']:11.1f}  {', '.join(r['kernels'])[:110]}")
    return dict(case=case, **c, auto_choice=chosen, rows=rows)


def _like(c: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised tensors with the case's metadata, for explain()."""
    def t(h: int, s: int) -> Tensor:
        return torch.empty(c["b"], h, s, c["d"], device="cuda", dtype=torch.bfloat16
                           ).requires_grad_(c["grad"])
    return t(c["hq"], c["sq"]), t(c["hkv"], c["sk"]), t(c["hkv"], c["sk"])


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=CASES)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", default="step-profile.json")
    args = p.parse_args(argv)
    res = [run_case(s, args.rounds) for s in args.cases.split(",")]
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, cases=res), f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from attention_dispatch._core.autotuning import isolated_cache

    with isolated_cache():  # stored tuning decisions neither apply nor change
        raise SystemExit(main())
