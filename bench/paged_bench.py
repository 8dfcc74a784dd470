"""Paged decode vs dense decode on CUDA, in one run with interleaved timing.

Shape: B=32 rows, Hq=32, Hkv=8 (GQA 4), D=128, bfloat16, one new token per row
(Sq=1), Sk=8192 keys per row (all rows full, so dense and paged do the same
work), block size 128 (64 blocks a row), blocks scattered over the cache
(a random permutation).  Timed side by side (``_core.timing.time_interleaved``:
CUDA events, a random order in each round, the median of --rounds):

* ``paged:<backend>``: ``attention_paged`` on each backend that takes the call
  natively (FA4 page_table, flex block mask), and ``paged:auto`` (also with
  ``check_values=False``: no host read of the table, no synchronisation);
* ``paged-gathered:<backend>``: the gathered route (the used blocks copied to a
  dense batch first) on the dense backends, to show what native paging saves;
* ``dense:<backend>`` / ``dense:auto``: ``attention`` on the same keys stored
  dense (B, Sk, Hkv, D), causal=True (Sq=1: every key);
* ``torch-sdpa``: torch's ``F.scaled_dot_product_attention`` on the dense keys
  (enable_gqa), the baseline.

Two timings of each: ``us``, one call from an idle GPU (its host latency
counts in full), and ``pipelined_us``, the time per call of --burst calls
issued back to back (what a decode loop with work queued ahead sees: the
larger of host and device time per call); both medians of interleaved rounds.
Native routes are also timed with ``check_values=False`` (``... unchecked``).

Every output is compared with the dense math result (max abs error printed).
``--lengths mixed`` draws row lengths in [1, 8192] instead (paged only wins
memory there; dense runs padded with key_padding_mask).

Usage::

    python bench/paged_bench.py --out paged-h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import attention_dispatch as ad
from attention_dispatch._core.timing import time_interleaved

Tensor = torch.Tensor


def make(b: int, hq: int, hkv: int, d: int, sk: int, bs: int, mixed: bool,
         dev: str = "cuda") -> dict[str, Any]:
    """The paged cache, its table and lengths, and the same keys stored dense."""
    g = torch.Generator(device=dev).manual_seed(0)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    maxb = sk // bs
    nb = b * maxb
    if mixed:
        lengths = torch.randint(1, sk + 1, (b,), device=dev, generator=g, dtype=torch.int32)
    else:
        lengths = torch.full((b,), sk, device=dev, dtype=torch.int32)
    table = torch.randperm(nb, device=dev, generator=g).view(b, maxb).int()
    kc = torch.randn(nb, bs, hkv, d, device=dev, dtype=dt, generator=g)
    vc = torch.randn(nb, bs, hkv, d, device=dev, dtype=dt, generator=g)
    q = torch.randn(b, 1, hq, d, device=dev, dtype=dt, generator=g)
    kd = kc[table.long()].reshape(b, sk, hkv, d)  # row b's keys in order (left-aligned)
    vd = vc[table.long()].reshape(b, sk, hkv, d)
    kpm = torch.arange(sk, device=dev)[None, :] < lengths[:, None].long()
    return dict(q=q, kc=kc, vc=vc, table=table, lengths=lengths, kd=kd, vd=vd, kpm=kpm,
                mixed=mixed)


def calls(c: dict[str, Any]) -> dict[str, Callable[[], Tensor]]:
    """Every timed call; those a backend refuses are left out (printed)."""
    q, kw = c["q"], dict(block_table=c["table"], cache_seqlens=c["lengths"])
    kpm = c["kpm"] if c["mixed"] else None
    out: dict[str, Callable[[], Tensor]] = {}

    def paged(name: str, check: bool = True) -> Callable[[], Tensor]:
        return lambda: ad.attention_paged(q, c["kc"], c["vc"], backend=name,
                                          check_values=check, **kw)

    def dense(name: str) -> Callable[[], Tensor]:
        return lambda: ad.attention(q, c["kd"], c["vd"], layout="bshd", causal=True,
                                    key_padding_mask=kpm, backend=name)

    dec = ad.explain_paged(q, c["kc"], c["vc"], **kw)
    print(dec)
    for v in dec.verdicts:
        if v.rank is None or v.reasons or v.name == "math":
            continue
        kind = "paged" if v.note and "native" in v.note else "paged-gathered"
        out[f"{kind}:{v.name}"] = paged(v.name)
        if kind == "paged":
            out[f"paged:{v.name} unchecked"] = paged(v.name, False)
    out["paged:auto"] = paged("auto")
    out["paged:auto unchecked"] = lambda: ad.attention_paged(q, c["kc"], c["vc"],
                                                             check_values=False, **kw)
    dense_dec = ad.explain(q, c["kd"], c["vd"], layout="bshd", causal=True,
                           key_padding_mask=kpm)
    for v in dense_dec.verdicts:
        if v.rank is not None and not v.reasons and v.name != "math":
            out[f"dense:{v.name}"] = dense(v.name)
    out["dense:auto"] = dense("auto")
    if not c["mixed"]:
        out["torch-sdpa"] = lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), c["kd"].transpose(1, 2), c["vd"].transpose(1, 2),
            enable_gqa=True).transpose(1, 2)
    return out


def pipelined(fns: dict[str, Callable[[], Any]], burst: int, rounds: int) -> dict[str, float]:
    """Milliseconds per call of ``burst`` calls back to back (CUDA events around
    the burst), the median of interleaved rounds in a random order each round."""
    samples: dict[str, list[float]] = {n: [] for n in fns}
    names, rng = list(fns), random.Random(1)
    for _ in range(rounds):
        rng.shuffle(names)
        for n in names:
            torch.cuda.synchronize()
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            for _ in range(burst):
                fns[n]()
            end.record()
            end.synchronize()
            samples[n].append(start.elapsed_time(end) / burst)
    return {n: statistics.median(s) for n, s in samples.items()}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, nargs=2, default=(32, 8), metavar=("HQ", "HKV"))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--lengths", choices=("full", "mixed"), default="full")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--burst", type=int, default=20, help="calls per pipelined sample")
    ap.add_argument("--out", default="paged-bench.json")
    args = ap.parse_args(argv)
    c = make(args.batch, args.heads[0], args.heads[1], args.head_dim, args.seq, args.block_size,
             args.lengths == "mixed", args.device)
    fns = calls(c)
    with torch.no_grad():
        ref = ad.attention(c["q"], c["kd"], c["vd"], layout="bshd", causal=True,
                           key_padding_mask=c["kpm"], backend="math").float()
        errors = {}
        for name, fn in fns.items():
            errors[name] = (fn().float() - ref).abs().max().item()
        ms = time_interleaved(fns, torch.device(args.device), rounds=args.rounds)
        pipe = (pipelined(fns, args.burst, max(5, args.rounds // 3))
                if args.device == "cuda" else {})
    base = ms.get("torch-sdpa") or ms["dense:auto"]
    pbase = pipe.get("torch-sdpa") or pipe.get("dense:auto") or 1.0
    print(f"\n{'call':<34} {'us':>9} {'vs baseline':>11} {'pipelined us':>13} "
          f"{'vs baseline':>11} {'max err':>9}")
    for name in sorted(ms, key=ms.get):
        p_us = f"{pipe[name] * 1e3:13.1f} {pbase / pipe[name]:10.2f}x" if pipe else ""
        print(f"{name:<34} {ms[name] * 1e3:9.1f} {base / ms[name]:10.2f}x {p_us} "
              f"{errors[name]:9.2e}")
    ratio = ms["dense:auto"] / ms["paged:auto"]
    unchecked = ms["dense:auto"] / ms["paged:auto unchecked"]
    print(f"paged:auto / dense:auto speed: {ratio:.3f}x, with check_values=False "
          f"{unchecked:.3f}x (goal >= 0.9)")
    if pipe:
        print(f"pipelined: paged:auto / dense:auto {pipe['dense:auto'] / pipe['paged:auto']:.3f}x,"
              f" with check_values=False "
              f"{pipe['dense:auto'] / pipe['paged:auto unchecked']:.3f}x")
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
    res = dict(device=name, torch=torch.__version__,
               host=platform.node(), args=vars(args), us={n: t * 1e3 for n, t in ms.items()},
               max_err=errors, paged_vs_dense_auto=ratio,
               paged_unchecked_vs_dense_auto=unchecked,
               pipelined_us={n: t * 1e3 for n, t in pipe.items()})
    if pipe:
        res.update(pipelined_paged_vs_dense_auto=pipe["dense:auto"] / pipe["paged:auto"],
                   pipelined_paged_unchecked_vs_dense_auto=(
                       pipe["dense:auto"] / pipe["paged:auto unchecked"]))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    from attention_dispatch._core.autotuning import isolated_cache

    with isolated_cache():  # stored tuning decisions neither apply nor change
        raise SystemExit(main())
