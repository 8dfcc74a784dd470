"""Dispatch overhead: ad.attention(backend="auto") vs the chosen kernel called
directly, on tiny tensors, in one run.

    python bench/overhead.py [--device cpu|cuda] [--repeats 20000] [--json out.json]

Reports host-side microseconds per call for: the chosen backend's forward()
called directly (what auto runs after its cache lookup) and ad.attention with
auto; the difference is the dispatcher's own cost.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch

import attention_dispatch as ad


def _time(fn, repeats: int, rounds: int = 7) -> float:
    """Median over rounds of the mean µs per call."""
    per_round = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        per_round.append((time.perf_counter() - t0) / repeats * 1e6)
    return statistics.median(per_round)


def measure(device: str, repeats: int) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 8, device=device) for _ in range(3))
    with torch.no_grad():
        ad.attention(q, k, v)  # first call: decide and cache
        decision = ad.explain(q, k, v)
        backend = ad.get_backend(decision.backend)
        fwd, spec, scale = backend.forward, decision.spec, 1.0 / math.sqrt(q.shape[-1])

        def direct() -> None:
            fwd(q, k, v, spec=spec, mask=None, key_padding_mask=None, dropout_p=0.0, scale=scale)

        def auto() -> None:
            ad.attention(q, k, v)

        for fn in (direct, auto):
            _time(fn, repeats // 10, 1)  # warm-up
        t_direct = _time(direct, repeats)
        t_auto = _time(auto, repeats)
    return {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "backend": decision.backend,
        "direct_us": round(t_direct, 3),
        "auto_us": round(t_auto, 3),
        "overhead_us": round(t_auto - t_direct, 3),
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=20000)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    r = measure(a.device, a.repeats)
    print(f"{r['device']} torch {r['torch']}: backend {r['backend']}: direct "
          f"{r['direct_us']:.2f} us, auto {r['auto_us']:.2f} us, overhead {r['overhead_us']:.2f} us/call")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
