"""Structured attention on CUDA: key-padding memory and sliding-window speed.

(a) memory: B=8, S=8192, H=16, D=128, bfloat16, every row's second half of the
    keys padded (``key_padding_mask``; "prefix": each row's real keys come
    first, the usual right padding; "scattered": the same count of real keys at
    random places).  For each: the peak memory the call allocates beyond its
    inputs (``torch.cuda.max_memory_allocated`` after a reset, minus what was
    allocated before the call), through ``backend="auto"``, next to the same
    call without padding; forward and forward+backward.  For reference also
    torch's default ``F.scaled_dot_product_attention`` with the equivalent
    boolean ``attn_mask`` (B, 1, 1, S).  Goal: padded / unpadded <= 1.1 for auto.
(b) sliding window: B=1, S=32768, H=16, D=128, bfloat16, ``causal=True,
    window=(4096, 0)`` (Mistral style: each query sees itself and the 4096 keys
    before it).  Every backend that accepts the call is timed side by side with
    auto (``attention_dispatch.bench.run.time_interleaved``: CUDA events, a random
    order in each round, median of --rounds); forward and
    forward+backward.  TFLOP/s count the score entries the window admits
    (4 * B * H * D * pairs per forward, x2.5 with backward).  Goal: auto >= 0.97 x
    the best.  The outputs of every backend are compared with each other.

Usage::

    python bench/structured_bench.py --out structured-h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import attention_dispatch as ad
from attention_dispatch.bench.run import time_interleaved

Tensor = torch.Tensor
MB = 2 ** 20


def rnd(*shape: int, grad: bool = False) -> Tensor:
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)


def padding_mask(b: int, s: int, pattern: str) -> Tensor:
    """(B, S) bool, True = real key; half of every row's keys are padding."""
    if pattern == "prefix":
        return (torch.arange(s, device="cuda") < s // 2).expand(b, s).contiguous()
    g = torch.Generator(device="cuda").manual_seed(0)
    order = torch.rand(b, s, device="cuda", generator=g).argsort(-1)
    return order < s // 2


def peak_mb(fn: Callable[[], Any]) -> float:
    """Peak memory allocated by ``fn`` beyond what was allocated before it (MiB).
    One untimed call first (caches, workspaces), then the measured one."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MB


def step(call: Callable[[], Tensor], grad: bool, inputs: list[Tensor]) -> Callable[[], None]:
    """A forward (output dropped) or forward+backward closure."""
    def run() -> None:
        out = call()
        if grad:
            for t in inputs:
                t.grad = None
            out.backward(torch.ones_like(out))
    return run


def memory_mode(b: int, s: int, h: int, d: int, mode: str) -> list[dict[str, Any]]:
    grad = mode == "fwd+bwd"
    q, k, v = (rnd(b, h, s, d, grad=grad) for _ in range(3))
    plain = peak_mb(step(lambda: ad.attention(q, k, v), grad, [q, k, v]))
    rows = [dict(case="no padding", mode=mode, via="auto", backend=ad.explain(q, k, v).backend,
                 peak_mb=round(plain, 1), ratio=1.0)]
    for pattern in ("prefix", "scattered"):
        kpm = padding_mask(b, s, pattern)
        auto = peak_mb(step(lambda: ad.attention(q, k, v, key_padding_mask=kpm), grad,
                            [q, k, v]))
        rows.append(dict(case=f"half padded ({pattern})", mode=mode, via="auto",
                         backend=ad.explain(q, k, v, key_padding_mask=kpm).backend,
                         peak_mb=round(auto, 1), ratio=round(auto / plain, 3)))
        bias = kpm[:, None, None, :]
        torch_default = peak_mb(step(
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias), grad, [q, k, v]))
        rows.append(dict(case=f"half padded ({pattern})", mode=mode,
                         via="torch default (F.sdpa, bool attn_mask)", backend="torch",
                         peak_mb=round(torch_default, 1), ratio=round(torch_default / plain, 3)))
    return rows


def memory_rows(b: int, s: int, h: int, d: int) -> list[dict[str, Any]]:
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        rows += memory_mode(b, s, h, d, mode)
        torch.cuda.empty_cache()
    return rows


def window_pairs(s: int, left: int) -> int:
    """Score entries a causal window (left, 0) admits in an S x S call."""
    return sum(min(i, left) + 1 for i in range(s))


def accepting(q: Tensor, k: Tensor, v: Tensor, kw: dict[str, Any], skip: set[str]) -> list[str]:
    d = ad.explain(q, k, v, **kw)
    return [x.name for x in d.verdicts if not x.reasons and x.name not in skip]


def window_mode(b: int, s: int, h: int, d: int, left: int, rounds: int, skip: set[str],
                mode: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    kw: dict[str, Any] = dict(causal=True, window=(left, 0))
    grad = mode == "fwd+bwd"
    q, k, v = (rnd(b, h, s, d, grad=grad) for _ in range(3))
    names = accepting(q, k, v, kw, skip)
    chosen = ad.explain(q, k, v, **kw).backend
    fns = {n: step(lambda n=n: ad.attention(q, k, v, backend=n, **kw), grad, [q, k, v])
           for n in names}
    fns["auto"] = step(lambda: ad.attention(q, k, v, **kw), grad, [q, k, v])
    agree: dict[str, Any] = {}
    if not grad:
        with torch.no_grad():
            outs = {n: ad.attention(q, k, v, backend=n, **kw).float() for n in names}
        agree = {n: float((o - outs[names[0]]).abs().max()) for n, o in outs.items()}
        agree["against"] = names[0]
    for fn in fns.values():  # compiles (flex) before the untimed call of the timer
        fn()
    ms = time_interleaved(fns, torch.device("cuda"), rounds=rounds)
    best = min(ms[n] for n in names)
    flops = 4 * b * h * d * window_pairs(s, left) * (2.5 if grad else 1.0)
    rows = [dict(case=f"S={s} causal window ({left}, 0)", mode=mode, backend=n,
                 chosen=chosen if n == "auto" else n, ms=round(t, 4),
                 tflops=round(flops / (t * 1e-3) / 1e12, 1),
                 auto_over_best=round(best / ms["auto"], 4)) for n, t in ms.items()]
    return rows, agree


def window_rows(b: int, s: int, h: int, d: int, left: int, rounds: int,
                skip: set[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    agree: dict[str, Any] = {}
    for mode in ("fwd", "fwd+bwd"):
        r, a = window_mode(b, s, h, d, left, rounds, skip, mode)
        rows += r
        agree = agree or a
        torch.cuda.empty_cache()
    return rows, agree


def environment() -> dict[str, Any]:
    import datetime
    return {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "attention_dispatch": ad.__version__, "host": platform.node(),
            "date": datetime.date.today().isoformat(),
            "versions": {n: ad.get_backend(n).describe() for n in ad.list_backends()
                         if not ad.get_backend(n).probe(torch.device("cuda"))}}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seq-window", type=int, default=32768)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--skip", default="math", help="backends not timed for the window "
                   "(math materialises the 32k x 32k scores)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("structured_bench: needs CUDA", file=sys.stderr)
        return 2
    env = environment()
    print(json.dumps(env, indent=1))
    mem = memory_rows(8, 8192, 16, 128)
    for r in mem:
        print(f"memory  {r['mode']:8s} {r['case']:26s} {r['via']:42s} {r['backend']:12s} "
              f"{r['peak_mb']:9.1f} MiB  x{r['ratio']:.3f}")
    win, agree = window_rows(1, a.seq_window, 16, 128, a.window, a.rounds,
                             set(filter(None, a.skip.split(","))))
    for r in win:
        print(f"window  {r['mode']:8s} {r['backend']:12s} ({r['chosen']:10s}) {r['ms']:9.3f} ms "
              f"{r['tflops']:7.1f} TFLOP/s  auto/best {r['auto_over_best']:.3f}")
    print(f"window outputs, max |difference| vs {agree.get('against')}: "
          + ", ".join(f"{n} {e:.3g}" for n, e in agree.items() if n != "against"))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"environment": env, "memory": mem, "window": win,
                       "window_agreement": agree}, f, indent=1)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    from attention_dispatch._core.autotuning import isolated_cache

    with isolated_cache():  # stored tuning decisions neither apply nor change
        sys.exit(main())
