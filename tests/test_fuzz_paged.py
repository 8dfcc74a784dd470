"""Property tests (Hypothesis) of ``attention_paged``: random paged calls on every
CPU backend that accepts them, on the route ``explain_paged`` names (native
``forward_paged`` or gathered to a dense batch), against the independent float64
reference built from the block table (``tests/_paged.py: paged_reference``).

Each example draws: B 1..4, Hkv 1..3, Hq = Hkv * group (1..4), D in {16, 32, 48}
(Dv = D, sometimes another of them), block sizes {1, 4, 16, 24, 32, 128}, Sq 1..8
(the same for every row), each row's length from Sq to several blocks (exact
multiples of the block size, partial last blocks, L = Sq), a block table with
spare columns past the used ones (garbage there: -1, num_blocks + 7), spare
blocks no row uses, the used blocks a random permutation, dtype float32,
bfloat16, float16 or float64, causal, a window (p 0.3; left, right from
{-1, 0, 1, 3, 16}, not both -1), softcap (p 0.2), scale, sinks (p 0.2, float32
or the input dtype), return_lse, and the memory behind the tensors: q stored
(B, Hq, Sq, D) and read transposed, k/v caches as halves of one packed cache,
one layer of a stacked (layers, ...) cache whose other layer is NaN, heads-major
blocks read transposed, the block table a step slice of a wider table and the
lengths a step slice.

Poison: every unused block is NaN; the slots past each row's length in its last
block are NaN for routes that never read them, and large random finite values for
the block-granular kernels (``Backend.paged_reads_tail``, flex's native route),
which must weigh them by zero.  Every backend's output must be finite (the poison
never reaches it) and obey the contract's rule::

    max|backend - ref| <= 2 * max|math - ref| + atol(dtype) * (1 + max|ref|)

(``math`` in the same dtype on the same inputs; the lse the same way, float32's
atol for float64).  ``math`` itself (the native baseline) must be within
atol(float64) of the reference in float64 and 10 atol(dtype) otherwise.

Time: derandomized and seeded (CI is reproducible); ``PAGED_FUZZ_EXAMPLES``
examples (default 80, ~9 s on 2 busy cores) for the backends that need no
compile, and ``PAGED_FUZZ_FLEX_EXAMPLES`` (default 2, plus one explicit
non-causal example with partial last blocks) for flex, float32, sizes from 2
fixed shapes: each new signature is a compile of seconds on the CPU (~10-25 s in
all).  The whole file: ~30 s.  Raise both for longer runs.  Counts per backend
and route are in ``PAGED_COUNTS``, printed by ``test_paged_fuzz_counts``
(``pytest -s``).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import json
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st

import attention_dispatch as ad
from attention_dispatch.testing import atol
from _helpers import cpu_backends
from _paged import PagedCase, make_case, max_err, paged_reference

EXAMPLES = int(os.environ.get("PAGED_FUZZ_EXAMPLES", "80"))
FLEX_EXAMPLES = int(os.environ.get("PAGED_FUZZ_FLEX_EXAMPLES", "2"))
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
HEAD_DIMS = (16, 32, 48)
BLOCK_SIZES = (1, 4, 16, 24, 32, 128)
WINDOW_SIDES = (-1, 0, 1, 3, 16)
VIEWS = ("q_transposed", "kv_packed", "layers", "heads_major", "table_slice", "seqlens_step")
# flex: (B, Hkv, group, Sq, D, block size, max_blocks) -- few shapes, so few compiles
FLEX_SHAPES = ((2, 2, 2, 1, 32, 16, 5), (3, 1, 3, 4, 16, 32, 3))
NATIVE, GATHERED = "native", "gathered"



CPU_BACKENDS = sorted(cpu_backends(), key=lambda n: n == "flex")  # flex last: its own test
PAGED_COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@dataclass(frozen=True)
class PagedCall:
    """One drawn paged call (tensors built from ``seed`` by ``build``)."""

    heads_kv: int
    group: int
    seq_q: int
    head_dim: int
    head_dim_v: int
    block_size: int
    lengths: tuple[int, ...]
    extra_columns: int  # table columns past the longest row's used blocks
    spare: int  # blocks no row uses
    dtype: torch.dtype
    causal: bool
    window: Optional[tuple[int, int]]
    softcap: Optional[float]
    scale: Optional[float]
    sinks: Optional[torch.dtype]  # None, or the sinks' dtype
    lse: bool
    views: tuple[str, ...]
    seed: int

    @property
    def heads_q(self) -> int:
        return self.heads_kv * self.group

    def options(self) -> dict[str, Any]:
        return dict(causal=self.causal, window=self.window, softcap=self.softcap,
                    scale=self.scale)


@st.composite
def row_length(draw: Any, sq: int, bs: int, blocks: int) -> int:
    """Sq <= L: exactly Sq, a multiple of the block size, or any (partial last block)."""
    top = max(sq, blocks * bs)
    kind = draw(st.sampled_from(("sq", "full", "any", "any")))
    if kind == "sq":
        return sq
    if kind == "full":
        return max(sq, draw(st.integers(1, blocks)) * bs)
    return draw(st.integers(sq, top))


@st.composite
def paged_calls(draw: Any, dtypes: tuple[torch.dtype, ...] = DTYPES,
                shapes: Optional[tuple[tuple[int, ...], ...]] = None,
                sinks_ok: bool = True, lse_ok: bool = True) -> PagedCall:
    if shapes:
        b, hkv, group, sq, d, bs, maxb = draw(st.sampled_from(shapes))
        lengths = tuple(draw(st.lists(row_length(sq, bs, maxb), min_size=b, max_size=b)))
        extra = maxb - max(-(-n // bs) for n in lengths)
        dv = d
    else:
        b, hkv, group = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
        sq, bs = draw(st.integers(1, 8)), draw(st.sampled_from(BLOCK_SIZES))
        blocks = draw(st.integers(1, 4 if bs >= 16 else 12))
        lengths = tuple(draw(st.lists(row_length(sq, bs, blocks), min_size=b, max_size=b)))
        extra = draw(st.integers(0, 3))
        d = draw(st.sampled_from(HEAD_DIMS))
        dv = draw(st.sampled_from(HEAD_DIMS)) if draw(st.integers(0, 5)) == 0 else d
    window = None
    if draw(st.integers(0, 9)) < 3:
        window = draw(st.tuples(st.sampled_from(WINDOW_SIDES), st.sampled_from(WINDOW_SIDES))
                      .filter(lambda w: w != (-1, -1)))
    dtype = draw(st.sampled_from(dtypes))
    sinks = None
    if sinks_ok and draw(st.integers(0, 4)) == 0:
        sinks = draw(st.sampled_from((torch.float32, dtype)))
    return PagedCall(
        heads_kv=hkv, group=group, seq_q=sq, head_dim=d, head_dim_v=dv, block_size=bs,
        lengths=lengths, extra_columns=extra, spare=draw(st.integers(0, 3)), dtype=dtype,
        causal=draw(st.booleans()), window=window,
        softcap=draw(st.sampled_from((2.0, 20.0))) if draw(st.integers(0, 4)) == 0 else None,
        scale=None if shapes else draw(st.one_of(st.none(), st.floats(0.05, 1.0))), sinks=sinks,
        lse=lse_ok and draw(st.booleans()),
        views=tuple(v for v in VIEWS if draw(st.integers(0, 4)) == 0),
        seed=draw(st.integers(0, 2**31 - 1)))


def build(c: PagedCall, finite_tail: bool) -> PagedCase:
    """The call's cache: NaN in unused blocks; past each row's length NaN, or
    large random finite values with ``finite_tail``; garbage in the table's
    spare columns."""
    need = max(-(-n // c.block_size) for n in c.lengths)
    case = make_case(list(c.lengths), c.seq_q, c.heads_q, c.heads_kv, c.head_dim,
                     c.block_size, dv=c.head_dim_v, max_blocks=need + c.extra_columns,
                     spare=c.spare, dtype=c.dtype, seed=c.seed)
    if finite_tail:
        g = torch.Generator().manual_seed(c.seed + 1)
        for cache in (case.k_cache, case.v_cache):
            for b, n in enumerate(c.lengths):
                last, used = int(case.block_table[b, (n - 1) // c.block_size]), \
                    (n - 1) % c.block_size + 1
                rest = cache[last, used:]
                rest.copy_(torch.randn(rest.shape, generator=g) * 1e3)
    return case


def with_views(c: PagedCase, views: tuple[str, ...]) -> PagedCase:
    """The same values behind other memory (strides, offsets, shared storage)."""
    q, kc, vc, bt, sl = c.q, c.k_cache, c.v_cache, c.block_table, c.cache_seqlens
    if "q_transposed" in views:
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    packed = "kv_packed" in views  # one (NB, bs, Hkv, D + Dv) cache, k and v its halves
    bases = [torch.cat([kc, vc], dim=-1)] if packed else [kc, vc]
    for i, base in enumerate(bases):
        store = base.transpose(1, 2) if "heads_major" in views else base  # (NB, Hkv, bs, .)
        if "layers" in views:  # layer 1 of a (2, ...) stack; layer 0 NaN
            store = torch.stack([torch.full_like(store, math.nan), store])[1]
        else:
            store = store.contiguous()
        bases[i] = store.transpose(1, 2) if "heads_major" in views else store
    kc, vc = (bases[0][..., :kc.shape[-1]], bases[0][..., kc.shape[-1]:]) if packed else bases
    if "table_slice" in views:  # every other column of a wider table
        wide = torch.full((bt.shape[0], 2 * bt.shape[1]), -5, dtype=torch.int32)
        wide[:, ::2] = bt
        bt = wide[:, ::2]
    if "seqlens_step" in views:
        wide = torch.zeros(2 * sl.shape[0], dtype=torch.int32)
        wide[::2] = sl
        sl = wide[::2]
    return PagedCase(q, kc, vc, bt, sl)


def sinks_of(c: PagedCall) -> Optional[torch.Tensor]:
    if c.sinks is None:
        return None
    g = torch.Generator().manual_seed(c.seed + 2)
    return (torch.randn(c.heads_q, generator=g) * 2).to(c.sinks)


def call(case: PagedCase, c: PagedCall, backend: str) -> tuple[torch.Tensor,
                                                               Optional[torch.Tensor]]:
    with torch.no_grad():
        res = ad.attention_paged(case.q, case.k_cache, case.v_cache,
                                 block_table=case.block_table,
                                 cache_seqlens=case.cache_seqlens, sinks=sinks_of(c),
                                 return_lse=c.lse, backend=backend, **c.options())
    out, lse = res if c.lse else (res, None)
    want = (len(c.lengths), c.seq_q, c.heads_q, c.head_dim_v)
    assert tuple(out.shape) == want and out.dtype == c.dtype, (backend, out.shape, out.dtype)
    assert torch.isfinite(out).all(), f"{backend}: non-finite output (poison read?) on {c}"
    if lse is not None:
        assert lse.dtype == torch.float32 and tuple(lse.shape) == (want[0], want[2], want[1])
        assert torch.isfinite(lse).all(), f"{backend}: non-finite lse on {c}"
    return out, lse


def routes(case: PagedCase, c: PagedCall, names: list[str]) -> dict[str, str]:
    """Accepting backend of ``names`` -> route (native / gathered), from ``explain_paged``
    (with ``names`` as the selection: every one of them is a candidate); the
    refusing ones' reasons against the gathered route are counted."""
    d = ad.explain_paged(case.q, case.k_cache, case.v_cache, block_table=case.block_table,
                         cache_seqlens=case.cache_seqlens, sinks=sinks_of(c),
                         return_lse=c.lse, backend=names, **c.options())
    out = {}
    for v in d.verdicts:
        if v.name not in names:
            continue
        if v.status in ("chosen", "accepted"):
            out[v.name] = NATIVE if v.note.startswith("route: native") else GATHERED
        else:
            for r in v.reasons:
                if not r.startswith("native: "):
                    PAGED_COUNTS[v.name]["refused: " + r.split(";")[0].split("=")[0]] += 1
    return out


