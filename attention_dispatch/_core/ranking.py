"""The auto ranking per device family and shape class, kept as data.

Three sources, most specific first: a ranking a user registers
(:func:`register_ranking`), the tables below, and the placement a backend
declares (``Backend.ranking``: {"family" or "family/shape class" or "*":
"first" | "last" | "before:NAME" | "after:NAME"}); a backend that is in no
table and declares nothing ranks just before ``math``.

Device families: "sm90", "sm100", "sm80", "cuda" (other NVIDIA), "rocm"
(a CUDA device of a ROCm build, ``torch.version.hip``), "mps", "xpu", "cpu",
"other".  The rocm, mps and xpu tables are NOT measured here: they follow
those platforms' documentation (PyTorch's SDPA on ROCm runs its flash and
memory-efficient kernels through AOTriton on MI200/MI300, cuDNN is absent;
on MPS and XPU torch's own ``scaled_dot_product_attention`` is the fused
kernel there, the ``sdpa`` backend; flex needs Triton, so not on MPS).

Source of the CUDA rankings: measurements on an H100 SXM (sm90), torch
2.11+cu130, 2026-11-24, bf16, head dim 128, n=16384 (fwd TFLOP/s non-causal /
causal): flash-attn (FA4) 716/648, sdpa-cudnn 588/589, xformers 363/328,
sdpa-flash 328/296, flex 410/386 (reported for that H100, not re-measured;
compiled per signature), sdpa-mem-efficient 176/163; decode (Sq=1, GQA 32/8,
Sk=8192): sdpa-cudnn 351 us, FA4 358 us, sdpa-flash 398 us, xformers 403 us.
flex ranks behind xformers and sdpa-flash although its forward beats them
on paper, because it compiles a kernel per new shape (seconds); it
runs what the kernels ahead of it refuse (windows, softcap, ALiBi), ahead of
sdpa-mem-efficient and math.  sm80/sm100/other CUDA follow the same order
with cuDNN demoted where it is not the fastest (sm80: FA2 first).
CPU: torch's CPU flash kernel is 4-7x faster than math (bench/overhead.py
and the conformance timings); flex (inference only there, compiled per
signature) comes next: it takes the softcapped and different-Dv calls the
CPU flash kernel refuses, ~10x faster than math at 1k tokens once compiled.
No CPU shape class: on a 2-core AMD EPYC, torch 2.13.0+cpu, 2026-12-03
(the cases of ``bench --quick``: fp32, d64, 256 and 1024 tokens, causal or
not, key padding or not; flex warm, interleaved rounds, best of 3, load
average about 1), sdpa-flash was the fastest backend in all 8 cases; flex
took 1.16-1.85x its time.  An earlier run (2026-11-26, load average about
4) had flex 10-15 % ahead in causal cases: under load the order changes
from run to run, and autotune measures the host it runs on.

Backends that compile per shape (``Backend.compiles_per_shape``, e.g. flex):
a shape-class table (built in or registered) promotes one only for calls it
has compiled in this process (``Backend.compiled(spec)``); for the others it
keeps its place in the family's own table (:func:`_held_back`), so auto
never pays a compile the ranking guessed would pay off.  Autotune, which
measures the compile's result, is not bound by this.

Shape classes (``SHAPE_RANKINGS``), measured on the same H100 on 2026-11-26 with
bench/gpu_bench.py (bf16, hdim 128, interleaved CUDA-event timing):
* "short" (Sq > 1, max(Sq, Sk) <= 2048, or <= 4096 without gradients; no key
  padding): cuDNN beats FA4 - B=16 S=1024 fwd 0.36 vs 0.48 ms, causal 0.26 vs
  0.36 ms, fwd+bwd 1.36 vs 1.44 ms; B=4 S=4096 fwd 1.05 vs 1.10 ms, causal
  0.66 vs 0.75 ms (fwd+bwd at 4096: FA4 3.32 vs 3.54 ms, so long).
  Refined from the full bench grid (``attention-dispatch bench --shapes default``,
  H100, 2026-11-26, bf16 and fp16): forward at S=8192 with head dim 128 cuDNN
  beats FA4 by 1-6 % (B=2, H=16: 1.02 vs 1.08 ms causal), so "short" reaches
  8192 there (causal GQA forwards too: the H100 grid sent 32/8 at S=4096 to FA4,
  1.09 vs 1.25 ms, while cuDNN read expanded K/V; with GQA passed natively the
  H200 grid of 2026-12-03, docs/results/bench-grid-h200-2026-12-03.json, has
  cuDNN ahead, B=4 causal 0.988 vs 1.034 ms, and FA4 ahead from 16384);
  forward+backward with head dim 64 at S=2048 goes to FA4 (2.21 vs 2.34 ms, B=8, H=32).
* "decode" (Sq == 1; B=32, Hq=32, Hkv=8, Sk=8192): sdpa-cudnn 484 us,
  sdpa-flash 496 us, sdpa-mem-efficient 526 us, FA4 598 us, xformers 771 us.
* "paged" (attention_paged calls): ``triton-decode`` first (declared by the
  backend for every CUDA family, in the sm90 table here), then the decode order.
  "paged-wide": paged calls with B * Hkv * ceil(Sq * Hq / Hkv / 128) >= 128,
  enough (row, kv head) tiles for FA4's paged kernel, which takes no key split
  on sm90, to fill the device: FA4 first there.  Measured with
  bench/decode_profile.py (H200, 2026-12-03, B=32, Hkv=8, Sk=8192, block size
  128): FA4's paged kernel 239 us of device time, as cuDNN's dense one (237 us),
  triton-decode's 398 us; FA4's host cost per paged call was 530 us until its
  signature stopped being inspected per call.
  Calls with gradients whose forward needs under 2**37 FLOPs (halved for
  causal; e.g. B=1, H=16, causal S=4096, D=128) are "short" too: there the
  host's cost per call decides, and FA4's (0.2-0.3 ms per forward call,
  bench/decode_profile.py, H200) is above cuDNN's.  Measured with
  bench/hf_llama_bench.py (H200, 2026-12-03, docs/results/hf-llama-h200-
  2026-12-03-run4.json, -run5.json): a Llama-style model's fwd+bwd at S=4096,
  B=1, on FA4 took 0.95x / 0.85x the time of transformers' sdpa (cuDNN) while its
  attention kernels took 3.9 vs 4.6 ms of device time; at 8192 and 16384 FA4
  was 1.03x / 1.04x faster (device-bound).
* "tiny" (CUDA; 4 * B * Hq * Sq * Sk * D <= 2**26 FLOPs, not paged: microseconds of
  compute, so the host's cost per call decides): torch's flash operator
  first.  bench/overhead.py on an H200 (torch 2.11, B=1, H=2, S=8, D=16, bf16,
  2026-12-03, docs/results/overhead-cuda-h200-2026-12-03-run2.json): one
  call through each adapter, sdpa-flash 19.5 us, sdpa-cudnn 23.0 us (torch's
  own F.sdpa 18.2 us); the other kernels 45-310 us there.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

from .caches import clear_all
from .registry import REGISTRY
from .spec import CallSpec

RANKINGS: dict[str, tuple[str, ...]] = {
    "sm90": ("flash-attn", "sdpa-cudnn", "xformers", "sdpa-flash", "flex",
             "sdpa-mem-efficient", "triton-decode", "math"),
    "sm100": ("flash-attn", "sdpa-cudnn", "xformers", "sdpa-flash", "flex",
              "sdpa-mem-efficient", "triton-decode", "math"),
    "sm80": ("flash-attn", "sdpa-flash", "xformers", "sdpa-cudnn", "flex",
             "sdpa-mem-efficient", "triton-decode", "math"),
    "cuda": ("flash-attn", "xformers", "sdpa-flash", "sdpa-mem-efficient", "sdpa-cudnn",
             "flex", "triton-decode", "math"),
    # not measured (see the module docstring)
    "rocm": ("flash-attn", "sdpa-flash", "xformers", "sdpa-mem-efficient", "flex", "sdpa",
             "math"),
    "mps": ("sdpa", "math"),
    "xpu": ("sdpa", "flex", "math"),
    "cpu": ("sdpa-flash", "flex", "math"),
    "other": ("math",),
}
#: Families whose table was not measured on such a device.
UNMEASURED = frozenset({"rocm", "mps", "xpu"})


_SM90_SHORT = ("sdpa-cudnn", "flash-attn", "xformers", "sdpa-flash", "flex",
               "sdpa-mem-efficient", "triton-decode", "math")
_SM90_DECODE = ("sdpa-cudnn", "sdpa-flash", "sdpa-mem-efficient", "flash-attn", "xformers",
                "flex", "triton-decode", "math")
# paged calls: triton-decode's split-KV route first where FA4's one split per
# (row, kv head) leaves SMs idle, then the decode order; FA4's paged route first
# where those splits fill the device ("paged-wide", see the module docstring)
_SM90_PAGED = ("triton-decode",) + tuple(n for n in _SM90_DECODE if n != "triton-decode")
_SM90_PAGED_WIDE = ("flash-attn", "triton-decode") + tuple(
    n for n in _SM90_DECODE if n not in ("flash-attn", "triton-decode"))
#: a paged call with at least this many (row, kv head, 128 query rows) tiles is "paged-wide"
PAGED_WIDE_TILES = 128
_SM90_TINY = ("sdpa-flash",) + tuple(n for n in _SM90_SHORT if n != "sdpa-flash")
#: 4 * B * Hq * Sq * Sk * D at or below this is a "tiny" call (host-bound)
TINY_FLOPS = 1 << 26
#: a call with gradients whose forward FLOPs (halved for causal) are
#: under this is "short" (see the module docstring)
HOST_BOUND_GRAD_FLOPS = 1 << 37
SHAPE_RANKINGS: dict[tuple[str, str], tuple[str, ...]] = {
    ("sm90", "tiny"): _SM90_TINY,
    ("sm90", "short"): _SM90_SHORT,
    ("sm90", "decode"): _SM90_DECODE,
    ("sm90", "paged"): _SM90_PAGED,
    ("sm90", "paged-wide"): _SM90_PAGED_WIDE,
}
SHAPE_CLASSES = ("decode", "short", "long", "paged", "paged-wide", "tiny")

_lock = threading.Lock()
_registered: dict[tuple[str, Optional[str]], tuple[str, ...]] = {}


def register_ranking(family: str, order: "tuple[str, ...] | list[str]",
                     shape_class: Optional[str] = None) -> None:
    """Use ``order`` (backend names, best first) for ``family`` (and only for
    ``shape_class`` when given) in place of the built-in table.  Names that are
    not registered are skipped; registered backends the order leaves out are
    placed as their declarations say (default: before ``math``).
    ``register_ranking(family, ())`` removes a registration.  Cached decisions
    are forgotten (``ad.clear_cache()``), so the next call uses the new order."""
    if shape_class is not None and shape_class not in SHAPE_CLASSES:
        raise ValueError(f"shape_class: expected one of {SHAPE_CLASSES} or None; "
                         f"got {shape_class!r}")
    with _lock:
        if order:
            _registered[(family, shape_class)] = tuple(order)
        else:
            _registered.pop((family, shape_class), None)
    clear_all()


def table(family: str, spec: Optional[CallSpec]) -> tuple[str, ...]:
    """The ranking table for ``family`` and the call's shape class."""
    cls = shape_class(spec) if spec is not None else None
    for key in ((family, cls), (family, None)):
        if key in _registered:
            return _registered[key]
    if cls is not None and (family, cls) in SHAPE_RANKINGS:
        return SHAPE_RANKINGS[(family, cls)]
    return RANKINGS.get(family, RANKINGS["other"])


