"""Random-call fuzzing of every backend on a device against the float64 reference.

The GPU counterpart of tests/test_fuzz.py (no Hypothesis: ``random.Random`` and
``torch.Generator``, reproducible with ``--seed``).  Each example draws a call
with CUDA-relevant sizes: B 1..4, Hkv 1..4, Hq = Hkv * group (1..4), Sq and Sk
from a pool of 1..300 (1, non-multiples of 8, powers of two and their
neighbours: a small pool keeps compiled kernels reusable), D 64/128 (and some
32/96), bf16/fp16, layout bhsd/bshd, masks (none, bool or float of a random
broadcastable shape, -inf entries, fully masked rows, key padding prefix or
scattered with an all-False batch row), causal, scale, return_lse, gradients,
a sliding window (p 0.2: left, right from {-1, 0, 1, 3, 16, 64}, not both -1;
combined with causal, masks and padding), a softcap (p 0.15: 5, 20 or 50),
attention sinks (p 0.15: float32 (Hq,), with their gradient),
and the memory behind the tensors (``attention_dispatch.testing.draw_memory``):
q, k, v stored transposed, stride 0 on any axis, step slices, storage offsets
or views of one packed projection; masks transposed or broadcast with stride 0;
key-padding masks as step slices; NaN and Inf in padded K/V slots.

Paged calls (``--paged-share P``, default 0.2: that fraction of the examples,
drawn from their own random stream, so the dense examples of a seed stay those
of ``--paged-share 0``): ``attention_paged`` over a random block-paged cache
(block sizes 16..256, lengths up to ~4k keys, Sq 1..16, GQA 1..8, garbage in
the table past the used columns, NaN in unused blocks and past each row's
length, windows, softcap, sinks, lse, memory views) on every backend that takes
it, on the route ``explain_paged`` names (native or gathered); see
bench/gpu_fuzz_paged.py.  They are counted with the dense ones (run / refused /
skipped / violations) plus ``paged native``, ``paged gathered`` and ``paged
refused`` per backend; the report's ``paged_examples`` counts them and each
paged violation says ``"kind": "paged"`` (``bench/fuzz_replay.py`` replays both).

Per example the float64 reference (on the device, for speed) and the ``math``
backend in the call's dtype run once; then every backend is checked with the
contract's accuracy rule, for the output, the lse and the gradients::

    max|backend - ref| <= 2 * max|math - ref| + atol(dtype) * (1 + max|ref|)

with lse = -inf exactly where the reference has it.  All errors of one example
are reduced on the device and read back with one synchronisation.

A backend that refuses a call (e.g. a window or softcap it cannot express) is
counted as refused (with its reasons); one that accepts it and raises, or
breaks the rule, is a violation.  The numeric canary is turned off
(ATTENTION_DISPATCH_CANARY=0): the kernels themselves are under test.  Exit
status 1 on any violation.

Compile time.  Backends that build a kernel per shape (sdpa-cudnn: a cuDNN
graph; flash-attn: FA4's CuTe-DSL JIT, seconds per new configuration; flex:
torch.compile) spend most of a run compiling, on one CPU core per process:

* ``--workers N`` runs N worker processes (this script, seeds ``seed * 1000 + i``,
  an equal share of ``--examples`` each, output in per-worker log files) on the
  same device, so N compiles run at once; the parent merges their reports (counts,
  seconds and refusal reasons summed, violations concatenated with their worker)
  and prints one table.  A worker that exits without a report is a failure (its
  stderr's tail is printed).  Workers get TORCHINDUCTOR_COMPILE_THREADS=1 and
  OMP_NUM_THREADS = cores / N unless set.
* ``--shape-pool K``: each worker draws K sizes (B, Hkv, group, Sq, Sk, D) once and
  every example takes its sizes from them (dtype, layout, masks, padding, causal,
  scale, lse, gradients, window and softcap are still drawn per example), so
  kernels compiled for a shape are reused.  The trade-off: a run covers only
  N * K shapes instead of a fresh one per example, so a bug at a size outside the
  pools is not reached by that run (other seeds draw other pools); in exchange
  the compiling backends get many more examples in the same time.  0 = off.
* FA4 keeps its compiled kernels in a file-locked disk cache, shared by the
  workers and by later runs: the script sets FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
  and FLASH_ATTENTION_CUTE_DSL_CACHE_DIR (``--fa4-cache-dir``, default
  /tmp/fa4-cute-cache) before torch is imported, keeping values already set in
  the environment (an explicit ``--fa4-cache-dir`` wins).

Time bounds (per worker): ``--every flex:20`` runs backends that compile a kernel
per shape on every 20th example only; ``--backend-budget-s 75`` stops giving
examples to a backend once it has used that long in the worker (compiles
included; the rest are counted as skipped); ``--max-seconds 470`` stops the
worker early (the report says so).

Usage::

    python bench/gpu_fuzz.py --examples 20000 --workers 8 --shape-pool 48 \\
        --max-seconds 300 --out gpu-fuzz.json
    python bench/gpu_fuzz.py --device cpu --examples 50          # smoke test
    python bench/gpu_fuzz.py --device cpu --examples 30 --paged-share 1 \
        --dtypes bf16,fp32 --backends math,sdpa-flash,chunked   # paged smoke test
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

FA4_CACHE_DIR = "/tmp/fa4-cute-cache"


def set_env(argv: list[str]) -> None:
    """Environment read when torch and the kernels load: set before importing them.
    Values already in the environment are kept; an explicit --fa4-cache-dir wins."""
    os.environ["ATTENTION_DISPATCH_CANARY"] = "0"  # test the kernels themselves
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--fa4-cache-dir", default=None)
    given = pre.parse_known_args(argv)[0].fa4_cache_dir
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    if given:
        os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] = given
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", FA4_CACHE_DIR)


set_env(sys.argv[1:] if __name__ == "__main__" else [])

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzz_workers  # noqa: E402
import gpu_fuzz_paged  # noqa: E402
from fuzz_rule import DTYPES, describe, errors, judge  # noqa: E402

import attention_dispatch as ad  # noqa: E402
from attention_dispatch.testing import (MemoryDraw, draw_memory, kpm_view, mask_view,
    poison_padded, qkv_makers, reference_attention)

Tensor = torch.Tensor
Sizes = tuple[int, int, int, int, int, int]  # batch, heads_kv, group, seq_q, seq_k, head_dim
SEQ_POOL = (1, 1, 2, 3, 5, 7, 8, 13, 16, 17, 31, 33, 63, 64, 65, 100, 127, 128, 129, 191,
            200, 255, 256, 257, 300)
HEAD_DIMS = ((64, 0.4), (128, 0.4), (32, 0.1), (96, 0.1))
WINDOW_P, WINDOW_SIDES = 0.2, (-1, 0, 1, 3, 16, 64)
SOFTCAP_P, SOFTCAPS = 0.15, (5.0, 20.0, 50.0)
SINKS_P = 0.15
BASELINE = "(inputs, reference, math)"


@dataclass(frozen=True)
class Spec:
    batch: int
    heads_kv: int
    group: int
    seq_q: int
    seq_k: int
    head_dim: int
    dtype: str
    layout: str
    mask: str  # none | bool | float
    mask_shape: tuple[int, ...]
    dead_rows: tuple[int, ...]
    padding: str  # none | prefix | scattered
    dead_batch: bool
    causal: bool
    scale: Optional[float]
    lse: bool
    grad: bool
    window: Optional[tuple[int, int]]
    softcap: Optional[float]
    seed: int
    memory: MemoryDraw = MemoryDraw()
    sinks: bool = False  # attention sinks (Hq,) float32, with a gradient when grad

    @property
    def heads_q(self) -> int:
        return self.heads_kv * self.group


def draw_sizes(rng: random.Random) -> Sizes:
    b, hkv, group = rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 4)
    sq, sk = rng.choice(SEQ_POOL), rng.choice(SEQ_POOL)
    d = rng.choices([h for h, _ in HEAD_DIMS], [w for _, w in HEAD_DIMS])[0]
    return b, hkv, group, sq, sk, d


def draw_window(rng: random.Random) -> Optional[tuple[int, int]]:
    if rng.random() >= WINDOW_P:
        return None
    while True:
        window = (rng.choice(WINDOW_SIDES), rng.choice(WINDOW_SIDES))
        if window != (-1, -1):  # (-1, -1) is no window
            return window


def draw(rng: random.Random, dtypes: list[str], grad_p: float,
         pool: Optional[list[Sizes]] = None) -> Spec:
    """One call; its sizes from ``pool`` when given, else freshly drawn."""
    b, hkv, group, sq, sk, d = rng.choice(pool) if pool else draw_sizes(rng)
    mask = rng.choices(("none", "bool", "float"), (0.5, 0.25, 0.25))[0]
    shape: tuple[int, ...] = ()
    dead: tuple[int, ...] = ()
    if mask != "none":
        full = (b, hkv * group, sq, sk)
        ndim = rng.randint(2, 4)
        shape = tuple(f if rng.random() < 0.6 else 1 for f in full[4 - ndim:])
        if rng.random() < 0.3:
            dead = tuple(sorted({rng.randrange(shape[-2]) for _ in range(rng.randint(1, 2))}))
    padding = rng.choices(("none", "prefix", "scattered"), (0.6, 0.3, 0.1))[0]
    layout, grad = rng.choice(("bhsd", "bshd")), rng.random() < grad_p
    memory = draw_memory(rng, packable=sq == sk and group == 1, padding=padding != "none",
                         key_axis=(2 if layout == "bhsd" else 1) if grad else None)
    if mask == "none":
        memory = replace(memory, mask="plain")
    return Spec(batch=b, heads_kv=hkv, group=group, seq_q=sq, seq_k=sk, head_dim=d,
                dtype=rng.choice(dtypes), layout=layout, mask=mask,
                mask_shape=shape, dead_rows=dead, padding=padding, memory=memory,
                dead_batch=rng.random() < 0.2, causal=rng.random() < 0.5,
                scale=None if rng.random() < 0.7 else round(rng.uniform(0.02, 0.3), 4),
                lse=rng.random() < 0.3, grad=grad,
                window=draw_window(rng),
                softcap=rng.choice(SOFTCAPS) if rng.random() < SOFTCAP_P else None,
                seed=rng.randrange(2**31), sinks=rng.random() < SINKS_P)


def build(s: Spec, device: torch.device) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(s.seed)
    dt = DTYPES[s.dtype]

    def rnd(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, device=device)

    def qkv(h: int, n: int) -> Tensor:
        t = rnd(s.batch, h, n, s.head_dim).to(dt)
        return t.transpose(1, 2).contiguous() if s.layout == "bshd" else t

    out: dict[str, Any] = {"q": qkv(s.heads_q, s.seq_q), "k": qkv(s.heads_kv, s.seq_k),
                           "v": qkv(s.heads_kv, s.seq_k)}
    if s.memory.packed:  # q, k, v: views of one projection (B, S, 3 * H * D)
        out.update(dict.fromkeys("qkv", rnd(s.batch, s.seq_q, 3 * s.heads_q * s.head_dim).to(dt)))
    mask = None
    if s.mask == "bool":
        mask = torch.rand(s.mask_shape, generator=g, device=device) > 0.3
        for r in s.dead_rows:
            mask[..., r, :] = False
    elif s.mask == "float":
        mask = rnd(*s.mask_shape)
        mask = mask.masked_fill(torch.rand(s.mask_shape, generator=g, device=device) < 0.2,
                                float("-inf"))
        for r in s.dead_rows:
            mask[..., r, :] = float("-inf")
        mask = mask.to(dt)
    kpm = None
    if s.padding == "prefix":
        lens = torch.randint(0, s.seq_k + 1, (s.batch,), generator=g, device=device)
        kpm = torch.arange(s.seq_k, device=device)[None, :] < lens[:, None]
    elif s.padding == "scattered":
        kpm = torch.rand(s.batch, s.seq_k, generator=g, device=device) > 0.4
    if kpm is not None and s.dead_batch:
        kpm[s.seed % s.batch] = False
    if kpm is not None and s.memory.poison:
        out["k"], out["v"] = (poison_padded(out[n], kpm, s.layout, g) for n in "kv")
    out["make"] = qkv_makers(s.memory, s.heads_q, s.layout)
    if mask is not None:
        mask = mask_view(s.memory, mask, (s.batch, s.heads_q, s.seq_q, s.seq_k))
    out["mask"] = mask
    out["key_padding_mask"] = None if kpm is None else kpm_view(s.memory, kpm)
    out["grad_out"] = rnd(s.batch, s.heads_q, s.seq_q, s.head_dim).to(dt) if s.grad else None
    out["sinks"] = rnd(s.heads_q) * 2 if s.sinks else None
    return out


def _bhsd(t: Tensor, layout: str) -> Tensor:
    return t.transpose(1, 2) if layout == "bshd" else t


def run(backend: str, s: Spec, inp: dict[str, Any]) -> list[Optional[Tensor]]:
    """[out, lse, dq, dk, dv, dsinks] in bhsd (None where not requested)."""
    leaves = [inp[n].detach().clone().requires_grad_(s.grad) for n in "qkv"]
    sinks = None if inp["sinks"] is None else inp["sinks"].detach().clone().requires_grad_(s.grad)
    q, k, v = (inp["make"][n](t) for n, t in zip("qkv", leaves))
    if s.grad:
        for t in (q, k, v):
            t.retain_grad()
    res = ad.attention(q, k, v, mask=inp["mask"], key_padding_mask=inp["key_padding_mask"],
                       causal=s.causal, scale=s.scale, layout=s.layout, backend=backend,
                       return_lse=s.lse, window=s.window, softcap=s.softcap, sinks=sinks)
    out, lse = res if s.lse else (res, None)
    want = (s.batch, s.heads_q, s.seq_q, s.head_dim)
    if s.layout == "bshd":
        want = (s.batch, s.seq_q, s.heads_q, s.head_dim)
    if tuple(out.shape) != want or out.dtype != DTYPES[s.dtype]:
        raise AssertionError(f"out {tuple(out.shape)} {out.dtype}; expected {want} {s.dtype}")
    grads: list[Optional[Tensor]] = [None, None, None, None]
    if s.grad:
        go = inp["grad_out"]
        out.backward(go.transpose(1, 2) if s.layout == "bshd" else go)
        grads = [_bhsd(t.grad, s.layout) for t in (q, k, v)]
        grads.append(None if sinks is None else sinks.grad)
    return [_bhsd(out, s.layout).detach(), lse] + grads


def reference(s: Spec, inp: dict[str, Any]) -> list[Optional[Tensor]]:
    """Float64 reference on the device: [out, lse, dq, dk, dv, dsinks]."""
    q, k, v = (_bhsd(inp["make"][n](inp[n]), s.layout).detach().double()
               .requires_grad_(s.grad) for n in "qkv")
    sinks = None if inp["sinks"] is None else inp["sinks"].double().requires_grad_(s.grad)
    out, lse = reference_attention(q, k, v, mask=inp["mask"],
                                   key_padding_mask=inp["key_padding_mask"], causal=s.causal,
                                   scale=s.scale, window=s.window, softcap=s.softcap,
                                   sinks=sinks)
    grads: list[Optional[Tensor]] = [None, None, None, None]
    if s.grad:
        out.backward(inp["grad_out"].double())
        grads = [q.grad, k.grad, v.grad, None if sinks is None else sinks.grad]
    return [out.detach(), lse.detach() if s.lse else None] + grads


def available_backends(device: torch.device, wanted: Optional[list[str]]) -> dict[str, str]:
    """name -> "" (usable) or why not, for every registered (or wanted) backend."""
    names = wanted or ad.list_backends()
    out = {}
    for n in names:
        try:
            why = ad.get_backend(n).probe(device)
        except ad.AttentionDispatchError as exc:
            why = [str(exc)]
        out[n] = "; ".join(why)
    return out


@dataclass
class Config:
    """What one fuzzing process runs."""

    device: torch.device
    dtypes: list[str]
    backends: list[str]
    every: dict[str, int]
    shape_pool: int
    grad_fraction: float
    budget_s: float
    max_listed: int
    paged_share: float = 0.0


@dataclass
class Tally:
    """What one fuzzing process counted."""

    backends: list[str]
    counts: dict[str, collections.Counter] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    reasons: dict[str, collections.Counter] = field(default_factory=dict)
    listed: list[dict[str, Any]] = field(default_factory=list)
    n_viol: int = 0
    done: int = 0
    stopped_early: bool = False

    def __post_init__(self) -> None:
        self.counts = {n: collections.Counter() for n in self.backends}
        self.reasons = {n: collections.Counter() for n in self.backends}


def run_backends(i: int, spec: Spec, inp: dict[str, Any], ref: list[Optional[Tensor]],
                 cfg: Config, tally: Tally
                 ) -> tuple[list[tuple[str, list[Tensor]]], dict[str, str]]:
    """Every backend but math on example ``i``: (name, errors) of those that ran,
    and name -> error of those that accepted the call and raised."""
    per: list[tuple[str, list[Tensor]]] = []
    crashed: dict[str, str] = {}
    for name in cfg.backends:
        if name == "math":
            continue
        if i % cfg.every.get(name, 1) or (cfg.budget_s and tally.seconds[name] > cfg.budget_s):
            tally.counts[name]["skipped"] += 1
            continue
        t0 = time.perf_counter()
        try:
            got = run(name, spec, inp)
            if cfg.device.type == "cuda":  # a kernel fault is reported at this backend
                torch.cuda.synchronize()
        except ad.BackendUnavailable as exc:
            tally.counts[name]["refused"] += 1
            for r in exc.reasons.get(name, ["?"]):
                tally.reasons[name][r[:120]] += 1
            continue
        except Exception as exc:  # accepted the call, then broke: a violation
            if "CUDA error" in describe(exc):  # the context is lost: say where, stop the worker
                print(f"CUDA FAULT in {name} at example {i}: {describe(exc)}\n  {spec}",
                      file=sys.stderr, flush=True)
                raise SystemExit(3) from exc
            tally.counts[name]["run"] += 1
            crashed[name] = describe(exc)
            continue
        finally:
            tally.seconds[name] += time.perf_counter() - t0
        tally.counts[name]["run"] += 1
        tally.counts[name]["run with memory views"] += spec.memory.label() != "contiguous"
        tally.counts[name]["run with poisoned padding"] += spec.memory.poison
        per.append((name, errors(got, ref)))
    return per, crashed


def one_example(i: int, spec: Spec, cfg: Config, tally: Tally) -> None:
    """Check every backend on one drawn call; count into ``tally``."""
    tally.counts["math"]["run"] += 1
    tally.counts["math"]["run with memory views"] += spec.memory.label() != "contiguous"
    tally.counts["math"]["run with poisoned padding"] += spec.memory.poison
    viol: Optional[dict[str, dict[str, str]]] = None
    t0 = time.perf_counter()
    try:
        inp = build(spec, cfg.device)
        ref = reference(spec, inp)
        base = run("math", spec, inp)  # once per example, reused for every backend
    except Exception as exc:  # the baseline itself broke: counted against math
        viol = {"math": {"raised": "reference or math: " + describe(exc)}}
    tally.seconds[BASELINE] += time.perf_counter() - t0
    if viol is None:
        per, crashed = run_backends(i, spec, inp, ref, cfg, tally)
        viol = judge(spec, ref, [("math", errors(base, ref))] + per, crashed)
    for name, what in viol.items():
        tally.counts[name]["violations"] += 1
        tally.n_viol += 1
        if len(tally.listed) < cfg.max_listed:
            tally.listed.append({"example": i, "backend": name, "spec": asdict(spec),
                                 "failures": what})
            print(f"VIOLATION example {i} {name}: {what}\n  {spec}", file=sys.stderr)


def fuzz(cfg: Config, seed: int, examples: int, max_seconds: float) -> Tally:
    """Draw and check ``examples`` calls (fewer if ``max_seconds`` runs out)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pool = [draw_sizes(rng) for _ in range(cfg.shape_pool)]
    prng = random.Random(f"paged {seed}")  # dense draws stay those of --paged-share 0
    ppool = [gpu_fuzz_paged.draw_sizes(prng) for _ in range(cfg.shape_pool)]
    tally = Tally(cfg.backends)
    sync = torch.cuda.synchronize if cfg.device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for i in range(examples):
        if max_seconds and time.perf_counter() - start > max_seconds:
            tally.stopped_early = True
            break
        if cfg.paged_share and prng.random() < cfg.paged_share:
            gpu_fuzz_paged.one_example(i, gpu_fuzz_paged.draw(prng, cfg.dtypes, ppool), cfg,
                                       tally)
        else:
            one_example(i, draw(rng, cfg.dtypes, cfg.grad_fraction, pool), cfg, tally)
        tally.done += 1
        if tally.done % 1000 == 0:
            sync()
            print(f"  {tally.done} examples, {time.perf_counter() - start:.0f} s, "
                  f"{tally.n_viol} violations", flush=True)
    sync()
    return tally


