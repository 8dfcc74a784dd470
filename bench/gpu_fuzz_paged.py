"""Paged calls for bench/gpu_fuzz.py (``--paged-share P``: that fraction of the
examples are ``attention_paged`` calls instead of dense ones).

Each paged example draws: B 1..4, Hkv 1..4, Hq = Hkv * group (1..8), Sq from
{1, 2, 3, 4, 5, 7, 8, 13, 16} (1 most often), D 64/128 (some 32/96), block sizes
16/32/64/128/256, a table capacity (max_blocks * block_size) up to ~4k keys and
each row's length from Sq to it (exactly Sq, multiples of the block size, partial
last blocks), spare table columns past the used ones holding garbage (-1,
out-of-range indices and other rows' blocks), spare blocks, the used blocks a
random permutation; dtype from ``--dtypes``, causal, a window (p 0.2, sides from
{-1, 0, 1, 3, 16, 64}), softcap (p 0.15), sinks (p 0.15), scale, return_lse, and
the memory behind the tensors (q stored transposed; k/v halves of one packed
cache; one layer of a stacked cache whose other layer is NaN; heads-major blocks;
the block table a step slice of a wider one).  With ``--shape-pool K`` the sizes
(B, Hkv, group, Sq, D, block size, max_blocks, num_blocks) come from K drawn
once per worker, so compiled kernels are reused; lengths and flags are per example.

Poison: NaN in every unused block and in the slots past each row's length; the
block-granular kernels (``Backend.paged_reads_tail``: flex, FA4 on their native
route) get a copy of the cache with large random finite values in those slots
instead (they load a row's last block whole and must weigh them by zero).

Every backend is asked through ``ad.explain_paged(..., backend=name)``: one that
refuses is counted as refused (with its reasons), one that accepts runs on the
route explain names (native ``forward_paged``: math, flex, flash-attn,
triton-decode; gathered to a dense batch: sdpa-cudnn, sdpa-flash,
sdpa-mem-efficient, xformers, chunked...) and is judged with the dense examples'
rule (``fuzz_rule.judge``) against a float64 reference computed on the device
(``reference``: each row's keys rebuilt from the block table by one indexing op
per row, one dense float64 call per row with Sk = that row's length; no code of
the package's paged path), ``math`` on the same inputs as the baseline.  Counts
per backend: run / refused / skipped as for dense examples, plus
``paged <route>`` and ``paged refused``.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

import attention_dispatch as ad
from attention_dispatch.testing import atol, reference_attention
from fuzz_rule import DTYPES, describe, errors, judge, magnitudes

Tensor = torch.Tensor
PagedSizes = tuple[int, int, int, int, int, int, int, int]
# batch, heads_kv, group, seq_q, head_dim, block_size, max_blocks, num_blocks
SEQ_Q = (1, 1, 1, 1, 2, 3, 4, 5, 7, 8, 13, 16)
HEAD_DIMS = ((64, 0.45), (128, 0.45), (32, 0.05), (96, 0.05))
BLOCK_SIZES = (16, 32, 64, 128, 256)
CAPACITIES = (64, 200, 513, 1000, 2100, 4096)  # keys a row's table can hold, about
WINDOW_P, WINDOW_SIDES = 0.2, (-1, 0, 1, 3, 16, 64)
SOFTCAP_P, SOFTCAPS = 0.15, (5.0, 20.0, 50.0)
SINKS_P = 0.15
VIEWS = ("q_transposed", "kv_packed", "layers", "heads_major", "table_slice")
BASELINE = "(inputs, reference, math)"


@dataclass(frozen=True)
class PagedSpec:
    batch: int
    heads_kv: int
    group: int
    seq_q: int
    head_dim: int
    block_size: int
    max_blocks: int
    num_blocks: int
    lengths: tuple[int, ...]
    dtype: str
    causal: bool
    scale: Optional[float]
    lse: bool
    window: Optional[tuple[int, int]]
    softcap: Optional[float]
    sinks: bool
    views: tuple[str, ...]
    seed: int

    @property
    def heads_q(self) -> int:
        return self.heads_kv * self.group

    def options(self) -> dict[str, Any]:
        return dict(causal=self.causal, scale=self.scale, window=self.window,
                    softcap=self.softcap)


def draw_sizes(rng: random.Random) -> PagedSizes:
    b, hkv, group = rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 8)
    d = rng.choices([h for h, _ in HEAD_DIMS], [w for _, w in HEAD_DIMS])[0]
    bs = rng.choice(BLOCK_SIZES)
    maxb = -(-rng.choice(CAPACITIES) // bs) + rng.randint(0, 2)
    return b, hkv, group, rng.choice(SEQ_Q), d, bs, maxb, b * maxb + rng.randint(0, 6)


def draw_length(rng: random.Random, sq: int, bs: int, cap: int) -> int:
    kind = rng.choices(("sq", "full", "any"), (0.1, 0.2, 0.7))[0]
    if kind == "sq":
        return sq
    if kind == "full":
        return max(sq, bs * rng.randint(1, max(1, cap // bs)))  # cap < bs: one block
    return rng.randint(sq, max(sq, cap))


def draw(rng: random.Random, dtypes: list[str], pool: Optional[list[PagedSizes]] = None
         ) -> PagedSpec:
    """One paged call; its sizes from ``pool`` when given, else freshly drawn."""
    b, hkv, group, sq, d, bs, maxb, nb = rng.choice(pool) if pool else draw_sizes(rng)
    cap = maxb * bs if rng.random() < 0.5 else max(sq, (maxb - rng.randint(0, 2)) * bs)
    window = None
    if rng.random() < WINDOW_P:
        while window in (None, (-1, -1)):
            window = (rng.choice(WINDOW_SIDES), rng.choice(WINDOW_SIDES))
    return PagedSpec(
        batch=b, heads_kv=hkv, group=group, seq_q=sq, head_dim=d, block_size=bs,
        max_blocks=maxb, num_blocks=nb,
        lengths=tuple(draw_length(rng, sq, bs, cap) for _ in range(b)),
        dtype=rng.choice(dtypes), causal=rng.random() < 0.6,
        scale=None if rng.random() < 0.7 else round(rng.uniform(0.02, 0.3), 4),
        lse=rng.random() < 0.3, window=window,
        softcap=rng.choice(SOFTCAPS) if rng.random() < SOFTCAP_P else None,
        sinks=rng.random() < SINKS_P,
        views=tuple(v for v in VIEWS if rng.random() < 0.15), seed=rng.randrange(2**31))


@dataclass
class PagedInputs:
    q: Tensor
    k_cache: Tensor      # NaN in unused blocks and past every row's length
    v_cache: Tensor
    block_table: Tensor
    cache_seqlens: Tensor
    tail: Tensor         # (num_blocks, block_size) bool: the slots past a row's length
    sinks: Optional[Tensor]


def build(s: PagedSpec, device: torch.device) -> PagedInputs:
    g = torch.Generator(device=device).manual_seed(s.seed)
    dt, bs, nb = DTYPES[s.dtype], s.block_size, s.num_blocks
    need = [-(-n // bs) for n in s.lengths]
    perm = torch.randperm(nb, generator=g, device=device).int()
    table = torch.randint(-3, nb + 8, (s.batch, s.max_blocks), generator=g, device=device,
                          dtype=torch.int32)  # garbage past the used columns
    used = torch.zeros(nb, dtype=torch.bool, device=device)
    tail = torch.zeros(nb, bs, dtype=torch.bool, device=device)
    at = 0
    for r, (n, u) in enumerate(zip(s.lengths, need)):
        blocks = perm[at:at + u]
        table[r, :u] = blocks
        used[blocks.long()] = True
        tail[blocks[-1].long(), n - (u - 1) * bs:] = True
        at += u

    def cache() -> Tensor:
        c = torch.randn(nb, bs, s.heads_kv, s.head_dim, generator=g, device=device).to(dt)
        c[~used] = math.nan
        c[tail] = math.nan
        return c

    q = torch.randn(s.batch, s.seq_q, s.heads_q, s.head_dim, generator=g, device=device)
    sinks = torch.randn(s.heads_q, generator=g, device=device) * 2 if s.sinks else None
    lengths = torch.tensor(s.lengths, dtype=torch.int32, device=device)
    return PagedInputs(q.to(dt), cache(), cache(), table, lengths, tail, sinks)


def finite_tail(inp: PagedInputs, seed: int) -> PagedInputs:
    """A copy whose slots past each row's length hold large finite values."""
    g = torch.Generator(device=inp.q.device).manual_seed(seed + 1)
    k, v = (c.clone() for c in (inp.k_cache, inp.v_cache))
    for c in (k, v):
        junk = torch.randn(c[inp.tail].shape, generator=g, device=c.device) * 100
        c[inp.tail] = junk.to(c.dtype)
    return PagedInputs(inp.q, k, v, inp.block_table, inp.cache_seqlens, inp.tail, inp.sinks)


