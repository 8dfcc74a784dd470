"""Property tests (Hypothesis): random calls on every CPU backend vs the float64
reference, with the contract's accuracy rule.

Each example draws a call: B 1..3, Hkv 1..3 and Hq = Hkv * group (group 1..3),
Sq and Sk 1..20, D in {8, 16, 24, 32} (Dv = D, sometimes another of them), a
dtype the backend declares, layout bhsd/bshd, a mask (none, bool or float of a
random broadcastable shape, float with -inf entries, some rows fully masked, a
learned float bias that needs a gradient), a key padding mask (prefix or
scattered, one batch row possibly all False), causal, scale None or random,
return_lse and gradients.  The backend's output, lse and gradients must obey

    max|backend - ref| <= 2 * max|math - ref| + atol(dtype) * (1 + max|ref|)

(float64: ``atol(float64) * (1 + max|ref|)`` alone; the lse is float32 for
every dtype, so it gets float32's atol), with lse = -inf exactly on the rows
the reference has no key for, and nothing non-finite where the reference is
finite.  A backend that refuses a call (BackendUnavailable) is counted, not
failed.  Examples are derandomized (seeded per backend): CI is reproducible.

Counts per backend (run / refused / with grad / lse / empty rows...) are in
``FUZZ_COUNTS`` and printed by the last test (``pytest -s``).
"""

from __future__ import annotations

import collections
import math
import zlib
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import attention_dispatch as ad
from attention_dispatch.testing import atol, reference_attention

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
HEAD_DIMS = (8, 16, 24, 32)
TOTAL_EXAMPLES = 1500  # spread over the CPU backends, at least 150 each

FUZZ_COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def cpu_backends() -> list[str]:
    out = []
    for name in ad.list_backends():
        try:
            if not ad.get_backend(name).probe(torch.device("cpu")):
                out.append(name)
        except ad.AttentionDispatchError:
            continue
    ad.clear_cache()
    return out


CPU_BACKENDS = cpu_backends()
EXAMPLES_PER_BACKEND = max(150, math.ceil(TOTAL_EXAMPLES / max(1, len(CPU_BACKENDS))))


@dataclass(frozen=True)
class Call:
    """One drawn call (tensors are built from ``seed`` by ``build``)."""

    batch: int
    heads_kv: int
    group: int
    seq_q: int
    seq_k: int
    head_dim: int
    head_dim_v: int
    dtype: torch.dtype
    layout: str
    mask: str  # none | bool | float
    mask_shape: tuple[int, ...]
    mask_float32: bool  # a float32 mask with half/bfloat16 inputs
    mask_grad: bool
    dead_rows: tuple[int, ...]  # query rows fully masked by the mask
    padding: str  # none | prefix | scattered
    dead_batch: bool  # one batch row of the key padding mask all False
    causal: bool
    scale: Optional[float]
    lse: bool
    grad: bool
    seed: int

    @property
    def heads_q(self) -> int:
        return self.heads_kv * self.group


@st.composite
def calls(draw: Any, dtypes: tuple[torch.dtype, ...]) -> Call:
    b = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    sq = draw(st.one_of(st.just(1), st.integers(1, 20)))
    sk = draw(st.one_of(st.just(1), st.integers(1, 20)))
    d = draw(st.sampled_from(HEAD_DIMS))
    dv = draw(st.one_of(st.just(d), st.sampled_from(HEAD_DIMS)))
    dtype = draw(st.sampled_from(dtypes))
    mask = draw(st.sampled_from(("none", "bool", "float")))
    full = (b, hkv * group, sq, sk)
    ndim = draw(st.integers(2, 4))
    keep_full = draw(st.lists(st.booleans(), min_size=ndim, max_size=ndim))
    shape = tuple(full[4 - ndim + i] if keep_full[i] else 1 for i in range(ndim))
    rows = shape[-2] if ndim >= 2 else 1
    dead = tuple(sorted(draw(st.sets(st.integers(0, rows - 1), max_size=2)))) \
        if mask != "none" else ()
    grad = draw(st.booleans())
    return Call(
        batch=b, heads_kv=hkv, group=group, seq_q=sq, seq_k=sk, head_dim=d, head_dim_v=dv,
        dtype=dtype, layout=draw(st.sampled_from(("bhsd", "bshd"))), mask=mask,
        mask_shape=shape if mask != "none" else (),
        mask_float32=mask == "float" and dtype in (torch.float16, torch.bfloat16)
        and draw(st.booleans()),
        mask_grad=mask == "float" and grad and draw(st.integers(0, 3)) == 0,
        dead_rows=dead, padding=draw(st.sampled_from(("none", "prefix", "scattered"))),
        dead_batch=draw(st.booleans()), causal=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))), lse=draw(st.booleans()),
        grad=grad, seed=draw(st.integers(0, 2**31 - 1)))


