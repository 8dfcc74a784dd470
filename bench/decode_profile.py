"""Where a decode call's time goes: host, device kernels, and the two together.

For each decode shape (GQA 32/8, head dim 128, bfloat16, Sq=1; dense K/V in
bshd, or the paged cache of ``bench/paged_bench.py``) and each call - torch's
own ``F.scaled_dot_product_attention(..., enable_gqa=True)``, ``ad.attention``
with auto and with each decode backend forced, ``attention_paged`` with and
without its value checks - four figures, in one process:

* ``host_us``: host time per call, issuing 30 calls back to back after a
  synchronisation (the GPU runs behind; a call that synchronises itself, as a
  checked paged call does, pays its wait here too);
* ``kernels_us``: device time per call, the sum of the CUDA kernels'
  durations from torch.profiler over 20 calls, with the names of the longest
  kernels;
* ``isolated_us``: one call after an L2 flush, timed with CUDA events from an
  idle GPU (host latency and kernels; medians, interleaved rounds; the method
  of ``bench/gpu_bench.py``);
* ``pipelined_us``: 30 calls back to back, then a synchronisation, per call
  (what a decode loop with work queued ahead sees: max(host, device) roughly).

    python bench/decode_profile.py --out decode-profile.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

import attention_dispatch as ad
from gpu_bench import interleaved

Tensor = torch.Tensor
DECODE = ("sdpa-cudnn", "sdpa-flash", "flash-attn", "triton-decode")


def inputs(b: int, sk: int, bs: int) -> dict[str, Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    dt, hq, hkv, d = torch.bfloat16, 32, 8, 128
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=dt, generator=g)
    if not bs:
        k = torch.randn(b, sk, hkv, d, device="cuda", dtype=dt, generator=g)
        return dict(q=q, k=k, v=torch.randn_like(k))
    nb = b * sk // bs
    kc = torch.randn(nb, bs, hkv, d, device="cuda", dtype=dt, generator=g)
    table = torch.randperm(nb, device="cuda", generator=g).view(b, -1).int()
    return dict(q=q, k=kc, v=torch.randn_like(kc), table=table,
                lens=torch.full((b,), sk, device="cuda", dtype=torch.int32))


def calls(x: dict[str, Tensor]) -> dict[str, Callable[[], Any]]:
    q, k, v = x["q"], x["k"], x["v"]
    if "table" in x:
        kw = dict(block_table=x["table"], cache_seqlens=x["lens"])
        return {
            "paged:auto": lambda: ad.attention_paged(q, k, v, **kw),
            "paged:auto unchecked": lambda: ad.attention_paged(q, k, v, check_values=False,
                                                               **kw),
            "paged:flash-attn unchecked": lambda: ad.attention_paged(
                q, k, v, check_values=False, backend="flash-attn", **kw),
            "paged:triton-decode unchecked": lambda: ad.attention_paged(
                q, k, v, check_values=False, backend="triton-decode", **kw),
        }
    out: dict[str, Callable[[], Any]] = {
        "torch-default": lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True),
        "auto": lambda: ad.attention(q, k, v, layout="bshd", causal=True),
    }
    for name in DECODE:
        out[name] = (lambda n: lambda: ad.attention(q, k, v, layout="bshd", causal=True,
                                                     backend=n))(name)
    return out


def host_and_pipelined(fn: Callable[[], Any], n: int = 30) -> tuple[float, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def kernels(fn: Callable[[], Any], n: int = 20) -> tuple[float, dict[str, float]]:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and e.key and not e.key.startswith(("cudaDeviceSynchronize", "Memcpy", "Memset")):
            per[e.key[:90]] = per.get(e.key[:90], 0.0) + t / n
    top = dict(sorted(per.items(), key=lambda kv: -kv[1])[:3])
    return sum(per.values()), {k: round(v, 1) for k, v in top.items()}


def run_shape(b: int, sk: int, bs: int, rounds: int) -> dict[str, Any]:
    fns = {}
    for name, fn in calls(inputs(b, sk, bs)).items():
        try:
            with torch.no_grad():
                for _ in range(3):
                    fn()
            fns[name] = fn
        except Exception as exc:  # a backend that refuses or fails: shown, not timed
            print(f"  {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    rows: dict[str, dict[str, Any]] = {n: {} for n in fns}
    with torch.no_grad():
        for name, fn in fns.items():
            rows[name]["host_us"], rows[name]["pipelined_us"] = host_and_pipelined(fn)
            rows[name]["kernels_us"], rows[name]["kernels"] = kernels(fn)
        iso = interleaved(fns, rounds, True)
    for name in fns:
        rows[name]["isolated_us"] = iso[name] * 1e3
    print(f"B={b} Sk={sk}" + (f" paged bs={bs}" if bs else " dense"))
    print(f"  {'call':<28}{'host':>9}{'kernels':>9}{'isolated':>10}{'pipelined':>11}  kernels")
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["pipelined_us"]):
        print(f"  {name:<28}{r['host_us']:9.1f}{r['kernels_us']:9.1f}{r['isolated_us']:10.1f}"
              f"{r['pipelined_us']:11.1f}  {', '.join(r['kernels'])[:100]}")
    return dict(B=b, Sk=sk, paged_block_size=bs, rows=rows)


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="32x8192x0,32x8192x128,8x32768x0,1x32768x0,1x131072x0",
                   help="BxSkxBLOCK (block 0: dense)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default="decode-profile.json")
    args = p.parse_args(argv)
    res = [run_shape(*(int(x) for x in s.split("x")), args.rounds)
           for s in args.shapes.split(",")]
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, shapes=res), f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from attention_dispatch._core.autotuning import isolated_cache

    with isolated_cache():  # stored tuning decisions neither apply nor change
        raise SystemExit(main())
