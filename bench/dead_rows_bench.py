"""A padded training step: one host read per attention call, or one output-sized copy?

With key padding and gradients, the dispatcher zeroes the output rows that
have no key (:func:`attention_dispatch._core.masks.zero_empty_rows`) on
backends that leave garbage there.  Without a dead row it may skip the
copy that zeroing under autograd needs, but only by reading one value back
to the host (a synchronisation per call); the other choice is the copy (and
its gradient's copy) on every call.  This script times both in what a
training loop does: a stack of ``--layers`` blocks (projection, attention
with a (B, S) key padding mask, projection, residual), forward and backward,
issued back to back (``--steps`` steps, then one synchronisation), beside
the same stack with torch's own ``F.scaled_dot_product_attention`` and the
(B, 1, 1, S) bool mask, and without padding.

    python bench/dead_rows_bench.py [--shapes 8x16x1024x128,...] [--profile] [--device cpu]
                                    [--out dead-rows.json]

``--profile`` adds, for torch's call and the read-back variants, the device
time per step by kernel and the host's waits per step (torch.profiler).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import attention_dispatch as ad
from attention_dispatch._core import masks as _masks
from attention_dispatch._core.timing import time_interleaved

Tensor = torch.Tensor


class Stack(torch.nn.Module):
    """``layers`` pre-projection attention blocks on (B, S, H*D) bf16."""

    def __init__(self, layers: int, h: int, d: int) -> None:
        super().__init__()
        w = h * d
        self.h, self.d = h, d
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(w, 3 * w, bias=False)
                                       for _ in range(layers))
        self.out = torch.nn.ModuleList(torch.nn.Linear(w, w, bias=False) for _ in range(layers))

    def forward(self, x: Tensor, kpm: Optional[Tensor], attend: str) -> Tensor:
        b, s, _ = x.shape
        for qkv, out in zip(self.qkv, self.out):
            q, k, v = qkv(x).view(b, s, 3, self.h, self.d).unbind(2)  # bshd views
            if attend == "torch":
                m = None if kpm is None else kpm[:, None, None, :]
                a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                   v.transpose(1, 2), attn_mask=m)
                a = a.transpose(1, 2)
            else:
                a = ad.attention(q, k, v, key_padding_mask=kpm, layout="bshd", backend=attend)
            x = x + out(a.reshape(b, s, -1))
        return x


def step(model: Stack, x: Tensor, kpm: Optional[Tensor], attend: str,
         copy: bool) -> Callable[[], None]:
    """One forward+backward of the stack; ``copy``: the dispatcher zeroes
    dead rows by a copy on every call instead of reading back whether any
    row is dead."""
    def run() -> None:
        model.zero_grad(set_to_none=True)
        read = _masks._may_read_back
        if copy:
            _masks._may_read_back = lambda t: False
        try:
            model(x, kpm, attend).float().square().mean().backward()
        finally:
            _masks._may_read_back = read
    return run


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pipelined_ms(fn: Callable[[], Any], steps: int) -> float:
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync()
    return (time.perf_counter() - t0) / steps * 1e3


def profile(fn: Callable[[], Any], steps: int = 3) -> dict[str, Any]:
    """Device time per step by kernel (the 8 longest, with launch counts) and
    the host's waits (synchronisations, device-to-host copies) per step."""
    from torch.profiler import ProfilerActivity, profile as prof

    _sync()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            fn()
        _sync()
    kernels, waits = [], {}
    for e in p.key_averages():
        dev = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if e.key.startswith(("cudaStreamSynchronize", "cudaDeviceSynchronize",
                             "cudaMemcpyAsync", "cudaEventSynchronize", "aten::item",
                             "aten::_local_scalar_dense")):
            waits[e.key] = round(e.count / steps, 1)
        elif dev and not e.key.startswith(("aten::", "autograd::", "cuda", "Memcpy", "Memset")):
            kernels.append((e.key[:80], round(dev / steps, 1), round(e.count / steps, 1)))
    kernels.sort(key=lambda x: -x[1])
    return {"device_us": round(sum(k[1] for k in kernels), 1), "top": kernels[:8],
            "waits_per_step": waits}


def run_shape(b: int, h: int, s: int, d: int, layers: int, steps: int,
              profiled: bool = False, device: str = "cuda") -> dict[str, Any]:
    torch.manual_seed(0)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    model = Stack(layers, h, d).to(device, dt)
    x = torch.randn(b, s, h * d, device=device, dtype=dt, requires_grad=True)
    lens = torch.randint(s // 2, s + 1, (b,), device=device)
    kpm = torch.arange(s, device=device)[None, :] < lens[:, None]  # right padding, no dead row
    fns = {"torch, bool mask": step(model, x, kpm, "torch", False),
           "torch, no padding": step(model, x, None, "torch", False),
           "auto, no padding": step(model, x, None, "auto", False)}
    for name in ("auto", "sdpa-cudnn") if device == "cuda" else ("auto",):
        fns[f"{name}, read back"] = step(model, x, kpm, name, False)
        fns[f"{name}, copy"] = step(model, x, kpm, name, True)
    for fn in fns.values():
        for _ in range(2):
            fn()
    rows = {n: {"pipelined_ms": pipelined_ms(fn, steps)} for n, fn in fns.items()}
    iso = time_interleaved(fns, torch.device(device), rounds=10)
    for n in fns:
        rows[n]["isolated_ms"] = iso[n]
    chosen = ad.explain(*(torch.empty(b, s, h, d, device=device, dtype=dt,
                                      requires_grad=True) for _ in range(3)),
                        key_padding_mask=kpm, layout="bshd").backend
    print(f"B={b} H={h} S={s} D={d}, {layers} layers: auto -> {chosen}")
    if profiled:
        for n in ("torch, bool mask", "auto, read back", "sdpa-cudnn, read back"):
            rows[n]["profile"] = prof_n = profile(fns[n])
            print(f"  profile {n}: device {prof_n['device_us']} us/step, waits "
                  f"{prof_n['waits_per_step']}")
            for name, us, count in prof_n["top"]:
                print(f"      {us:9.1f} us  x{count:<5} {name}")
    for n, r in rows.items():
        print(f"  {n:<24} pipelined {r['pipelined_ms']:8.3f} ms   alone {r['isolated_ms']:8.3f} ms")
    return dict(B=b, H=h, S=s, D=d, layers=layers, auto_choice=chosen, rows=rows)


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="8x16x1024x128,4x16x4096x128", help="BxHxSxD,...")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="dead-rows.json")
    p.add_argument("--device", default="cuda", help="cuda (bfloat16) or cpu (float32)")
    p.add_argument("--profile", action="store_true",
                   help="also the kernels and host waits of a step (torch.profiler)")
    args = p.parse_args(argv)
    res = [run_shape(*(int(v) for v in sh.split("x")), args.layers, args.steps, args.profile,
                     args.device)
           for sh in args.shapes.split(",")]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = dict(device=name, torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, shapes=res), f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from attention_dispatch._core.autotuning import isolated_cache

    with isolated_cache():  # stored tuning decisions neither apply nor change
        raise SystemExit(main())