def build(c: Call) -> dict[str, Any]:
    """Tensors of the call (q, k, v in the call's layout) and the gradient seed."""
    g = torch.Generator().manual_seed(c.seed)

    def rnd(h: int, s: int, d: int) -> torch.Tensor:
        t = torch.randn(c.batch, h, s, d, generator=g)
        if c.layout == "bshd":
            t = t.transpose(1, 2).contiguous()
        return t.to(c.dtype)

    kw: dict[str, Any] = {"q": rnd(c.heads_q, c.seq_q, c.head_dim),
                          "k": rnd(c.heads_kv, c.seq_k, c.head_dim),
                          "v": rnd(c.heads_kv, c.seq_k, c.head_dim_v)}
    mask = None
    if c.mask == "bool":
        mask = torch.rand(c.mask_shape, generator=g) > 0.3
        for r in c.dead_rows:
            mask[..., r, :] = False
    elif c.mask == "float":
        mask = torch.randn(c.mask_shape, generator=g)
        mask = mask.masked_fill(torch.rand(c.mask_shape, generator=g) < 0.25, float("-inf"))
        for r in c.dead_rows:
            mask[..., r, :] = float("-inf")
        mask = mask.to(torch.float32 if c.mask_float32 else c.dtype)
    kpm = None
    if c.padding == "prefix":
        lens = torch.randint(0, c.seq_k + 1, (c.batch,), generator=g)
        kpm = torch.arange(c.seq_k)[None, :] < lens[:, None]
    elif c.padding == "scattered":
        kpm = torch.rand(c.batch, c.seq_k, generator=g) > 0.4
    if kpm is not None and c.dead_batch:
        kpm[torch.randint(0, c.batch, (1,), generator=g)] = False
    kw["mask"] = mask
    kw["key_padding_mask"] = kpm
    kw["grad_out"] = torch.randn(c.batch, c.heads_q, c.seq_q, c.head_dim_v, generator=g)
    return kw


def _bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(1, 2) if layout == "bshd" else t


def run(backend: str, c: Call, inp: dict[str, Any]) -> list[Optional[torch.Tensor]]:
    """[out, lse, dq, dk, dv, dmask] in bhsd (None where not requested)."""
    q, k, v = (inp[n].detach().clone().requires_grad_(c.grad) for n in "qkv")
    mask = inp["mask"]
    if mask is not None and c.mask_grad:
        mask = mask.detach().clone().requires_grad_()
    res = ad.attention(q, k, v, mask=mask, key_padding_mask=inp["key_padding_mask"],
                       causal=c.causal, scale=c.scale, layout=c.layout, backend=backend,
                       return_lse=c.lse)
    out, lse = res if c.lse else (res, None)
    want = (c.batch, c.heads_q, c.seq_q, c.head_dim_v)
    if c.layout == "bshd":
        want = (c.batch, c.seq_q, c.heads_q, c.head_dim_v)
    assert tuple(out.shape) == want and out.dtype == c.dtype, (out.shape, out.dtype, want)
    if lse is not None:
        assert lse.dtype == torch.float32 and tuple(lse.shape) == want[:1] + (c.heads_q,
                                                                              c.seq_q)
        assert not lse.requires_grad
    grads: list[Optional[torch.Tensor]] = [None, None, None, None]
    if c.grad:
        go = inp["grad_out"].to(c.dtype)
        if c.layout == "bshd":
            go = go.transpose(1, 2)
        out.backward(go)
        grads = [_bhsd(q.grad, c.layout), _bhsd(k.grad, c.layout), _bhsd(v.grad, c.layout),
                 mask.grad if c.mask_grad else None]
    return [_bhsd(out, c.layout).detach(), lse] + grads


