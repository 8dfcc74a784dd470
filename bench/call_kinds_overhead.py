"""Per-call host time of several kinds of tiny calls (plain, key padding, lse,
dense mask, causal, bshd): the general dispatch path as well as the plain one.

Run it with one tree on ``PYTHONPATH`` at a time to compare versions, e.g.::

    PYTHONPATH=/tmp/before python bench/call_kinds_overhead.py --out before.json
    PYTHONPATH=$PWD python bench/call_kinds_overhead.py --out after.json

Tiny CPU tensors (B=1, H=2, S=8, D=16, fp32), one thread, the best of 5
repeats of 2000 calls, after two warm-up calls (µs per call); for each kind
with an equivalent, torch F.sdpa's own call too and the ratio ours / torch
(key padding: a dense bool mask (B, 1, 1, Sk); bool mask; causal with
is_causal=True (Sq == Sk); bshd: transposed views).
"""

from __future__ import annotations

import argparse
import json
import platform
import timeit
from typing import Any, Callable, Optional

import torch

import attention_dispatch as ad


def cases(q: torch.Tensor, kpm: torch.Tensor, mask: torch.Tensor
          ) -> dict[str, tuple[Callable[[], Any], Optional[Callable[[], Any]]]]:
    """Each kind: (our call, torch F.sdpa's equivalent or None).  Key padding
    is a dense bool mask (B, 1, 1, Sk) for torch (built once, as a model
    builds it once per batch); bshd: transposed views in and out."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    dense_kpm = kpm[:, None, None, :]
    qt = q.transpose(1, 2).contiguous()  # (B, S, H, D) memory

    def torch_bshd() -> torch.Tensor:
        return sdpa(qt.transpose(1, 2), qt.transpose(1, 2), qt.transpose(1, 2)).transpose(1, 2)

    return {
        "plain": (lambda: ad.attention(q, q, q), lambda: sdpa(q, q, q)),
        "key_padding": (lambda: ad.attention(q, q, q, key_padding_mask=kpm),
                        lambda: sdpa(q, q, q, attn_mask=dense_kpm)),
        "lse": (lambda: ad.attention(q, q, q, return_lse=True), None),
        "bool_mask": (lambda: ad.attention(q, q, q, mask=mask),
                      lambda: sdpa(q, q, q, attn_mask=mask)),
        "causal": (lambda: ad.attention(q, q, q, causal=True),
                   lambda: sdpa(q, q, q, is_causal=True)),
        "bshd": (lambda: ad.attention(qt, qt, qt, layout="bshd"), torch_bshd),
    }


def best_us(fn: Callable[[], Any], calls: int, repeat: int) -> float:
    """Best of ``repeat`` runs of ``calls`` calls, after two warm-up calls (µs per call)."""
    fn()
    fn()
    return round(min(timeit.repeat(fn, number=calls, repeat=repeat)) / calls * 1e6, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    q = torch.randn(1, 2, 8, 16)
    kpm = torch.ones(1, 8, dtype=torch.bool)
    kpm[0, -1] = False
    mask = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.2
    us, torch_us, ratio = {}, {}, {}
    for name, (ours, theirs) in cases(q, kpm, mask).items():
        us[name] = best_us(ours, args.calls, args.repeat)
        line = f"{name:12s} {us[name]:8.2f} us"
        if theirs is not None:
            torch_us[name] = best_us(theirs, args.calls, args.repeat)
            ratio[name] = round(us[name] / torch_us[name], 2)
            line += f"   torch F.sdpa {torch_us[name]:8.2f} us   ratio {ratio[name]:5.2f}"
        print(line)
    res = {"package": ad.__file__, "torch": torch.__version__, "host": platform.node(),
           "shape": "B=1 H=2 S=8 D=16 float32, one thread", "calls": args.calls,
           "repeat": args.repeat, "us_per_call": us, "torch_sdpa_us_per_call": torch_us,
           "ratio_to_torch": ratio}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
