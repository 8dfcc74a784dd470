"""Timing kernels: interleaved rounds, CUDA events or the wall clock.

Used by autotune (to choose) and by the bench (to report), so a published
figure and a stored tuning decision come from the same measurement.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any, Callable, Optional

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def once_ms(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device,
                     budget_s: float = 0.6, max_reps: int = 60,
                     rounds: Optional[int] = None, min_reps: int = 3) -> dict[str, float]:
    """Milliseconds per call of each function, measured in interleaved rounds
    in a random order each round (so drifting clocks, a busy host or the power state a
    heavy kernel leaves behind hit all alike): the median of the rounds
    on CUDA (events), the minimum on CPU (wall clock; interference only adds).
    The number of rounds fits ``budget_s`` (``min_reps`` to ``max_reps``) unless
    ``rounds`` fixes it; one untimed call of each function comes first."""
    once = {n: once_ms(f, device) for n, f in fns.items()}
    fit = budget_s * 1e3 / max(sum(once.values()), 1e-3)
    reps = rounds or int(max(min_reps, min(max_reps, fit)))
    samples: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    rng = random.Random(0)
    for _ in range(reps):  # a fresh random order per round: no backend always
        rng.shuffle(names)  # follows the same (e.g. a power-hungry) kernel
        for n in names:
            samples[n].append(once_ms(fns[n], device))
    pick = statistics.median if device.type == "cuda" else min
    return {n: pick(s) for n, s in samples.items()}