def reference(c: Call, inp: dict[str, Any]) -> tuple[list[Optional[torch.Tensor]], bool]:
    """[out, lse, dq, dk, dv, dmask] in float64, and whether some row has no key."""
    q, k, v = (_bhsd(inp[n], c.layout).double().requires_grad_(c.grad) for n in "qkv")
    mask = inp["mask"]
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double().requires_grad_(c.mask_grad)
    out, lse = reference_attention(q, k, v, mask=mask, key_padding_mask=inp["key_padding_mask"],
                                   causal=c.causal, scale=c.scale)
    grads: list[Optional[torch.Tensor]] = [None, None, None, None]
    if c.grad:
        out.backward(inp["grad_out"].to(c.dtype).double())
        grads = [q.grad, k.grad, v.grad, mask.grad if c.mask_grad else None]
    empty = bool(torch.isneginf(lse).any())
    return [out.detach(), lse.detach() if c.lse else None] + grads, empty


NAMES = ("out", "lse", "dq", "dk", "dv", "dmask")


def _err(a: torch.Tensor, r: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    d = (a.double() - r.double()).abs()
    if not torch.isfinite(d).all():
        return math.inf
    return d.max().item()


def violations(c: Call, got: list, base: list, ref: list) -> list[str]:
    """The accuracy rule, per output; one line per violation."""
    bad = []
    for name, a, m, r in zip(NAMES, got, base, ref):
        if r is None:
            continue
        assert a is not None and m is not None, name
        dt = c.dtype
        if name == "lse":
            dead = torch.isneginf(r)
            if not torch.equal(torch.isneginf(a), dead):
                bad.append("lse: -inf rows differ from the reference's")
                continue
            a, m, r = (x.double().masked_fill(dead, 0.0) for x in (a, m, r))
            dt = torch.float32 if c.dtype == torch.float64 else c.dtype
        e, em = _err(a, r), _err(m, r)
        top = r.abs().max().item() if r.numel() else 0.0
        slack = atol(dt) * (1 + top)
        bound = slack if dt == torch.float64 else 2 * em + slack
        if not e <= bound:
            bad.append(f"{name}: error {e:.3g} > bound {bound:.3g} (math {em:.3g})")
    return bad


def check(backend: str, c: Call) -> None:
    counts = FUZZ_COUNTS[backend]
    inp = build(c)
    try:
        got = run(backend, c, inp)
    except ad.BackendUnavailable:
        counts["refused"] += 1
        return
    base = run("math", c, inp)
    ref, empty = reference(c, inp)
    bad = violations(c, got, base, ref)
    counts["run"] += 1
    counts[str(c.dtype).replace("torch.", "")] += 1
    counts["grad"] += c.grad
    counts["lse"] += c.lse
    counts["mask " + c.mask] += 1
    counts["key padding"] += c.padding != "none"
    counts["causal"] += c.causal
    counts["empty rows"] += empty
    if bad:
        counts["violations"] += 1
        raise AssertionError(f"{backend} violates the contract on {c}:\n  " + "\n  ".join(bad))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fuzz_against_the_reference(backend: str) -> None:
    dtypes = tuple(d for d in DTYPES if d in ad.get_backend(backend).capabilities.dtypes)
    assert dtypes, f"{backend} declares none of {DTYPES}"

    @seed(zlib.crc32(backend.encode()))
    @settings(max_examples=EXAMPLES_PER_BACKEND, deadline=None, derandomize=True,
              database=None, suppress_health_check=list(HealthCheck))
    @given(c=calls(dtypes))
    def fuzz(c: Call) -> None:
        check(backend, c)

    fuzz()


# ------------------------------------------------------------- regressions
# (explicit cases found by the fuzzer go here)


def test_fuzz_counts() -> None:
    """Every CPU backend ran examples, none violated the rule; totals printed."""
    if not FUZZ_COUNTS:
        pytest.skip("run together with test_fuzz_against_the_reference")
    total = 0
    lines = []
    for name in CPU_BACKENDS:
        cnt = FUZZ_COUNTS[name]
        assert cnt["run"] > 0, f"{name} ran no example"
        assert cnt["violations"] == 0
        total += cnt["run"] + cnt["refused"]
        lines.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in sorted(cnt.items())))
    assert total >= 500
    print("\nfuzz examples: " + str(total) + "\n" + "\n".join(lines))
