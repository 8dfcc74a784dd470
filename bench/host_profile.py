"""Where a call's host time goes: the Python functions it spends its time in.

For decode calls on CUDA (the shapes and calls of ``bench/decode_profile.py``:
GQA 32/8, head dim 128, bfloat16, Sq=1, B=32, Sk=8192; dense K/V and a paged
cache of block size 128), each call is warmed up, then run ``--calls`` times
under cProfile with the GPU running behind (no synchronisation inside the
profiled loop).  Printed and written: the host time per call, and the
functions with the most time of their own (``tottime``) and in total
(``cumtime``), per call, in microseconds.  cProfile adds its own cost to every
Python call, so the figures are larger than ``decode_profile.py``'s host times;
what they show is the share of each function.

    python bench/host_profile.py --out host-profile.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from typing import Any, Callable

import torch

from decode_profile import calls, inputs


def profile_call(fn: Callable[[], Any], n: int, top: int) -> dict[str, Any]:
    """Host time per call without and with cProfile, and the top functions."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    plain = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    st = pstats.Stats(prof)
    rows = []
    for (file, line, name), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore
        where = f"{file.split('site-packages/')[-1].split('/work/')[-1]}:{line}({name})"
        rows.append((where, nc / n, tt / n * 1e6, ct / n * 1e6))
    own = sorted(rows, key=lambda r: -r[2])[:top]
    cum = sorted(rows, key=lambda r: -r[3])[:top]
    keys = ("function", "calls_per_call", "tottime_us", "cumtime_us")
    return dict(host_us=plain, profiled_us=sum(r[2] for r in rows),
                own=[dict(zip(keys, r)) for r in own], cumulative=[dict(zip(keys, r)) for r in cum])


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--only", nargs="*", default=None, help="call names to profile")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result: dict[str, Any] = dict(meta=dict(device=torch.cuda.get_device_name(),
                                            torch=torch.__version__,
                                            date=time.strftime("%Y-%m-%d")), shapes=[])
    for bs in (0, 128):
        rows = {}
        with torch.no_grad():
            for name, fn in calls(inputs(32, 8192, bs)).items():
                if args.only and name not in args.only:
                    continue
                try:
                    rows[name] = profile_call(fn, args.calls, args.top)
                except Exception as exc:  # a refusal is shown, not profiled
                    print(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                    continue
                r = rows[name]
                print(f"\n== B=32 Sk=8192 {'paged bs=%d' % bs if bs else 'dense'} {name}: "
                      f"host {r['host_us']:.1f} us/call, profiled {r['profiled_us']:.1f}")
                for f in r["own"]:
                    print(f"  {f['tottime_us']:8.1f} own {f['cumtime_us']:8.1f} cum "
                          f"{f['calls_per_call']:5.1f}x  {f['function'][:110]}")
        result["shapes"].append(dict(B=32, Sk=8192, paged_block_size=bs, rows=rows))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    from attention_dispatch._core.autotuning import isolated_cache

    with isolated_cache():  # stored tuning decisions neither apply nor change
        raise SystemExit(main())