def shape_class(spec: CallSpec) -> str:
    """"paged", "paged-wide", "tiny", "decode", "short" or "long" (see the
    module docstring)."""
    if spec.paged:
        rows = -(-spec.seq_q * (spec.heads_q // max(1, spec.heads_kv)) // 128)
        return "paged-wide" if spec.batch * spec.heads_kv * rows >= PAGED_WIDE_TILES else "paged"
    flops = 4 * spec.batch * spec.heads_q * spec.seq_q * spec.seq_k * spec.head_dim
    if spec.device_type == "cuda" and flops <= TINY_FLOPS:
        return "tiny"
    if spec.seq_q == 1:
        return "decode"
    if spec.key_padding or spec.varlen:
        return "long"
    if spec.requires_grad and (flops // 2 if spec.causal else flops) < HOST_BOUND_GRAD_FLOPS:
        return "short"  # FA4's host cost per call outweighs its faster kernels
    longest = max(spec.seq_q, spec.seq_k)
    if longest <= (2048 if spec.head_dim >= 128 or not spec.requires_grad else 1024):
        return "short"
    if spec.requires_grad:
        return "long"
    return "short" if longest <= (8192 if spec.head_dim >= 128 else 4096) else "long"


def device_family(device: torch.device) -> str:
    """"cpu", "sm90", "sm100", "sm80", "cuda" (other NVIDIA), "rocm", "mps",
    "xpu" or "other"."""
    kind = device.type
    if kind == "cuda":
        if getattr(torch.version, "hip", None):
            return "rocm"
        major, _ = torch.cuda.get_device_capability(device)
        return {9: "sm90", 10: "sm100", 8: "sm80"}.get(major, "cuda")
    return kind if kind in ("cpu", "mps", "xpu") else "other"


def _declared(name: str, family: str, cls: Optional[str]) -> Optional[str]:
    """The placement backend ``name`` declares for this family (and class)."""
    inst, _ = REGISTRY.load(name)
    marks = getattr(inst, "ranking", None) or {}
    for key in ((f"{family}/{cls}" if cls else None), family, "*"):
        if key is not None and key in marks:
            return str(marks[key])
    return None


def _place(order: list[str], name: str, where: Optional[str]) -> None:
    where = where or "before:math"
    rel, _, other = where.partition(":")
    if rel == "first":
        order.insert(0, name)
    elif rel in ("before", "after") and other in order:
        order.insert(order.index(other) + (rel == "after"), name)
    elif "math" in order and rel != "last":
        order.insert(order.index("math"), name)
    else:
        order.append(name)


def ranked(device: torch.device, registered: list[str], spec: Optional[CallSpec] = None
           ) -> list[str]:
    """Registered backends in auto order for ``device`` (and the call's shape
    class, when ``spec`` is given): the table, then every registered backend
    outside it placed as it declares.  Built-in backends named by no table of
    any family stay out unless they declare a placement for this family."""
    family = device_family(device)
    order = _order(family, registered, spec)
    if spec is None:
        return order
    cold = [n for n in order if _cold(n, spec)]
    return _held_back(order, _order(family, registered, None), cold) if cold else order


def _order(family: str, registered: list[str], spec: Optional[CallSpec]) -> list[str]:
    """The table of ``family`` (and the call's shape class, when ``spec`` is
    given), then every registered backend outside it placed as it declares."""
    cls = shape_class(spec) if spec is not None else None
    order = [n for n in table(family, spec) if n in registered]
    for name in registered:
        if name in order:
            continue
        where = _declared(name, family, cls)
        if where is None and name in _ALL_RANKED:
            continue  # a built-in kernel this family's table leaves out
        _place(order, name, where)
    return order


def _cold(name: str, spec: CallSpec) -> bool:
    """Backend ``name`` compiles per shape and has not compiled ``spec`` yet."""
    inst, _ = REGISTRY.load(name)
    if inst is None or not getattr(inst, "compiles_per_shape", False):
        return False
    try:
        return not inst.compiled(spec)
    except Exception:  # a plugin's answer never breaks a decision
        return True


def _held_back(order: list[str], family_order: list[str], cold: list[str]) -> list[str]:
    """``order`` with each backend of ``cold`` moved behind the backends that
    the family's own order (no shape class) places ahead of it, where the
    class still ranks them ahead of its successor there (a backend the class
    itself moves down does not count): a shape class promotes a backend that
    compiles per shape only for calls it has compiled."""
    out = list(order)
    for name in cold:
        if name not in family_order:
            continue
        i = family_order.index(name)
        after = next((n for n in family_order[i + 1:] if n in out), None)
        limit = out.index(after) if after is not None else len(out)
        last = max((out.index(n) for n in family_order[:i] if n in out and out.index(n) < limit),
                   default=-1)
        if out.index(name) < last:
            out.remove(name)  # the backend at ``last`` moves to last - 1
            out.insert(last, name)
    return out


_ALL_RANKED = frozenset(n for r in RANKINGS.values() for n in r)
