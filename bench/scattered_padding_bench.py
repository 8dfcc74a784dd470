"""Scattered key padding: peak memory and time, per backend, beside torch's default call.

B=8, n=8192, H=16, D=128 bfloat16 (defaults): q, k, v (B, H, n, D) and a
key padding mask with half of each row's keys padded, three ways:

  none        no mask (the baseline: what the kernel itself needs);
  right       the last half of each row padded (the usual case: no K/V copy);
  scattered   half of each row's keys padded at random positions.

For each mask, each forced backend, ``auto`` and torch's default call
(``F.scaled_dot_product_attention`` with the equivalent (B, 1, 1, n) bool
mask; none: no mask) are run once for warm-up, then:

  extra_MiB   peak memory the call allocates beyond its inputs and its output
              (torch.cuda.max_memory_allocated after a reset, minus what was
              allocated before the call, minus the output's bytes);
  ms          median of ``--repeats`` calls (CUDA events);

and the report gives, per backend, scattered extra / none extra (the goal:
<= 1.5x for auto, see docs) and auto / torch-default time.  Runs with a
temporary autotune cache.  CUDA only; on the CPU it times the calls of a
smaller shape (``--cpu``) and reports no memory (torch keeps no CPU
allocator statistics)::

    python bench/scattered_padding_bench.py --out scattered.json
    python bench/scattered_padding_bench.py --cpu --b 2 --n 1024 --h 4 --d 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import attention_dispatch as ad

Tensor = torch.Tensor
DEFAULT_BACKENDS = "flash-attn,xformers,sdpa-cudnn,sdpa-mem-efficient,flex"


def masks(b: int, n: int, device: str, seed: int = 0) -> dict[str, Optional[Tensor]]:
    """The three key padding masks (True = real key), half of each row real."""
    g = torch.Generator().manual_seed(seed)
    right = torch.arange(n)[None, :].expand(b, n) < n // 2
    scattered = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        scattered[i, torch.randperm(n, generator=g)[: n // 2]] = True
    return {"none": None, "right": right.to(device), "scattered": scattered.to(device)}


def call_fn(name: str, q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor]
            ) -> Callable[[], Tensor]:
    if name == "torch-default":
        attn_mask = None if kpm is None else kpm[:, None, None, :]
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return lambda: ad.attention(q, k, v, key_padding_mask=kpm, backend=name)


def extra_mib(fn: Callable[[], Tensor]) -> float:
    """Peak MiB allocated by one call beyond what existed before it and its output."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    extra = peak - before - out.numel() * out.element_size()
    del out
    return max(extra, 0) / 2**20


def time_ms(fn: Callable[[], Any], repeats: int, cuda: bool) -> float:
    if not cuda:
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    ts = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cuda = not args.cpu
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    q, k, v = (torch.randn(args.b, args.h, args.n, args.d, device=device, dtype=dtype)
               for _ in range(3))
    names = [n for n in args.backends.split(",") if n] + ["auto", "torch-default"]
    rows: dict[str, dict[str, Any]] = {}
    for mname, kpm in masks(args.b, args.n, device).items():
        for name in names:
            fn = call_fn(name, q, k, v, kpm)
            cell: dict[str, Any] = {}
            try:
                fn()  # warm-up (and compile, for flex)
                if cuda:
                    cell["extra_MiB"] = round(extra_mib(fn), 1)
                cell["ms"] = round(time_ms(fn, args.repeats, cuda), 3)
                if name == "auto":
                    cell["choice"] = ad.explain(q, k, v, key_padding_mask=kpm).backend
            except ad.BackendUnavailable as exc:
                cell["refused"] = "; ".join(exc.reasons.get(name, ["?"]))[:200]
            except Exception as exc:  # one broken backend must not stop the run
                cell["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            rows.setdefault(name, {})[mname] = cell
            if cuda:
                torch.cuda.empty_cache()
    summary: dict[str, Any] = {}
    for name, r in rows.items():
        s: dict[str, Any] = {}
        none, sc = r.get("none", {}), r.get("scattered", {})
        if "extra_MiB" in none and "extra_MiB" in sc:
            s["scattered_extra_MiB"] = sc["extra_MiB"]
            s["none_extra_MiB"] = none["extra_MiB"]
            in_out = 4 * q.numel() * q.element_size() / 2**20  # q, k, v and the output
            s["peak_ratio_scattered_over_none"] = round(
                (in_out + sc["extra_MiB"]) / (in_out + none["extra_MiB"]), 3)
        td = rows["torch-default"].get("scattered", {})
        if "ms" in sc and "ms" in td:
            s["scattered_speed_vs_torch"] = round(td["ms"] / sc["ms"], 3)  # > 1: faster
        summary[name] = s
    meta = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                B=args.b, n=args.n, H=args.h, D=args.d, dtype=str(dtype), repeats=args.repeats)
    return dict(meta=meta, rows=rows, summary=summary)


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--b", type=int, default=8)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--h", type=int, default=16)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--backends", default=DEFAULT_BACKENDS)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--cpu", action="store_true", help="time on the CPU (no memory figures)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device (use --cpu for the timing on the CPU)", file=sys.stderr)
        return 2
    res = run(args)
    print(json.dumps(res["meta"]))
    for name, r in res["rows"].items():
        cells = "  ".join(f"{m}: " + (f"{c['ms']:.2f}ms" if "ms" in c else
                                      ("refused" if "refused" in c else "error"))
                          + (f" +{c['extra_MiB']:.0f}MiB" if "extra_MiB" in c else "")
                          + (f" [{c['choice']}]" if "choice" in c else "")
                          for m, c in r.items())
        print(f"{name:<20} {cells}")
    for name, s in res["summary"].items():
        if s:
            print(f"{name:<20} {s}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from attention_dispatch._core.autotuning import isolated_cache

    with isolated_cache():  # stored tuning decisions neither apply nor change a figure
        sys.exit(main())
