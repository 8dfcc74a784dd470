"""Run benchmark cases: correctness, timing, memory, first-call latency."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Callable, Optional

import torch

from .._core import BackendUnavailable, CallSpec, Decision, attention, explain
from .. import testing
from .._core.timing import sync as _sync, time_interleaved  # noqa: F401  (bench.run.time_interleaved)
from .cases import BenchCase
from .progress import Progress

Row = dict[str, Any]


def correctness(spec: CallSpec, backend: str, device: torch.device) -> tuple[bool, str]:
    """The contract's accuracy rule on a reduced copy of the call (same dtype,
    head dim, GQA ratio, mask kind, causal and mode; at most 2 x 4 heads x 256)."""
    small = testing.reduced_case(spec, max_seq=256, grad=spec.requires_grad)
    try:
        res = testing.check_backend(backend, small, device)
    except AssertionError as exc:
        return False, str(exc).splitlines()[-1].strip()
    worst = max(res.errors, key=lambda n: res.errors[n] / max(res.bounds[n], 1e-30))
    return True, f"{worst} err {res.errors[worst]:.2g} <= {res.bounds[worst]:.2g}"


def _call(case: BenchCase, kw: dict[str, Any], backend: str) -> Callable[[], Any]:
    if case.mode == "fwd":
        return lambda: attention(**kw, backend=backend)
    grad = torch.randn_like(kw["q"][..., :1]).expand_as(kw["q"]).contiguous()

    def step() -> None:
        for t in ("q", "k", "v"):
            kw[t].grad = None
        attention(**kw, backend=backend).backward(grad)

    return step


TORCH_DEFAULT = "torch-default"


def torch_default_call(case: BenchCase, kw: dict[str, Any]) -> Optional[Callable[[], Any]]:
    """The call a user makes without this package: torch's
    ``F.scaled_dot_product_attention`` with the equivalent arguments (the
    padding or bool mask as a (B, 1, Sq, Sk) bool mask, ``enable_gqa`` for
    GQA, bottom-right causal as an explicit bool mask where Sq != Sk; Sq = 1
    causal admits every key).  None where torch has no equivalent."""
    from ..sdpa import TORCH_SDPA  # torch's own function, also under patch_sdpa()

    q, k, v = kw["q"], kw["k"], kw["v"]
    sq, sk = case.seq_q, case.seq_k
    mask = kw.get("mask")
    if kw.get("key_padding_mask") is not None:
        mask = kw["key_padding_mask"][:, None, None, :]
    is_causal = case.causal and sq == sk and mask is None
    if case.causal and sq > 1 and not is_causal:
        i = torch.arange(sq, device=q.device)[:, None]
        below = torch.arange(sk, device=q.device)[None, :] <= i + (sk - sq)
        mask = below if mask is None else mask & below
    extra = {"enable_gqa": True} if case.heads_q != case.heads_kv else {}

    def fwd() -> Any:
        return TORCH_SDPA(q, k, v, attn_mask=mask, is_causal=is_causal, **extra)

    if case.mode == "fwd":
        return fwd
    grad = torch.randn_like(q[..., :1]).expand_as(q).contiguous()

    def step() -> None:
        for t in (q, k, v):
            t.grad = None
        fwd().backward(grad)

    return step


def first_call(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """First-call milliseconds (JIT and caches included) and peak memory (CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = (time.perf_counter() - t0) * 1e3
    peak = None
    if device.type == "cuda":
        fn()
        peak = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
    return {"first_call_ms": round(first, 3), "peak_mb": peak}


def accepted(kw: dict[str, Any], backends: list[str]) -> tuple[list[str], Decision]:
    """Backends of ``backends`` that accept the call ``kw``, and auto's decision."""
    d = explain(**kw)
    ok = {v.name for v in d.verdicts if not v.reasons}
    return [b for b in backends if b in ok], d


def timing_budget(device: torch.device) -> dict[str, Any]:
    """Seconds and rounds per case: CUDA 1.0 s; CPU 1.0 s and at least 10
    rounds (the minimum of few rounds of a slow backend is noisy on a shared host)."""
    if device.type == "cuda":
        return {"budget_s": 1.0}
    return {"budget_s": 1.0, "min_reps": 10}


def run_case(case: BenchCase, backends: list[str], device: torch.device, check: bool,
             meta: dict[str, Any]) -> list[Row]:
    """Every accepting backend and auto on one case; auto_over_best on every row."""
    kw = case.inputs(device, requires_grad=case.mode == "fwd+bwd")
    names, decision = accepted(kw, backends)
    chosen = decision.backend or ""
    rows: dict[str, Row] = {}
    fns = {}
    for name in names + ["auto"]:
        row: Row = {**asdict(case), "case": case.label(), "backend": name, **meta,
                    "chosen": chosen if name == "auto" else name, "ms": None, "tflops": None}
        rows[name] = row
        try:
            fn = _call(case, kw, name)
            row.update(first_call(fn, device))
            if name == "auto":  # autotune (when on) decided during the first call
                row["chosen"] = explain(**kw).backend or chosen
            ok, detail = (correctness(decision.spec, row["chosen"], device) if check
                          else (True, "not checked"))
            row.update(correct=ok, check=detail)
            fns[name] = fn
        except (BackendUnavailable, RuntimeError) as exc:
            row.update(correct=False, check=f"{type(exc).__name__}: {exc}"[:200])
    _add_torch_default(case, kw, device, meta, rows, fns)
    for name, ms in time_interleaved(fns, device, **timing_budget(device)).items():
        # 4 significant digits: a slow CPU call keeps a TFLOP/s above 0
        rows[name].update(ms=round(ms, 4), tflops=float(f"{case.flops / (ms * 1e-3) / 1e12:.4g}"))
    ratios = _ratios(rows)
    for r in rows.values():
        r.update(ratios)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())