def check_math(c: PagedCall, out: torch.Tensor, lse: Optional[torch.Tensor],
               ref: torch.Tensor, ref_lse: torch.Tensor) -> None:
    slack = atol(c.dtype) * (1 + ref.abs().max().item())
    err = max_err(out, ref)
    assert err <= (slack if c.dtype == torch.float64 else 10 * slack), (err, c)
    if lse is not None:
        lt = torch.float32 if c.dtype == torch.float64 else c.dtype
        assert max_err(lse, ref_lse) <= atol(lt) * (1 + ref_lse.abs().max().item()), c


def violations(c: PagedCall, got: list, base: list, ref: list) -> list[str]:
    """The contract's rule for out and lse; one line per violation."""
    bad = []
    for name, a, m, r in zip(("out", "lse"), got, base, ref):
        if a is None:
            continue
        dt = c.dtype if name == "out" or c.dtype != torch.float64 else torch.float32
        slack = atol(dt) * (1 + r.abs().max().item())
        err, em = max_err(a, r), max_err(m, r)
        bound = slack if dt == torch.float64 else 2 * em + slack
        if not err <= bound:
            bad.append(f"{name}: error {err:.3g} > bound {bound:.3g} (math {em:.3g})")
    return bad


def check(c: PagedCall, names: Optional[list[str]] = None) -> None:
    """Every accepting backend of ``names`` (default: every CPU one but flex) on ``c``."""
    names = names or [n for n in CPU_BACKENDS if n != "flex"]
    nan_case = build(c, finite_tail=False)
    ref, ref_lse = paged_reference(nan_case, sinks=sinks_of(c), **c.options())
    viewed = with_views(nan_case, c.views)
    accepted = routes(viewed, c, names + ["math"])
    base = call(viewed, c, "math")
    check_math(c, *base, ref, ref_lse)
    PAGED_COUNTS["math"]["run " + accepted["math"]] += 1
    tail_case = None
    for name in names:
        if name == "math":
            continue
        if name not in accepted:
            PAGED_COUNTS[name]["refused"] += 1
            continue
        case = viewed
        if accepted[name] == NATIVE and ad.get_backend(name).paged_reads_tail:
            tail_case = tail_case or with_views(build(c, finite_tail=True), c.views)
            case = tail_case
        got = call(case, c, name)
        counts = PAGED_COUNTS[name]
        counts["run " + accepted[name]] += 1
        counts["finite tail" if case is tail_case else "NaN tail"] += 1
        counts[str(c.dtype).replace("torch.", "")] += 1
        for what, on in (("lse", c.lse), ("sinks", c.sinks is not None),
                         ("window", c.window is not None), ("softcap", c.softcap is not None),
                         ("views", bool(c.views)), ("gqa", c.group > 1)):
            counts[what] += on
        bad = violations(c, list(got), list(base), [ref, ref_lse])
        assert not bad, f"{name} ({accepted[name]}) violates the contract on {c}:\n  " + \
            "\n  ".join(bad)


