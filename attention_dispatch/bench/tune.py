"""``attention-dispatch tune``: time the backends of each case, store the
fastest, and say so as it goes."""

from __future__ import annotations

import sys
import time
from typing import Optional

import torch

from .._core import TuneResult, tune_call
from .._core import autotuning as _autotune
from .cases import BenchCase


class _Printer(_autotune.Listener):
    """Prints each backend as it is timed (a partial line first, so a slow
    compile shows what it is waiting for)."""

    def __init__(self) -> None:
        self.t0 = 0.0

    def timing(self, name: str) -> None:
        self.t0 = time.monotonic()
        print(f"  {name:<20}", end="", flush=True)

    def timed(self, name: str, ms: Optional[float]) -> None:
        took = time.monotonic() - self.t0
        what = f"{ms:.4g} ms per call" if ms is not None else "failed or incorrect: not a choice"
        print(f"{what}  (checked and timed in {took:.1f} s)", flush=True)


def _verdict(res: TuneResult) -> str:
    if not res.times:
        return f"  only {res.chosen} accepts this call: nothing to tune, nothing stored"
    if res.chosen == res.ranked:
        return f"  stored: {res.chosen} (the ranking's choice too)"
    best, ranked = res.times.get(res.chosen), res.times.get(res.ranked)
    gain = f", {ranked / best:.2f}x as fast as" if best and ranked else " over"
    return f"  stored: {res.chosen}{gain} {res.ranked} (the ranking's choice)"


def tune_cases(cases: list[BenchCase], device: torch.device) -> int:
    """Tune every case on ``device``; prints the times, the stored choices and
    where they are stored.  Returns the exit status (0)."""
    print(f"tuning {len(cases)} case(s) on {device}: each backend that accepts a case is "
          "checked against\nthe reference, then timed (one that compiles, such as flex, "
          "takes seconds the first time)", flush=True)
    paths = set()
    for i, case in enumerate(cases, start=1):
        print(f"[{i}/{len(cases)}] {case.label()}", flush=True)
        kw = case.inputs(device, requires_grad=case.mode == "fwd+bwd")
        res = tune_call(listener=_Printer(), **kw)
        print(_verdict(res), flush=True)
        if res.path is not None:
            paths.add(res.path)
    for p in sorted(paths):
        print(f"stored in {p}")
    if paths:
        print("attention() and explain use these choices by default, in every process;\n"
              "ATTENTION_DISPATCH_AUTOTUNE=0 ignores them, attention-dispatch cache clear "
              "deletes them")
    if _autotune.mode() == _autotune.OFF:
        print("note: autotune is off here (ATTENTION_DISPATCH_AUTOTUNE=0): the stored "
              "choices apply once it is unset", file=sys.stderr)
    return 0
