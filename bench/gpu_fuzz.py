"""Random-call fuzzing of every backend on a device against the float64 reference.

The GPU counterpart of tests/test_fuzz.py (no Hypothesis: ``random.Random`` and
``torch.Generator``, reproducible with ``--seed``).  Each example draws a call
with CUDA-relevant sizes: B 1..4, Hkv 1..4, Hq = Hkv * group (1..4), Sq and Sk
from a pool of 1..300 (1, non-multiples of 8, powers of two and their
neighbours: a small pool keeps compiled kernels reusable), D 64/128 (and some
32/96), bf16/fp16, layout bhsd/bshd, masks (none, bool or float of a random
broadcastable shape, -inf entries, fully masked rows, key padding prefix or
scattered with an all-False batch row), causal, scale, return_lse, gradients.

Per example the float64 reference (on the device, for speed) and the ``math``
backend in the call's dtype run once; then every backend is checked with the
contract's accuracy rule, for the output, the lse and the gradients::

    max|backend - ref| <= 2 * max|math - ref| + atol(dtype) * (1 + max|ref|)

with lse = -inf exactly where the reference has it.  All errors of one example
are reduced on the device and read back with one synchronisation.

A backend that refuses a call is counted as refused (with its reasons); one
that accepts it and raises, or breaks the rule, is a violation.  The numeric
canary is turned off (ATTENTION_DISPATCH_CANARY=0): the kernels themselves are
under test.  Exit status 1 on any violation.

Time bounds (defaults keep a 20000-example run under 8 minutes whatever the
kernels' compile times): ``--every flex:20`` runs backends that compile a kernel
per shape on every 20th example only; ``--backend-budget-s 75`` stops giving
examples to a backend once it has used that long (compiles included; the rest
are counted as skipped); ``--max-seconds 470`` stops the whole run early (the
report says so).

Usage::

    python bench/gpu_fuzz.py --examples 20000 --seed 0 --out gpu-fuzz.json
    python bench/gpu_fuzz.py --device cpu --examples 50          # smoke test
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

os.environ["ATTENTION_DISPATCH_CANARY"] = "0"  # before the first call: test the kernels

import torch  # noqa: E402

import attention_dispatch as ad  # noqa: E402
from attention_dispatch.testing import atol, reference_attention  # noqa: E402

Tensor = torch.Tensor
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "fp64": torch.float64}
SEQ_POOL = (1, 1, 2, 3, 5, 7, 8, 13, 16, 17, 31, 33, 63, 64, 65, 100, 127, 128, 129, 191,
            200, 255, 256, 257, 300)
HEAD_DIMS = ((64, 0.4), (128, 0.4), (32, 0.1), (96, 0.1))
NAMES = ("out", "lse", "dq", "dk", "dv")


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
    seed: int

    @property
    def heads_q(self) -> int:
        return self.heads_kv * self.group


def draw(rng: random.Random, dtypes: list[str], grad_p: float) -> Spec:
    b, hkv, group = rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 4)
    sq, sk = rng.choice(SEQ_POOL), rng.choice(SEQ_POOL)
    d = rng.choices([h for h, _ in HEAD_DIMS], [w for _, w in HEAD_DIMS])[0]
    mask = rng.choices(("none", "bool", "float"), (0.5, 0.25, 0.25))[0]
    shape: tuple[int, ...] = ()
    dead: tuple[int, ...] = ()
    if mask != "none":
        full = (b, hkv * group, sq, sk)
        ndim = rng.randint(2, 4)
        shape = tuple(f if rng.random() < 0.6 else 1 for f in full[4 - ndim:])
        if rng.random() < 0.3:
            dead = tuple(sorted({rng.randrange(shape[-2]) for _ in range(rng.randint(1, 2))}))
    return Spec(batch=b, heads_kv=hkv, group=group, seq_q=sq, seq_k=sk, head_dim=d,
                dtype=rng.choice(dtypes), layout=rng.choice(("bhsd", "bshd")), mask=mask,
                mask_shape=shape, dead_rows=dead,
                padding=rng.choices(("none", "prefix", "scattered"), (0.6, 0.3, 0.1))[0],
                dead_batch=rng.random() < 0.2, causal=rng.random() < 0.5,
                scale=None if rng.random() < 0.7 else round(rng.uniform(0.02, 0.3), 4),
                lse=rng.random() < 0.3, grad=rng.random() < grad_p,
                seed=rng.randrange(2**31))


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
    out["mask"], out["key_padding_mask"] = mask, kpm
    out["grad_out"] = rnd(s.batch, s.heads_q, s.seq_q, s.head_dim).to(dt) if s.grad else None
    return out


def _bhsd(t: Tensor, layout: str) -> Tensor:
    return t.transpose(1, 2) if layout == "bshd" else t


def run(backend: str, s: Spec, inp: dict[str, Any]) -> list[Optional[Tensor]]:
    """[out, lse, dq, dk, dv] in bhsd (None where not requested)."""
    q, k, v = (inp[n].detach().requires_grad_(s.grad) for n in "qkv")
    res = ad.attention(q, k, v, mask=inp["mask"], key_padding_mask=inp["key_padding_mask"],
                       causal=s.causal, scale=s.scale, layout=s.layout, backend=backend,
                       return_lse=s.lse)
    out, lse = res if s.lse else (res, None)
    want = (s.batch, s.heads_q, s.seq_q, s.head_dim)
    if s.layout == "bshd":
        want = (s.batch, s.seq_q, s.heads_q, s.head_dim)
    if tuple(out.shape) != want or out.dtype != DTYPES[s.dtype]:
        raise AssertionError(f"out {tuple(out.shape)} {out.dtype}; expected {want} {s.dtype}")
    grads: list[Optional[Tensor]] = [None, None, None]
    if s.grad:
        go = inp["grad_out"]
        out.backward(go.transpose(1, 2) if s.layout == "bshd" else go)
        grads = [_bhsd(t.grad, s.layout) for t in (q, k, v)]
    return [_bhsd(out, s.layout).detach(), lse] + grads


def reference(s: Spec, inp: dict[str, Any]) -> list[Optional[Tensor]]:
    """Float64 reference on the device: [out, lse, dq, dk, dv]."""
    q, k, v = (_bhsd(inp[n], s.layout).double().requires_grad_(s.grad) for n in "qkv")
    out, lse = reference_attention(q, k, v, mask=inp["mask"],
                                   key_padding_mask=inp["key_padding_mask"], causal=s.causal,
                                   scale=s.scale)
    grads: list[Optional[Tensor]] = [None, None, None]
    if s.grad:
        out.backward(inp["grad_out"].double())
        grads = [q.grad, k.grad, v.grad]
    return [out.detach(), lse.detach() if s.lse else None] + grads


def errors(got: list[Optional[Tensor]], ref: list[Optional[Tensor]]) -> list[Tensor]:
    """One 0-d float64 device tensor per requested output: max|got - ref|
    (inf for a non-finite value, a wrong shape or lse -inf rows that differ).
    No host synchronisation: the caller reads every error of an example at once."""
    out = []
    for name, a, r in zip(NAMES, got, ref):
        if r is None:
            continue
        if a is None or a.shape != r.shape:
            out.append(r.new_tensor(math.inf))
            continue
        if r.numel() == 0:
            out.append(r.new_zeros(()))
            continue
        a = a.double()
        differ = None
        if name == "lse":
            dead = torch.isneginf(r)
            differ = (torch.isneginf(a) != dead).any()
            a, r = a.masked_fill(dead, 0.0), r.masked_fill(dead, 0.0)
        d = torch.nan_to_num((a - r).abs(), nan=math.inf).amax()
        if differ is not None:
            d = torch.where(differ, r.new_tensor(math.inf), d)
        out.append(d)
    return out


def magnitudes(ref: list[Optional[Tensor]]) -> list[Tensor]:
    out = []
    for name, r in zip(NAMES, ref):
        if r is None:
            continue
        if name == "lse":
            r = r.masked_fill(torch.isneginf(r), 0.0)
        out.append(r.abs().max() if r.numel() else r.new_zeros(()))
    return out


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


def main(argv: Optional[list[str]] = None) -> int:
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
                   help="stop early after this long, the report says so (0: no limit)")
    p.add_argument("--backend-budget-s", type=float, default=75.0,
                   help="a backend that has spent this long (kernel compiles included) "
                        "skips the remaining examples, counted as skipped (0: no limit)")
    p.add_argument("--every", default="flex:20",
                   help="NAME:N,... run NAME on every N-th example only (backends that "
                        "compile a kernel per shape)")
    p.add_argument("--max-violations-listed", type=int, default=200)
    a = p.parse_args(argv)

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_fuzz: CUDA is not available here; use --device cpu", file=sys.stderr)
        return 2
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        p.error(f"--dtypes: unknown {bad}; allowed {sorted(DTYPES)}")
    avail = available_backends(device, a.backends.split(",") if a.backends else None)
    backends = [n for n, why in avail.items() if not why]
    if "math" not in backends:
        backends.append("math")
    print(f"device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", torch {torch.__version__}; backends: {', '.join(backends)}")
    for n, why in avail.items():
        if why:
            print(f"  not available: {n}: {why}")

    every = {}
    for item in filter(None, (x.strip() for x in a.every.split(","))):
        name, _, n = item.partition(":")
        every[name] = max(1, int(n or 1))

    rng = random.Random(a.seed)
    torch.manual_seed(a.seed)
    counts: dict[str, collections.Counter] = {n: collections.Counter() for n in backends}
    seconds: dict[str, float] = collections.defaultdict(float)
    reasons: dict[str, collections.Counter] = {n: collections.Counter() for n in backends}
    listed: list[dict[str, Any]] = []
    n_viol = 0
    start = time.perf_counter()
    done = 0
    stopped_early = False
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(a.examples):
        if a.max_seconds and time.perf_counter() - start > a.max_seconds:
            stopped_early = True
            break
        spec = draw(rng, dtypes, a.grad_fraction)
        t0 = time.perf_counter()
        inp = build(spec, device)
        ref = reference(spec, inp)
        base = run("math", spec, inp)  # once per example, reused for every backend
        seconds["(inputs, reference, math)"] += time.perf_counter() - t0
        per: list[tuple[str, list[Tensor]]] = [("math", errors(base, ref))]
        crashed: dict[str, str] = {}
        for name in backends:
            if name == "math":
                counts[name]["run"] += 1
                continue
            if i % every.get(name, 1) or (a.backend_budget_s
                                          and seconds[name] > a.backend_budget_s):
                counts[name]["skipped"] += 1
                continue
            t0 = time.perf_counter()
            try:
                got = run(name, spec, inp)
            except ad.BackendUnavailable as exc:
                counts[name]["refused"] += 1
                for r in exc.reasons.get(name, ["?"]):
                    reasons[name][r[:120]] += 1
                continue
            except Exception as exc:  # accepted the call, then broke: a violation
                counts[name]["run"] += 1
                crashed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                continue
            finally:
                seconds[name] += time.perf_counter() - t0
            counts[name]["run"] += 1
            per.append((name, errors(got, ref)))
        # one device->host transfer per example
        flat = [e for _, es in per for e in es] + magnitudes(ref)
        values = torch.stack([e.double().reshape(()) for e in flat]).tolist() if flat else []
        k = len(per[0][1])
        tops = values[len(values) - k:]
        math_err = values[:k]
        outs = [n for n in NAMES if ref[NAMES.index(n)] is not None]
        viol: dict[str, dict[str, str]] = {n: {"raised": why} for n, why in crashed.items()}
        for j, (name, _) in enumerate(per):
            if name == "math":
                continue
            errs = values[j * k:(j + 1) * k]
            for o, e, em, top in zip(outs, errs, math_err, tops):
                bound = 2 * em + atol(DTYPES[spec.dtype] if o != "lse" else
                                      torch.float32 if spec.dtype == "fp64"
                                      else DTYPES[spec.dtype]) * (1 + top)
                if not e <= bound:
                    viol.setdefault(name, {})[o] = f"error {e:.4g} > bound {bound:.4g} (math {em:.4g})"
        for name, what in viol.items():
            counts[name]["violations"] += 1
            n_viol += 1
            if len(listed) < a.max_violations_listed:
                listed.append({"example": i, "backend": name, "spec": asdict(spec),
                               "failures": what})
                print(f"VIOLATION example {i} {name}: {what}\n  {spec}", file=sys.stderr)
        done += 1
        if done % 1000 == 0:
            sync()
            print(f"  {done} examples, {time.perf_counter() - start:.0f} s, "
                  f"{n_viol} violations", flush=True)
    sync()
    elapsed = time.perf_counter() - start

    rows = [["backend", "run", "refused", "skipped", "violations", "seconds"]]
    for n in backends:
        c = counts[n]
        rows.append([n, str(c["run"]), str(c["refused"]), str(c["skipped"]),
                     str(c["violations"]), f"{seconds.get(n, 0.0):.1f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\n{done} examples in {elapsed:.1f} s (seed {a.seed})"
          + (" -- stopped early (--max-seconds)" if stopped_early else ""))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"inputs, reference and math baseline: {seconds['(inputs, reference, math)']:.1f} s")
    for n in backends:
        for why, c in reasons[n].most_common(3):
            print(f"  {n} refused {c}x: {why}")
    if a.out:
        report = {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            platform.processor() or platform.machine(),
            "torch": torch.__version__, "attention_dispatch": ad.__version__,
            "versions": {n: ad.get_backend(n).describe() for n in backends},
            "seed": a.seed, "examples_requested": a.examples, "examples_run": done,
            "stopped_early": stopped_early, "seconds": round(elapsed, 2),
            "dtypes": dtypes, "grad_fraction": a.grad_fraction, "every": every,
            "backend_budget_s": a.backend_budget_s, "max_seconds": a.max_seconds,
            "backends": {n: dict(counts[n], seconds=round(seconds.get(n, 0.0), 2))
                         for n in backends},
            "baseline_seconds": round(seconds["(inputs, reference, math)"], 2),
            "unavailable": {n: why for n, why in avail.items() if why},
            "refusal_reasons": {n: dict(reasons[n].most_common(20)) for n in backends},
            "violations_total": n_viol,
            "violations": listed,
        }
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"report: {a.out}")
    return 1 if n_viol else 0


if __name__ == "__main__":
    sys.exit(main())