def process_report(a: argparse.Namespace, cfg: Config, tally: Tally, elapsed: float,
                   avail: dict[str, str]) -> dict[str, Any]:
    """The JSON report of one fuzzing process."""
    device = cfg.device
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(),
        "torch": torch.__version__, "attention_dispatch": ad.__version__,
        "versions": {n: ad.get_backend(n).describe() for n in cfg.backends},
        "seed": a.seed, "examples_requested": a.examples, "examples_run": tally.done,
        "stopped_early": tally.stopped_early, "seconds": round(elapsed, 2),
        "dtypes": cfg.dtypes, "grad_fraction": a.grad_fraction, "every": cfg.every,
        "backend_budget_s": a.backend_budget_s, "max_seconds": a.max_seconds,
        "backends": {n: dict(tally.counts[n], seconds=round(tally.seconds.get(n, 0.0), 2))
                     for n in cfg.backends},
        "baseline_seconds": round(tally.seconds[BASELINE], 2),
        "unavailable": {n: why for n, why in avail.items() if why},
        "refusal_reasons": {n: dict(tally.reasons[n].most_common(20)) for n in cfg.backends},
        "violations_total": tally.n_viol,
        "violations": tally.listed,
        "workers": 1, "shape_pool": cfg.shape_pool, "paged_share": cfg.paged_share,
        "paged_examples": tally.counts["math"]["paged native"],
    }