@seed(20261203)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(c=paged_calls())
def test_fuzz_paged_every_cpu_backend(c: PagedCall) -> None:
    """math natively and every other CPU backend that takes the call (sdpa-flash,
    sdpa, chunked: gathered) against the float64 reference."""
    check(c)


# non-causal with partial last blocks: every query could see the slots past a
# row's length (finite garbage in a block flex loads whole) if the mask let it
FLEX_OPEN = PagedCall(
    heads_kv=2, group=2, seq_q=1, head_dim=32, head_dim_v=32, block_size=16,
    lengths=(37, 5), extra_columns=1, spare=2, dtype=torch.float32, causal=False,
    window=None, softcap=None, scale=None, sinks=None, lse=False, views=("kv_packed",),
    seed=11)


def test_fuzz_paged_flex_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """flex's native block-table route (compiled per signature; inference only on
    the CPU: no lse, no sinks), finite garbage past each row's length."""
    flex = ad.get_backend("flex")
    if flex.probe(torch.device("cpu")):
        pytest.skip("flex unavailable on the CPU")
    monkeypatch.setattr(flex, "min_cpu_scores", 0)  # small calls still compiled

    @seed(1203)
    @settings(max_examples=FLEX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(c=paged_calls((torch.float32,), FLEX_SHAPES, sinks_ok=False,
                         lse_ok=False))
    @example(c=FLEX_OPEN)
    def fuzz(c: PagedCall) -> None:
        check(c, ["flex"])

    fuzz()
    assert PAGED_COUNTS["flex"]["run native"] > 0, dict(PAGED_COUNTS["flex"])


def test_paged_fuzz_counts() -> None:
    """Both routes ran; counts printed (run with the tests above)."""
    if "math" not in PAGED_COUNTS:
        pytest.skip("run together with test_fuzz_paged_every_cpu_backend")
    assert PAGED_COUNTS["math"]["run native"] >= EXAMPLES
    gathered = sum(c["run gathered"] for c in PAGED_COUNTS.values())
    assert gathered >= EXAMPLES // 2, dict(PAGED_COUNTS)
    print("\npaged fuzz: " + "\n".join(f"{n}: " + ", ".join(f"{k}={v}" for k, v in
                                                             sorted(c.items()))
                                       for n, c in sorted(PAGED_COUNTS.items())))


def test_views_keep_values() -> None:
    """with_views changes the memory, not the values (the fuzz relies on it)."""
    c = PagedCall(heads_kv=2, group=2, seq_q=2, head_dim=16, head_dim_v=32, block_size=4,
                  lengths=(9, 3), extra_columns=1, spare=1, dtype=torch.float32, causal=True,
                  window=None, softcap=None, scale=None, sinks=None, lse=False, views=VIEWS,
                  seed=5)
    a, b = build(c, False), with_views(build(c, False), VIEWS)
    for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b)):
        assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0))
    assert not b.k_cache.is_contiguous() and not b.q.is_contiguous()
    assert b.k_cache.storage_offset() > 0 and b.v_cache.data_ptr() != b.k_cache.data_ptr()
    assert b.k_cache.untyped_storage().data_ptr() == b.v_cache.untyped_storage().data_ptr()
    assert not b.block_table.is_contiguous() and not b.cache_seqlens.is_contiguous()