def with_views(inp: PagedInputs, views: tuple[str, ...]) -> PagedInputs:
    """The same values behind other memory (strides, offsets, shared storage)."""
    q, kc, vc, bt = inp.q, inp.k_cache, inp.v_cache, inp.block_table
    if "q_transposed" in views:
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    d = kc.shape[-1]
    bases = [torch.cat([kc, vc], -1)] if "kv_packed" in views else [kc, vc]
    for i, base in enumerate(bases):
        store = base.transpose(1, 2) if "heads_major" in views else base
        if "layers" in views:
            store = torch.stack([torch.full_like(store, math.nan), store])[1]
        else:
            store = store.contiguous()
        bases[i] = store.transpose(1, 2) if "heads_major" in views else store
    kc, vc = (bases[0][..., :d], bases[0][..., d:]) if len(bases) == 1 else bases
    if "table_slice" in views:
        wide = torch.full((bt.shape[0], 2 * bt.shape[1]), -7, dtype=bt.dtype, device=bt.device)
        wide[:, ::2] = bt
        bt = wide[:, ::2]
    return PagedInputs(q, kc, vc, bt, inp.cache_seqlens, inp.tail, inp.sinks)


def reference(s: PagedSpec, inp: PagedInputs) -> list[Optional[Tensor]]:
    """Float64 [out (B, Sq, Hq, D), lse (B, Hq, Sq) or None, None x 4] on the device:
    row b's keys are slot j % bs of block table[b, j // bs] for j < L_b (one
    indexing op per row), one dense float64 call per row (Sk = L_b)."""
    outs, lses = [], []
    sinks = None if inp.sinks is None else inp.sinks.double()
    for b, n in enumerate(s.lengths):
        j = torch.arange(n, device=inp.q.device)
        blocks = inp.block_table[b].long()[j // s.block_size]
        k, v = (c[blocks, j % s.block_size].double().transpose(0, 1)[None]
                for c in (inp.k_cache, inp.v_cache))
        o, lse = reference_attention(inp.q[b].double().transpose(0, 1)[None], k, v,
                                     sinks=sinks, **s.options())
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return [torch.stack(outs), torch.stack(lses) if s.lse else None, None, None, None, None]


def run(backend: str, s: PagedSpec, inp: PagedInputs) -> list[Optional[Tensor]]:
    """[out, lse or None, None x 4] of one backend."""
    with torch.no_grad():
        res = ad.attention_paged(inp.q, inp.k_cache, inp.v_cache, block_table=inp.block_table,
                                 cache_seqlens=inp.cache_seqlens, sinks=inp.sinks,
                                 return_lse=s.lse, backend=backend, **s.options())
    out, lse = res if s.lse else (res, None)
    want = (s.batch, s.seq_q, s.heads_q, s.head_dim)
    if tuple(out.shape) != want or out.dtype != DTYPES[s.dtype]:
        raise AssertionError(f"out {tuple(out.shape)} {out.dtype}; expected {want} {s.dtype}")
    return [out, lse, None, None, None, None]


def route(backend: str, s: PagedSpec, inp: PagedInputs) -> tuple[Optional[str], list[str]]:
    """("native" | "gathered", []) if ``backend`` takes the call, else (None, reasons)."""
    d = ad.explain_paged(inp.q, inp.k_cache, inp.v_cache, block_table=inp.block_table,
                         cache_seqlens=inp.cache_seqlens, sinks=inp.sinks, return_lse=s.lse,
                         backend=backend, **s.options())
    if d.backend is None:
        return None, list(d.reasons(backend))
    note = next(v.note for v in d.verdicts if v.name == backend) or ""
    return ("native" if note.startswith("route: native") else "gathered"), []


def run_backends(i: int, s: PagedSpec, inp: PagedInputs, ref: list[Optional[Tensor]],
                 cfg: Any, tally: Any) -> tuple[list[tuple[str, list[Tensor]]], dict[str, str]]:
    """Every backend but math on paged example ``i``: (name, errors) of those that
    ran, and name -> error of those that accepted the call and raised."""
    per: list[tuple[str, list[Tensor]]] = []
    crashed: dict[str, str] = {}
    tail_inp: Optional[PagedInputs] = None
    for name in cfg.backends:
        if name == "math":
            continue
        counts = tally.counts[name]
        if i % cfg.every.get(name, 1) or (cfg.budget_s and tally.seconds[name] > cfg.budget_s):
            counts["skipped"] += 1
            continue
        t0 = time.perf_counter()
        how: Optional[str] = None
        try:
            how, why = route(name, s, inp)
            if how is None:
                counts["refused"] += 1
                counts["paged refused"] += 1
                for r in [r for r in why if not r.startswith("native: ")] or why or ["?"]:
                    tally.reasons[name]["paged: " + r[:110]] += 1
                continue
            use = inp
            if how == "native" and ad.get_backend(name).paged_reads_tail:
                tail_inp = tail_inp or with_views(finite_tail(inp, s.seed), s.views)
                use = tail_inp
            counts["run"] += 1
            counts[f"paged {how}"] += 1
            per.append((name, errors(run(name, s, use), ref)))
        except Exception as exc:  # accepted the call (or explain broke): a violation
            counts["run"] += how is None
            crashed[name] = describe(exc)
        finally:
            tally.seconds[name] += time.perf_counter() - t0
    return per, crashed


def math_check(s: PagedSpec, ref: list[Optional[Tensor]], errs: list[Tensor]
               ) -> dict[str, str]:
    """math (the baseline; it shares nothing with the reference but
    ``reference_attention``) within atol(dtype) of the reference in float64 and
    10 atol(dtype) otherwise (lse: float32's atol for float64): a paged bug
    common to every route is not hidden by the relative rule."""
    values = torch.stack([e.double().reshape(()) for e in errs + magnitudes(ref)]).tolist()
    k = len(errs)
    bad = {}
    for name, e, top in zip(("out", "lse"), values[:k], values[k:]):
        fp64 = s.dtype == "fp64"
        dt = torch.float32 if fp64 and name == "lse" else DTYPES[s.dtype]
        bound = (1 if fp64 else 10) * atol(dt) * (1 + top)
        if not e <= bound:
            bad[name] = f"error {e:.4g} > {bound:.4g} (math against the reference)"
    return bad


def one_example(i: int, s: PagedSpec, cfg: Any, tally: Any) -> None:
    """Check every backend on one paged call; count into ``tally`` (gpu_fuzz.Tally)."""
    tally.counts["math"]["run"] += 1
    tally.counts["math"]["paged native"] += 1
    viol: Optional[dict[str, dict[str, str]]] = None
    t0 = time.perf_counter()
    try:
        plain = build(s, cfg.device)
        inp = with_views(plain, s.views)
        ref = reference(s, plain)
        base = run("math", s, inp)
    except Exception as exc:  # the baseline itself broke: counted against math
        viol = {"math": {"raised": "paged reference or math: " + describe(exc)}}
    tally.seconds[BASELINE] += time.perf_counter() - t0
    if viol is None:
        per, crashed = run_backends(i, s, inp, ref, cfg, tally)
        base_errs = errors(base, ref)
        viol = judge(s, ref, [("math", base_errs)] + per, crashed)
        bad = math_check(s, ref, base_errs)
        if bad:
            viol["math"] = bad
    for name, what in viol.items():
        tally.counts[name]["violations"] += 1
        tally.n_viol += 1
        if len(tally.listed) < cfg.max_listed:
            tally.listed.append({"example": i, "backend": name, "kind": "paged",
                                 "spec": asdict(s), "failures": what})
            print(f"VIOLATION paged example {i} {name}: {what}\n  {s}", file=sys.stderr)


def spec_of(d: dict[str, Any]) -> PagedSpec:
    """A PagedSpec from its JSON form (a report's violation)."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return PagedSpec(**fields)


def summary_lines(r: dict[str, Any]) -> list[str]:
    """Per backend, its paged examples by route (for the printed summary)."""
    out = []
    for n, c in r["backends"].items():
        parts = [f"{k[6:]} {c[k]}" for k in ("paged native", "paged gathered", "paged refused")
                 if c.get(k)]
        if parts:
            out.append(f"  paged {n}: " + ", ".join(parts))
    return out
