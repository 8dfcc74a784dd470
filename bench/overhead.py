"""Dispatch overhead: ad.attention(backend="auto") vs the chosen kernel called
directly and vs torch's own F.scaled_dot_product_attention, on tiny tensors
(B=1, H=2, S=8, D=16), in one run.

    python bench/overhead.py [--device cpu|cuda] [--repeats 20000] [--json out.json]

Modes, each "auto" beside "direct" (the chosen backend's forward() with the
plan's arguments) and "torch" (F.scaled_dot_product_attention on the same
tensors, what a user calls without this package); the ratios auto / direct
and auto / torch are reported:
  eager     host-side microseconds per call;
  compile   both wrapped in torch.compile(fullgraph=True): the dispatcher
            resolves at trace time, so the compiled graphs are the same;
  cudagraph (CUDA only) both captured in a CUDA graph and replayed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

import attention_dispatch as ad


def _time_us(fn: Callable[[], Any], repeats: int, sync: Callable[[], None], rounds: int = 7
             ) -> float:
    """Median over rounds of the mean microseconds per call."""
    fn()
    per_round = []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        per_round.append((time.perf_counter() - t0) / repeats * 1e6)
    return statistics.median(per_round)


def _pair(auto: Callable[[], Any], direct: Callable[[], Any], torch_fn: Callable[[], Any],
          repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    # interleave a few times so drift (and other load) hits all three alike
    a, d, t = [], [], []
    for _ in range(3):
        d.append(_time_us(direct, repeats, sync))
        a.append(_time_us(auto, repeats, sync))
        t.append(_time_us(torch_fn, repeats, sync))
    da, dd, dt = min(a), min(d), min(t)
    return {"direct_us": round(dd, 3), "auto_us": round(da, 3), "torch_us": round(dt, 3),
            "overhead_us": round(da - dd, 3), "auto_over_direct": round(da / dd, 3),
            "auto_over_torch": round(da / dt, 3)}


def _graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured in a CUDA graph (after warm-up calls on a side stream
    that waits for the current one): its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def _where(exc: BaseException) -> str:
    """"Type: message" and the innermost frames of the traceback (an empty
    AssertionError says nothing without them)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    at = "; ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in frames)
    first = str(exc).splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first} (at {at})"


def measure(device: str, repeats: int, modes: list[str]) -> dict[str, Any]:
    torch.manual_seed(0)
    dt = torch.float16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(1, 2, 8, 16, device=device, dtype=dt) for _ in range(3))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    decision = ad.explain(q, k, v)
    backend = ad.get_backend(decision.backend)
    fwd, spec, scale = backend.forward, decision.spec, 1.0 / math.sqrt(q.shape[-1])

    def direct() -> Any:
        return fwd(q, k, v, spec=spec, mask=None, key_padding_mask=None, dropout_p=0.0,
                   scale=scale)[0]

    def auto() -> Any:
        return ad.attention(q, k, v)

    def torch_sdpa() -> Any:
        return F.scaled_dot_product_attention(q, k, v)

    out: dict[str, Any] = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "host": platform.processor() or platform.machine(), "torch": torch.__version__,
        "backend": decision.backend, "date": time.strftime("%Y-%m-%d")}
    with torch.no_grad():
        if "eager" in modes:
            out["eager"] = _pair(auto, direct, torch_sdpa, repeats, sync)
        if "compile" in modes:
            try:
                ca = torch.compile(auto, fullgraph=True)
                cd = torch.compile(direct, fullgraph=True)
                ct = torch.compile(torch_sdpa, fullgraph=True)
                out["compile"] = _pair(ca, cd, ct, max(repeats // 4, 100), sync)
            except Exception as exc:  # a kernel dynamo cannot trace (e.g. FA4's CuTe DSL)
                out["compile_error"] = _where(exc)
        out["kernels_us"] = _kernels(decision, q, k, v, repeats, sync)
        if "cudagraph" in modes and device == "cuda":
            out["cudagraph"] = _pair(_graphed(auto), _graphed(direct), _graphed(torch_sdpa),
                                     repeats, sync)
    return out


def _kernels(dec: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int,
             sync: Callable[[], None]) -> dict[str, float]:
    """Eager microseconds of each accepting backend's forward() on the same call
    (the host cost of its kernel call, which decides tiny calls): the data
    behind the "tiny" shape class of the ranking."""
    out = {}
    scale = 1.0 / math.sqrt(q.shape[-1])
    for verdict in dec.verdicts:
        if verdict.reasons or verdict.name in ("math", "chunked"):
            continue
        fwd = ad.get_backend(verdict.name).forward

        def call(fwd: Any = fwd) -> Any:
            return fwd(q, k, v, spec=dec.spec, mask=None, key_padding_mask=None, dropout_p=0.0,
                       scale=scale)[0]
        try:
            out[verdict.name] = round(_time_us(call, max(repeats // 4, 200), sync), 3)
        except Exception as exc:  # e.g. a kernel that fails on this tiny shape
            out[verdict.name] = f"error: {type(exc).__name__}"  # type: ignore[assignment]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=20000)
    p.add_argument("--modes", default="eager,compile,cudagraph")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    r = measure(a.device, a.repeats, a.modes.split(","))
    print(f"{r['device']} ({r['host']}) torch {r['torch']}, backend {r['backend']}, {r['date']}")
    for mode in ("eager", "compile", "cudagraph"):
        if mode in r:
            m = r[mode]
            print(f"  {mode:<9} direct {m['direct_us']:7.2f} us  auto {m['auto_us']:7.2f} us  "
                  f"torch {m['torch_us']:7.2f} us  auto/direct {m['auto_over_direct']:.2f}x  "
                  f"auto/torch {m['auto_over_torch']:.2f}x")
    if "compile_error" in r:
        print(f"  compile   not measured: {r['compile_error']}")
    print("  kernels   " + "  ".join(f"{n} {t} us" for n, t in r["kernels_us"].items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    from attention_dispatch._core.autotuning import isolated_cache

    with isolated_cache():  # stored tuning decisions neither apply nor change
        main()