def print_summary(r: dict[str, Any]) -> None:
    """The table of a (process or merged) report."""
    rows = [["backend", "run", "refused", "skipped", "violations", "seconds"]]
    for n, c in r["backends"].items():
        rows.append([n] + [str(c.get(k, 0)) for k in ("run", "refused", "skipped", "violations")]
                    + [f"{c.get('seconds', 0.0):.1f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    workers = f", {r['workers']} workers" if r.get("workers", 1) > 1 else ""
    pool = f", shape pool {r['shape_pool']}" if r.get("shape_pool") else ""
    print(f"\n{r['examples_run']} examples in {r['seconds']:.1f} s (seed {r['seed']}"
          f"{workers}{pool})" + (" -- stopped early (--max-seconds)" if r["stopped_early"] else ""))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f"inputs, reference and math baseline: {r['baseline_seconds']:.1f} s")
    if r.get("paged_examples"):
        print(f"paged examples: {r['paged_examples']} (share {r['paged_share']})")
        print("\n".join(gpu_fuzz_paged.summary_lines(r)))
    for n, reasons in r["refusal_reasons"].items():
        for why, c in collections.Counter(reasons).most_common(3):
            print(f"  {n} refused {c}x: {why}")


def write_report(report: dict[str, Any], path: Optional[str]) -> None:
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, default=str)
    os.replace(tmp, path)  # a reader never sees half a report
    print(f"report: {path}")


