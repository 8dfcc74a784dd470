"""The dispatcher's host time per paged call, without a kernel.

A backend whose ``forward_paged`` and ``forward`` return a preallocated output
(``null-paged``, registered for this run only) takes decode calls (B=2, Hq=4,
Hkv=2, D=16, Sk=64, block size 16, float32, CPU), so what is timed is
``attention_paged``'s own work: validation, the decision lookup and, with the
default ``check_values=True``, the read of block_table and cache_seqlens.
Also the dense ``attention`` call of the same keys on the same backend.
Best of 5 rounds of 3000 calls, one thread.

    python bench/paged_host_cost.py [--json paged-host.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any, Callable, Optional

import torch

import attention_dispatch as ad
import call_kinds_overhead
from attention_dispatch._core.backend import Backend
from attention_dispatch._core.capabilities import Capabilities

Tensor = torch.Tensor
B, HQ, HKV, D, BS, SK = 2, 4, 2, 16, 16, 64


class NullPaged(Backend):
    """Returns a preallocated output for the timed calls (the dispatcher's cost
    alone); other calls, the numeric check's, go to math."""

    capabilities = Capabilities(device_types=frozenset({"cpu"}),
                                dtypes=frozenset({torch.float32}),
                                extras=frozenset({"paged"}), empty_rows_exact=True)
    out = torch.zeros(B, 1, HQ, D)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Any:
        if q.shape != (B, HQ, 1, D):  # the numeric check's call: answered by math
            return ad.get_backend("math").forward(q, k, v, **kw)
        return self.out.transpose(1, 2), None

    def forward_paged(self, q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Any:
        if q.shape != (B, 1, HQ, D):
            return ad.get_backend("math").forward_paged(q, k, v, **kw)
        return self.out, None


def best_us(fn: Callable[[], Any]) -> float:
    for _ in range(20):
        fn()
    return call_kinds_overhead.best_us(fn, 3000, 5)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ad.register_backend("null-paged")(NullPaged)
    nb = B * SK // BS
    q = torch.randn(B, 1, HQ, D)
    k, v = torch.randn(nb, BS, HKV, D), torch.randn(nb, BS, HKV, D)
    table = torch.randperm(nb).view(B, -1).int()
    lens = torch.full((B,), SK, dtype=torch.int32)
    kd, vd = (c[table.long()].reshape(B, SK, HKV, D) for c in (k, v))
    kw = dict(block_table=table, cache_seqlens=lens, backend="null-paged")
    calls = {
        "paged, checked": lambda: ad.attention_paged(q, k, v, **kw),
        "paged, check_values=False": lambda: ad.attention_paged(q, k, v, check_values=False,
                                                               **kw),
        "dense (same keys, bshd)": lambda: ad.attention(q, kd, vd, layout="bshd", causal=True,
                                                        backend="null-paged"),
    }
    with torch.no_grad():
        us = {name: best_us(fn) for name, fn in calls.items()}
    res = dict(host=platform.processor() or platform.machine(), torch=torch.__version__,
               date=time.strftime("%Y-%m-%d"), us=us)
    for name, t in us.items():
        print(f"{name:<28} {t:7.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