def _ratios(rows: dict[str, Row]) -> dict[str, Optional[float]]:
    """A case's figures for every row.  "Best" is the fastest correct backend
    row in steady state (first call, and with it any compilation, excluded; it
    is in ``first_call_ms``).  ``auto_over_best``: best / auto's time;
    ``choice_over_best``: best / the time of the backend auto chose, timed in
    its own row (auto's choice, without the noise of a second timing of one
    kernel); ``auto_over_torch``: torch's default call / auto's time."""
    timed = [r["ms"] for n, r in rows.items()
             if n not in ("auto", TORCH_DEFAULT) and r["ms"] and r["correct"]]
    best = min(timed) if timed else None
    auto = rows["auto"]["ms"]
    pick = rows.get(rows["auto"]["chosen"]) if rows["auto"]["chosen"] != "auto" else None
    pick_ms = pick["ms"] if pick is not None and pick["correct"] else None
    torch_ms = rows[TORCH_DEFAULT]["ms"] if TORCH_DEFAULT in rows else None

    def over(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return round(a / b, 4) if a and b else None

    return {"auto_over_best": over(best, auto), "choice_over_best": over(best, pick_ms),
            "auto_over_torch": over(torch_ms, auto)}


def _add_torch_default(case: BenchCase, kw: dict[str, Any], device: torch.device,
                       meta: dict[str, Any], rows: dict[str, Row],
                       fns: dict[str, Callable[[], Any]]) -> None:
    """A "torch-default" row (timed beside the others, never part of "best"; its
    correctness is torch's and not checked here) where torch has an equivalent."""
    fn = torch_default_call(case, kw)
    if fn is None:
        return
    row: Row = {**asdict(case), "case": case.label(), "backend": TORCH_DEFAULT, **meta,
                "chosen": "torch", "ms": None, "tflops": None, "correct": None,
                "check": "torch's F.scaled_dot_product_attention (not checked)"}
    rows[TORCH_DEFAULT] = row
    try:
        row.update(first_call(fn, device))
        fns[TORCH_DEFAULT] = fn
    except RuntimeError as exc:  # e.g. a kernel torch refuses for this dtype
        row.update(check=f"{type(exc).__name__}: {exc}"[:200])


def run(cases: list[BenchCase], backends: list[str], device: torch.device, check: bool = True,
        meta: Optional[dict[str, Any]] = None, show_progress: bool = True,
        on_case: Optional[Callable[[list[Row]], None]] = None,
        deadline: Optional[float] = None) -> list[Row]:
    """The rows of every case, in order; ``on_case`` gets each case's rows as soon
    as it is done.  No case starts once ``time.monotonic()`` has reached
    ``deadline`` (the first case always runs, so every session makes progress).
    ``show_progress``: progress on stderr (a live bar on a terminal, a plain
    line every few seconds in a log; see :mod:`.progress`)."""
    rows: list[Row] = []
    bar = Progress(len(cases)) if show_progress and cases else None
    note = "done"
    try:
        for i, case in enumerate(cases):
            if i and deadline is not None and time.monotonic() >= deadline:
                note = "stopped: time limit"
                return rows
            if bar is not None:
                bar.start(case.label())
            new = run_case(case, backends, device, check, meta or {})
            rows += new
            if bar is not None:
                bar.done()
            if on_case is not None:
                on_case(new)
    except BaseException as exc:
        note = "interrupted" if isinstance(exc, KeyboardInterrupt) else \
            f"stopped: {type(exc).__name__}"
        raise
    finally:
        if bar is not None:
            bar.close(note)
    return rows