# ------------------------------------------------ the GPU fuzzer's paged calls

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench_module(name: str) -> Any:
    """bench/<name>.py as a module (bench/ on sys.path, as the script runs)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def test_gpu_fuzz_paged_draws_and_poison() -> None:
    """Pool sizes are reused, lengths fit the table, unused blocks and the slots
    past each row's length are NaN, and the device reference (one indexing op per
    row) equals tests/_paged.py's slot-by-slot reference."""
    gp = _bench_module("gpu_fuzz_paged")
    rng = random.Random(1)
    pool = [gp.draw_sizes(rng) for _ in range(4)]
    specs = [gp.draw(rng, ["fp32", "fp64"], pool) for _ in range(60)]
    assert {(s.batch, s.heads_kv, s.group, s.seq_q, s.head_dim, s.block_size, s.max_blocks,
             s.num_blocks) for s in specs} <= set(pool)
    for s in specs:
        need = [-(-n // s.block_size) for n in s.lengths]
        assert all(s.seq_q <= n <= s.max_blocks * s.block_size for n in s.lengths)
        assert sum(need) <= s.num_blocks
    assert any(s.window for s in specs) and any(s.sinks for s in specs)
    s = next(s for s in specs if s.dtype == "fp64" and s.views)
    s = dataclasses.replace(s, lse=True, head_dim=16, lengths=tuple(min(n, 300) for n in
                                                                    s.lengths))
    inp = gp.build(s, torch.device("cpu"))
    used = torch.zeros(s.num_blocks, dtype=torch.bool)
    for b, n in enumerate(s.lengths):
        used[inp.block_table[b, :-(-n // s.block_size)].long()] = True
    assert torch.isnan(inp.k_cache[~used]).all() and torch.isnan(inp.v_cache[inp.tail]).all()
    assert not torch.isnan(inp.k_cache[used][~inp.tail[used]]).any()
    viewed = gp.with_views(inp, s.views)
    assert torch.equal(viewed.k_cache.nan_to_num(3.0), inp.k_cache.nan_to_num(3.0))
    out, lse = gp.reference(s, inp)[:2]
    case = PagedCase(inp.q, inp.k_cache, inp.v_cache, inp.block_table, inp.cache_seqlens)
    ref, ref_lse = paged_reference(case, sinks=inp.sinks, **s.options())
    assert torch.allclose(out, ref, atol=1e-12) and torch.allclose(lse, ref_lse, atol=1e-12)
    tail = gp.finite_tail(inp, s.seed)
    assert torch.isfinite(tail.k_cache[used]).all()


def test_gpu_fuzz_script_paged_examples_on_cpu(tmp_path: Path) -> None:
    """bench/gpu_fuzz.py --paged-share 1 on the CPU: every example a paged call,
    math native, the dense backends gathered, counted per route; no violation."""
    out = tmp_path / "fuzz.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTENTION_DISPATCH_")}
    backends = ",".join(b for b in ("math", "sdpa-flash", "chunked") if b in CPU_BACKENDS)
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_fuzz.py"), "--device", "cpu",
                           "--examples", "6", "--seed", "3", "--paged-share", "1",
                           "--dtypes", "bf16,fp16,fp32", "--backends", backends,
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["paged_examples"] == report["examples_run"] == 6
    assert report["violations_total"] == 0 and report["paged_share"] == 1.0
    counts = report["backends"]
    assert counts["math"]["paged native"] == 6
    assert sum(c.get("paged gathered", 0) for c in counts.values()) >= 6
    for c in counts.values():
        assert c.get("run", 0) + c.get("refused", 0) + c.get("skipped", 0) == 6
    assert "paged examples: 6" in proc.stdout
