"""Per-call host time of several kinds of tiny calls (plain, key padding, lse,
dense mask, causal, bshd): the general dispatch path as well as the plain one.

Run it with one tree on ``PYTHONPATH`` at a time to compare versions, e.g.::

    PYTHONPATH=/tmp/before python bench/call_kinds_overhead.py --out before.json
    PYTHONPATH=$PWD python bench/call_kinds_overhead.py --out after.json

Tiny CPU tensors (B=1, H=2, S=8, D=16, fp32), one thread, the best of 5
repeats of 2000 calls, after two warm-up calls (µs per call).
"""

from __future__ import annotations

import argparse
import json
import platform
import timeit

import torch

import attention_dispatch as ad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    torch.set_num_threads(1)
    q = torch.randn(1, 2, 8, 16)
    kpm = torch.ones(1, 8, dtype=torch.bool)
    kpm[0, -1] = False
    mask = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.2
    cases = {
        "plain": lambda: ad.attention(q, q, q),
        "key_padding": lambda: ad.attention(q, q, q, key_padding_mask=kpm),
        "lse": lambda: ad.attention(q, q, q, return_lse=True),
        "bool_mask": lambda: ad.attention(q, q, q, mask=mask),
        "causal": lambda: ad.attention(q, q, q, causal=True),
        "bshd": lambda: ad.attention(q, q, q, layout="bshd"),
        "torch_sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q),
    }
    us = {}
    for name, fn in cases.items():
        fn()
        fn()
        best = min(timeit.repeat(fn, number=args.calls, repeat=5))
        us[name] = round(best / args.calls * 1e6, 2)
        print(f"{name:12s} {us[name]:8.2f} us")
    res = {"package": ad.__file__, "torch": torch.__version__, "host": platform.node(),
           "us_per_call": us}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