def run_single(a: argparse.Namespace) -> int:
    """Fuzz in this process."""
    device = torch.device(a.device)
    avail = available_backends(device, a.backends.split(",") if a.backends else None)
    backends = [n for n, why in avail.items() if not why]
    if "math" not in backends:
        backends.append("math")
    print(f"device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", torch {torch.__version__}; backends: {', '.join(backends)}", flush=True)
    for n, why in avail.items():
        if why:
            print(f"  not available: {n}: {why}")
    cfg = Config(device=device, dtypes=a.dtype_list, backends=backends, every=a.every_map,
                 shape_pool=a.shape_pool, grad_fraction=a.grad_fraction,
                 budget_s=a.backend_budget_s, max_listed=a.max_violations_listed,
                 paged_share=a.paged_share)
    start = time.perf_counter()
    tally = fuzz(cfg, a.seed, a.examples, a.max_seconds)
    report = process_report(a, cfg, tally, time.perf_counter() - start, avail)
    print_summary(report)
    write_report(report, a.out)
    return 1 if tally.n_viol else 0


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write a JSON report here")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", default="bf16,fp16", help="comma separated: bf16,fp16,fp32,fp64")
    p.add_argument("--backends", default=None,
                   help="comma separated (default: every backend available on the device)")
    p.add_argument("--grad-fraction", type=float, default=0.3)
    p.add_argument("--max-seconds", type=float, default=470.0,
                   help="a worker stops early after this long, the report says so (0: no limit)")
    p.add_argument("--backend-budget-s", type=float, default=75.0,
                   help="a backend that has spent this long in a worker (kernel compiles "
                        "included) skips its remaining examples, counted as skipped (0: no limit)")
    p.add_argument("--every", default="flex:20",
                   help="NAME:N,... run NAME on every N-th example only (backends that "
                        "compile a kernel per shape)")
    p.add_argument("--max-violations-listed", type=int, default=200)
    p.add_argument("--paged-share", type=float, default=0.2,
                   help="fraction of the examples that are attention_paged calls "
                        "(bench/gpu_fuzz_paged.py; 0: dense only)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing the device (parallel kernel compiles); "
                        "their reports are merged")
    p.add_argument("--shape-pool", type=int, default=0,
                   help="each worker draws this many sizes once and reuses them, so compiled "
                        "kernels are reused (0: fresh sizes per example)")
    p.add_argument("--fa4-cache-dir", default=None,
                   help="FA4's compiled-kernel disk cache (default: "
                        f"$FLASH_ATTENTION_CUTE_DSL_CACHE_DIR or {FA4_CACHE_DIR})")
    a = p.parse_args(argv)
    a.dtype_list = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    bad = [d for d in a.dtype_list if d not in DTYPES]
    if bad:
        p.error(f"--dtypes: unknown {bad}; allowed {sorted(DTYPES)}")
    if a.workers < 1 or a.shape_pool < 0:
        p.error("--workers must be >= 1 and --shape-pool >= 0")
    if not 0.0 <= a.paged_share <= 1.0:
        p.error("--paged-share must be in [0, 1]")
    a.every_map = {}
    for item in filter(None, (x.strip() for x in a.every.split(","))):
        name, _, n = item.partition(":")
        a.every_map[name] = max(1, int(n or 1))
    return a


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    set_env(sys.argv[1:] if argv is None else argv)  # again, for a call from Python
    if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_fuzz: CUDA is not available here; use --device cpu", file=sys.stderr)
        return 2
    if a.workers == 1:
        return run_single(a)
    a.script = os.path.abspath(__file__)
    return fuzz_workers.run_workers(a, print_summary, write_report)


if __name__ == "__main__":
    sys.exit(main())
