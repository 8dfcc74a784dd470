"""Launch parameters of the ``triton-decode`` kernel, timed on the decode shapes.

For each shape (GQA 32/8, head dim 128, bfloat16; dense K/V in bshd, and the
paged cache of ``bench/paged_bench.py``), every configuration of keys per tile
(``--block-n``), warps, pipeline stages and key splits (the default heuristic,
half and double) is timed in interleaved rounds with the L2 flushed before
each call (CUDA events, medians; "alone": host latency included) and by its
device time alone (captured in a CUDA graph and replayed back to back; and the
bytes of K+V read per second of it), beside ``sdpa-cudnn`` through
``ad.attention``, torch's default ``F.scaled_dot_product_attention(...,
enable_gqa=True)`` and the read-bandwidth ceiling (one pass over the same
number of bytes).  Prints a table per shape and writes JSON.

    python bench/triton_decode_tune.py --out triton-decode-tune.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

import attention_dispatch as ad
from attention_dispatch.adapters import _triton_splitkv as tk
from gpu_bench import interleaved
from overhead import _graphed

Tensor = torch.Tensor


def shape_calls(b: int, sk: int, paged_bs: int) -> tuple[dict[str, Callable[[], Any]],
                                                          dict[str, Any], int]:
    """The fixed calls (cudnn, torch default, ceiling), the kernel's inputs, bytes read."""
    g = torch.Generator(device="cuda").manual_seed(0)
    dt, hq, hkv, d = torch.bfloat16, 32, 8, 128
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=dt, generator=g)
    if paged_bs:
        nb = b * sk // paged_bs
        k = torch.randn(nb, paged_bs, hkv, d, device="cuda", dtype=dt, generator=g)
        v = torch.randn_like(k)
        table = torch.randperm(nb, device="cuda", generator=g).view(b, -1).int()
        lens = torch.full((b,), sk, device="cuda", dtype=torch.int32)
        kd, vd = k[table.long()].reshape(b, sk, hkv, d), v[table.long()].reshape(b, sk, hkv, d)
        inputs = dict(q=q, k=k, v=v, block_table=table, cache_seqlens=lens)
    else:
        kd = torch.randn(b, sk, hkv, d, device="cuda", dtype=dt, generator=g)
        vd = torch.randn_like(kd)
        inputs = dict(q=q, k=kd, v=vd)
    nbytes = 2 * kd.numel() * kd.element_size()
    buf = torch.empty(nbytes // 2, dtype=dt, device="cuda").normal_()
    fixed = {
        "sdpa-cudnn": lambda: ad.attention(q, kd, vd, layout="bshd", causal=True,
                                           backend="sdpa-cudnn"),
        "torch-default": lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), kd.transpose(1, 2), vd.transpose(1, 2), enable_gqa=True),
        "ceiling": lambda: buf.sum(dtype=torch.float32),
    }
    if paged_bs:
        fixed["paged:auto"] = lambda: ad.attention_paged(
            q, k, v, block_table=inputs["block_table"], cache_seqlens=inputs["cache_seqlens"])
    else:
        fixed["dense:auto"] = lambda: ad.attention(q, kd, vd, layout="bshd", causal=True)
    return fixed, inputs, nbytes


def kernel_call(inputs: dict[str, Any], **launch: Any) -> Callable[[], Any]:
    x = dict(inputs)
    q, k, v = x.pop("q"), x.pop("k"), x.pop("v")
    return lambda: tk.split_kv_attention(q, k, v, scale=128 ** -0.5, causal=True, **x,
                                         **launch)


def run_shape(b: int, sk: int, paged_bs: int, args: argparse.Namespace) -> dict[str, Any]:
    fixed, inputs, nbytes = shape_calls(b, sk, paged_bs)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    fns = dict(fixed)
    for bn, warps, stages, mult in itertools.product(args.block_n, args.warps, args.stages,
                                                     (0.5, 1, 2)):
        base = tk.num_splits(b, 8, sk, bn, sms)
        splits = max(1, int(base * mult))
        name = f"triton bn{bn} w{warps} s{stages} splits{splits}"
        if name not in fns:
            fns[name] = kernel_call(inputs, splits=splits, block_n=bn, num_warps=warps,
                                    num_stages=stages)
    errors = {}
    for name, fn in list(fns.items()):
        try:
            for _ in range(3):
                fn()
        except Exception as exc:  # a configuration that does not compile or fit
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            del fns[name]
    us = {n: t * 1e3 for n, t in interleaved(fns, args.repeats, True).items()}
    with torch.no_grad():  # device time alone (host time does not count here)
        device_us = {n: t for n, t in ((n, graphed_us(fn)) for n, fn in fns.items()
                                       if n != "paged:auto")  # it synchronises: no graph
                     if t is not None}
    return dict(B=b, Sk=sk, paged_block_size=paged_bs, kv_GB=nbytes / 1e9, us=us,
                device_us=device_us, device_TBps={n: nbytes / t / 1e6 for n, t in
                                                  device_us.items() if t},
                of_ceiling={n: us["ceiling"] / t for n, t in us.items()}, errors=errors)


def graphed_us(fn: Callable[[], Any], n: int = 20) -> "float | None":
    """Device microseconds per call: ``fn`` captured in a CUDA graph, replayed
    ``n`` times back to back (no host cost between kernels).  None for a call
    that cannot be captured (one that synchronises, e.g. a checked paged call)."""
    try:
        replay = _graphed(fn)
        replay()
        torch.cuda.synchronize()
    except Exception:  # not capturable: no device-only figure
        torch.cuda.synchronize()
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / n


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="32x8192x128,32x8192x0,1x131072x0,8x32768x0,1x32768x0",
                   help="B x Sk x paged block size (0: dense)")
    p.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default="triton-decode-tune.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    rows = []
    for shape in args.shapes.split(","):
        b, sk, bs = (int(x) for x in shape.split("x"))
        row = run_shape(b, sk, bs, args)
        rows.append(row)
        print(f"\nB={b} Sk={sk} {'paged bs=' + str(bs) if bs else 'dense'}: "
              f"ceiling {row['us']['ceiling']:.1f} us")
        print(f"  {'call':<36} {'alone':>9}  {'of ceiling':>10} {'device':>9} {'TB/s':>6}")
        order = sorted(row["us"], key=lambda n: row["device_us"].get(n, float("inf")))
        for n in order[:14]:
            t = row["device_us"].get(n)
            dev = f"{t:9.1f} {row['device_TBps'][n]:6.2f}" if t else f"{'-':>9} {'-':>6}"
            print(f"  {n:<36} {row['us'][n]:9.1f}  {row['of_ceiling'][n]:10.1%} {dev}")
        for n, e in row["errors"].items():
            print(f"  {n:<36} {e}")
        torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
