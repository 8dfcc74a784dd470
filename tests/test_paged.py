"""attention_paged on the CPU: every route against a float64 reference built
from the block table in the test (tests/_paged.py), the bad arguments, the
decision and explain_paged."""

from __future__ import annotations

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch.testing import atol
from _paged import make_case, max_err, paged_reference

CASES = [  # (lengths, Sq, Hq, Hkv, D, block_size)
    ([5, 1, 33, 16], 1, 4, 2, 16, 16),       # decode, GQA, partial last blocks
    ([70, 3, 128, 129], 3, 4, 4, 8, 16),     # prefill chunk, MHA, full and partial blocks
    ([300, 9, 128], 2, 6, 2, 16, 128),       # block size 128, GQA group 3
    ([7, 12, 2], 2, 3, 1, 8, 4),             # a small block size, MQA
    ([3, 5], 1, 2, 1, 8, 1),                 # one slot per block
]


def _run(case, **kw):
    with torch.no_grad():
        return ad.attention_paged(case.q, case.k_cache, case.v_cache,
                                  block_table=case.block_table,
                                  cache_seqlens=case.cache_seqlens, **kw)


@pytest.mark.parametrize("lengths,sq,hq,hkv,d,bs", CASES)
@pytest.mark.parametrize("opts", [dict(), dict(causal=False), dict(window=(4, 0)),
                                  dict(causal=False, window=(3, 2), softcap=2.0),
                                  dict(softcap=1.5, scale=0.3)], ids=str)
def test_math_equals_reference(lengths, sq, hq, hkv, d, bs, opts):
    """float64 math with NaN in every unused slot and block and garbage in the
    table past each row's used blocks: the reference's result, out and lse."""
    case = make_case(lengths, sq, hq, hkv, d, bs, dtype=torch.float64, seed=len(lengths) + d)
    out, lse = _run(case, backend="math", return_lse=True, **opts)
    ref, ref_lse = paged_reference(case, **opts)
    assert out.shape == ref.shape and out.dtype == torch.float64
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert max_err(out, ref) <= 1e-10
    assert max_err(lse, ref_lse) <= 2e-5 * (1 + ref_lse.abs().max().item())


@pytest.mark.parametrize("opts", [dict(), dict(causal=False, window=(3, 0))],
                         ids=str)
def test_sinks_on_math_and_the_gathered_route(opts):
    """sinks= (one logit per query head): math natively and sdpa-flash through the
    gathered dense call, against the reference with the sink as an extra column;
    the lse includes the sink."""
    case = make_case([5, 1, 33, 16], 1, 4, 2, 16, 16, dtype=torch.float64, seed=11)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    ref, ref_lse = paged_reference(case, sinks=sinks, **opts)
    out, lse = _run(case, backend="math", return_lse=True, sinks=sinks, **opts)
    assert max_err(out, ref) <= 1e-10 and max_err(lse, ref_lse) <= 1e-5
    plain, _ = paged_reference(case, **opts)
    assert (ref - plain).abs().max() > 1e-3  # the sink changes the answer
    case32 = make_case([5, 1, 33, 16], 1, 4, 2, 16, 16, dtype=torch.float32, seed=11)
    ref32, _ = paged_reference(case32, sinks=sinks, **opts)
    got = _run(case32, backend="sdpa-flash", sinks=sinks.float(), **opts)
    base = _run(case32, backend="math", sinks=sinks.float(), **opts)
    assert max_err(got, ref32) <= 2 * max_err(base, ref32) + atol(torch.float32)
    with pytest.raises(ad.AttentionInputError, match="sinks"):  # forward-only
        ad.attention_paged(case32.q, case32.k_cache, case32.v_cache,
                           block_table=case32.block_table, cache_seqlens=case32.cache_seqlens,
                           sinks=sinks.float().requires_grad_())


def _rule(backend: str, case, dtype: torch.dtype, **opts) -> None:
    ref, ref_lse = paged_reference(case, **opts)
    math_out = _run(case, backend="math", **opts)
    out = _run(case, backend=backend, **opts)
    bound = 2 * max_err(math_out, ref) + atol(dtype) * (1 + ref.abs().max().item())
    err = max_err(out, ref)
    assert err <= bound, f"{backend}: {err} > {bound}"


@pytest.mark.parametrize("backend", ["sdpa-flash", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [dict(), dict(causal=False), dict(window=(5, 0))], ids=str)
def test_gathered_route_obeys_the_rule(backend, dtype, opts):
    """Backends without native paging run the gathered dense call: exact per
    row (right-aligned keys) under the contract's accuracy rule."""
    case = make_case([40, 2, 17, 64], 2, 4, 2, 16, 16, dtype=dtype, seed=3)
    d = ad.explain_paged(case.q, case.k_cache, case.v_cache, block_table=case.block_table,
                         cache_seqlens=case.cache_seqlens, backend=backend, **opts)
    if d.backend is None:
        pytest.skip(f"{backend} refuses: {d.reasons(backend)}")
    assert [v.note for v in d.verdicts if v.name == backend] == ["route: gathered to a "
                                                                "dense batch"]
    _rule(backend, case, dtype, **opts)


def test_views_and_return_lse_on_the_gathered_route():
    """q as a transposed view, caches as a slice of a larger (layers) tensor."""
    case = make_case([20, 9], 3, 4, 2, 16, 8, dtype=torch.float64, seed=5)
    layers_k = torch.stack([torch.full_like(case.k_cache, 7.0), case.k_cache])
    layers_v = torch.stack([torch.full_like(case.v_cache, 7.0), case.v_cache])
    case.k_cache, case.v_cache = layers_k[1], layers_v[1]
    case.q = case.q.transpose(1, 2).contiguous().transpose(1, 2)
    ref, ref_lse = paged_reference(case)
    for backend in ("math", "sdpa-flash"):
        out, lse = _run(case, backend=backend, return_lse=True)
        assert max_err(out, ref) <= 1e-6
        assert max_err(lse, ref_lse) <= 1e-4


@pytest.fixture
def cpu_flex(monkeypatch):
    # small calls, still compiled (the instance: another test's monkeypatch may
    # have left an instance attribute that shadows the class's)
    monkeypatch.setattr(ad.get_backend("flex"), "min_cpu_scores", 0)


@pytest.mark.parametrize("lengths,sq,hq,hkv,bs,opts", [
    ([5, 1, 33, 16], 1, 4, 2, 16, dict(window=(9, 0))),
    ([70, 3, 128, 129], 3, 4, 4, 32, dict(softcap=2.0)),
], ids=["decode-gqa-window", "prefill-softcap"])
def test_flex_native_route(cpu_flex, lengths, sq, hq, hkv, bs, opts):
    """flex's block-table mask (compiled, inference-only on the CPU): NaN in
    unused blocks, garbage past each row's used table entries, and large
    finite values in the slots past a row's length (its last block is read
    whole: they must be finite, and change nothing)."""
    case = make_case(lengths, sq, hq, hkv, 32, bs, seed=7, tail=1e3)
    d = ad.explain_paged(case.q, case.k_cache, case.v_cache, block_table=case.block_table,
                         cache_seqlens=case.cache_seqlens, backend="flex", **opts)
    assert d.backend == "flex" and d.verdicts[0].note.startswith("route: native"), str(d)
    assert "slots past its length must be finite" in d.verdicts[0].note
    _rule("flex", case, torch.float32, **opts)


def test_flex_native_limits_are_explained(cpu_flex):
    """A block size flex cannot page natively: the gathered route, and the
    note says why not native."""
    case = make_case([5, 9], 1, 2, 2, 32, 4)
    d = ad.explain_paged(case.q, case.k_cache, case.v_cache, block_table=case.block_table,
                         cache_seqlens=case.cache_seqlens, backend="flex")
    note = d.verdicts[0].note
    assert note.startswith("route: gathered") and "block_size=4; allowed: a power of two" in note
    with pytest.raises(ad.BackendUnavailable, match="LSE"):
        _run(make_case([5, 9], 1, 2, 2, 32, 16), backend="flex", return_lse=True)


def test_decision_cached_per_signature_and_native_first():
    from attention_dispatch._core import paged

    case = make_case([5, 19], 1, 4, 2, 16, 16)
    _run(case)
    _run(case)
    plans = list(paged._plans.values())
    # math's native route gathers too (paged_gathers): it ranks among the gathered
    # routes, so sdpa-flash (first on the CPU, through the copy) runs the call
    assert len(plans) == 1 and not plans[0].native and plans[0].backend.name == "sdpa-flash"
    d = ad.explain_paged(case.q, case.k_cache, case.v_cache, block_table=case.block_table,
                         cache_seqlens=case.cache_seqlens)
    assert d.backend == "sdpa-flash" and d.verdicts[0].note == "route: gathered to a dense batch"
    assert "paged block_size=16" in str(d)
    ad.clear_cache()
    assert not paged._plans


class SpyPaged(ad.Backend):
    """Pages "in place" (math's computation underneath), ranked last; counts
    its paged calls."""

    ranking = {"*": "last"}
    capabilities = ad.get_backend("math").capabilities

    def __init__(self) -> None:
        self.math = ad.get_backend("math")
        self.paged_calls = 0

    def forward(self, q, k, v, **kw):
        return self.math.forward(q, k, v, **kw)

    def forward_paged(self, q, k_cache, v_cache, **kw):
        self.paged_calls += 1
        return self.math.forward_paged(q, k_cache, v_cache, **kw)


def test_a_native_route_reading_the_cache_in_place_goes_first(register_temp):
    """A backend that pages in place (not ``paged_gathers``) is chosen ahead of
    every gathered route, even ranked last; math's own native route is not."""
    register_temp("spy-paged", SpyPaged)
    case = make_case([5, 19], 1, 4, 2, 16, 16)
    d = ad.explain_paged(case.q, case.k_cache, case.v_cache, block_table=case.block_table,
                         cache_seqlens=case.cache_seqlens)
    assert d.backend == "spy-paged"
    want, _ = paged_reference(case)
    assert max_err(_run(case), want) <= atol(torch.float32)
    assert ad.get_backend("spy-paged").paged_calls == 1


def test_empty_batch():
    case = make_case([5], 1, 2, 1, 8, 4)
    q = case.q[:0]
    out = ad.attention_paged(q, case.k_cache, case.v_cache, block_table=case.block_table[:0],
                             cache_seqlens=case.cache_seqlens[:0])
    assert out.shape == (0, 1, 2, 8)


# ----------------------------------------------------------------- errors


def _bad(case, exc, match, **kw):
    args = dict(block_table=case.block_table, cache_seqlens=case.cache_seqlens)
    q, kc, vc = kw.pop("q", case.q), kw.pop("k_cache", case.k_cache), kw.pop("v_cache",
                                                                            case.v_cache)
    args.update(kw)
    with pytest.raises(exc, match=match):
        ad.attention_paged(q, kc, vc, **args)
    with pytest.raises(exc, match=match):  # explain validates the same way
        ad.explain_paged(q, kc, vc, **args)


def test_bad_tensors():
    c = make_case([5, 9], 2, 4, 2, 8, 4)
    E, T = ad.AttentionInputError, ad.AttentionTypeError
    _bad(c, T, "q", q=c.q.numpy())
    _bad(c, E, "q", q=c.q[0])
    _bad(c, T, "k_cache", k_cache=c.k_cache.double())
    _bad(c, E, "k_cache", k_cache=c.k_cache[..., :4])
    _bad(c, E, "v_cache", v_cache=c.v_cache[:, :2])
    _bad(c, E, "k_cache", k_cache=c.k_cache[:, :, :1].expand(-1, -1, 3, -1),
         v_cache=c.v_cache[:, :, :1].expand(-1, -1, 3, -1))
    _bad(c, E, "k_cache", k_cache=c.k_cache[:0], v_cache=c.v_cache[:0])
    _bad(c, T, "block_table", block_table=c.block_table.long())
    _bad(c, T, "block_table", block_table=c.block_table.tolist())
    _bad(c, E, "block_table", block_table=c.block_table[0])
    _bad(c, E, "block_table", block_table=c.block_table[:1])
    _bad(c, T, "cache_seqlens", cache_seqlens=c.cache_seqlens.long())
    _bad(c, E, "cache_seqlens", cache_seqlens=c.cache_seqlens[:1])
    _bad(c, T, "causal", causal=1)
    _bad(c, E, "window", window=(-2, 0))
    _bad(c, E, "softcap", softcap=-1.0)
    _bad(c, E, "scale", scale=float("inf"))


def test_bad_values():
    c = make_case([5, 9], 2, 4, 2, 8, 4)  # 3 blocks a row at most
    E = ad.AttentionInputError
    _bad(c, E, r"cache_seqlens.*13 in row 1",
         cache_seqlens=torch.tensor([5, 13], dtype=torch.int32))
    _bad(c, E, r"cache_seqlens.*1 in row 0",
         cache_seqlens=torch.tensor([1, 9], dtype=torch.int32))  # < Sq
    for value in (c.k_cache.shape[0], -1):
        table = c.block_table.clone()
        table[1, 2] = value
        _bad(c, E, rf"block_table.*{value} at row 1, column 2", block_table=table)
    table = c.block_table.clone()
    table[1, 2] = table[1, 0]
    _bad(c, E, "block_table.*twice in row 1", block_table=table)
    table = c.block_table.clone()
    table[0, 2] = 10 ** 6  # row 0 uses 2 blocks: column 2 is never read
    ad.attention_paged(c.q, c.k_cache, c.v_cache, block_table=table,
                       cache_seqlens=c.cache_seqlens)


def test_table_checks_remembered_by_value():
    """The table's checks are remembered by its values and each row's block count:
    a table (or lengths) changed in place between calls is checked again."""
    c = make_case([5, 9], 2, 4, 2, 8, 4)
    kw = dict(block_table=c.block_table, cache_seqlens=c.cache_seqlens)
    ad.attention_paged(c.q, c.k_cache, c.v_cache, **kw)  # checked, remembered
    saved = c.block_table[1, 2].item()
    c.block_table[1, 2] = c.k_cache.shape[0]  # in place: same tensor, new values
    with pytest.raises(ad.AttentionInputError, match="block_table.*at row 1, column 2"):
        ad.attention_paged(c.q, c.k_cache, c.v_cache, **kw)
    c.block_table[1, 2] = saved
    c.block_table[0, 2] = 10 ** 6  # row 0 uses 2 blocks: column 2 unused ...
    ad.attention_paged(c.q, c.k_cache, c.v_cache, **kw)
    c.cache_seqlens[0] = 9  # ... until row 0 grows into it
    with pytest.raises(ad.AttentionInputError, match="block_table.*at row 0, column 2"):
        ad.attention_paged(c.q, c.k_cache, c.v_cache, **kw)


def test_check_values_false_skips_the_host_read(monkeypatch):
    """check_values=False: the same answer on valid values, and the table and
    lengths are never read on the host (no synchronisation in a decode loop);
    shapes are still checked."""
    from attention_dispatch._core import paged as core_paged

    c = make_case([5, 1, 33, 16], 1, 4, 2, 16, 16)
    want, _ = paged_reference(c)
    checked = _run(c, backend="math")

    def read(*a, **k):
        raise AssertionError("the values were read")

    monkeypatch.setattr(core_paged, "check_paged_values", read)
    got = _run(c, backend="math", check_values=False)
    assert torch.equal(got, checked)
    assert max_err(got, want) <= atol(torch.float32)
    with pytest.raises(AssertionError, match="values were read"):
        _run(c, backend="math")
    with pytest.raises(ad.AttentionInputError, match="cache_seqlens"):
        ad.attention_paged(c.q, c.k_cache, c.v_cache, block_table=c.block_table,
                           cache_seqlens=c.cache_seqlens[:2], check_values=False)


def test_the_remembered_signature_keeps_every_check():
    """After a call is remembered (its metadata checked in C on the next call),
    a call that differs in any checked fact is validated again: bad shapes,
    dtypes and grad mode still raise typed errors, and other options get their
    own plan and the right answer."""
    from attention_dispatch._core import paged as core_paged

    c = make_case([5, 1, 33, 16], 1, 4, 2, 16, 16)
    want, _ = paged_reference(c)
    for _ in range(2):  # the second call is the remembered one
        got = _run(c)
    assert core_paged._last[0] is not None
    assert max_err(got, want) <= atol(torch.float32)
    kw = dict(block_table=c.block_table, cache_seqlens=c.cache_seqlens)
    with pytest.raises(ad.AttentionTypeError, match="block_table"):
        ad.attention_paged(c.q, c.k_cache, c.v_cache, block_table=c.block_table.long(),
                           cache_seqlens=c.cache_seqlens)
    with pytest.raises(ad.AttentionInputError, match="cache_seqlens"):
        ad.attention_paged(c.q, c.k_cache, c.v_cache, block_table=c.block_table,
                           cache_seqlens=c.cache_seqlens[:2])
    with pytest.raises(ad.AttentionInputError, match="q"):
        ad.attention_paged(c.q.clone().requires_grad_(), c.k_cache, c.v_cache, **kw)
    with torch.no_grad():  # the same tensors are fine without grad mode ...
        ad.attention_paged(c.q.clone().requires_grad_(), c.k_cache, c.v_cache, **kw)
        ad.attention_paged(c.q.clone().requires_grad_(), c.k_cache, c.v_cache, **kw)
    with pytest.raises(ad.AttentionInputError, match="q"):  # ... and refused again with it
        ad.attention_paged(c.q.clone().requires_grad_(), c.k_cache, c.v_cache, **kw)
    want_w, _ = paged_reference(c, window=(4, 0))
    assert max_err(_run(c, window=(4, 0)), want_w) <= atol(torch.float32)
    bad = c.block_table.clone()
    bad[1, 0] = c.k_cache.shape[0]  # values are checked on every call
    with pytest.raises(ad.AttentionInputError, match="block_table"):
        ad.attention_paged(c.q, c.k_cache, c.v_cache, block_table=bad,
                           cache_seqlens=c.cache_seqlens)
    ad.clear_cache()
    assert core_paged._last[0] is None


def test_gradients_are_refused():
    c = make_case([5, 9], 2, 4, 2, 8, 4)
    for name in ("q", "k_cache", "v_cache"):
        t = getattr(c, name).clone().requires_grad_(True)
        with pytest.raises(ad.AttentionInputError, match="forward-only"):
            ad.attention_paged(**{"q": c.q, "k_cache": c.k_cache, "v_cache": c.v_cache,
                                  name: t}, block_table=c.block_table,
                               cache_seqlens=c.cache_seqlens)
    with torch.no_grad():  # no gradient needed: fine
        ad.attention_paged(c.q.clone().requires_grad_(True), c.k_cache, c.v_cache,
                           block_table=c.block_table, cache_seqlens=c.cache_seqlens)


def test_compiled_call_matches_eager():
    """Under torch.compile the values are not checked and the result is the same."""
    case = make_case([5, 19], 1, 4, 2, 16, 16, poison=False, garbage_table=False)

    def f(q, kc, vc, bt, sl):
        return ad.attention_paged(q, kc, vc, block_table=bt, cache_seqlens=sl, backend="math")

    eager = f(case.q, case.k_cache, case.v_cache, case.block_table, case.cache_seqlens)
    compiled = torch.compile(f, backend="eager")(case.q, case.k_cache, case.v_cache,
                                                 case.block_table, case.cache_seqlens)
    assert torch.allclose(eager, compiled)


def test_paged_bench_script_smoke_on_cpu(tmp_path):
    """bench/paged_bench.py (a GPU benchmark) runs end to end on the CPU with
    tiny sizes: every timed call agrees with the dense math result."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "paged_bench.py"
    spec = importlib.util.spec_from_file_location("paged_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    for lengths in ("full", "mixed"):
        assert mod.main(["--device", "cpu", "--batch", "3", "--heads", "4", "2", "--head-dim",
                         "16", "--seq", "32", "--block-size", "8", "--lengths", lengths,
                         "--rounds", "2", "--out", str(out)]) == 0
        res = json.loads(out.read_text())
        assert {"paged:auto", "dense:auto"} <= set(res["us"])
        assert max(res["max_err"].values()) < 1e-5


def test_flex_paged_limits_as_data():
    """flex's paged limits per device (a pure function of the CallSpec)."""
    from attention_dispatch.adapters.paged_flex import paged_reasons

    spec = ad.CallSpec("cuda", 0, torch.bfloat16, 2, 8, 2, 1, 4096, 128, 128, layout="bshd",
                       paged=True, block_size=16)
    assert paged_reasons(spec) == []
    assert "Sq=256 on CUDA" in " ".join(paged_reasons(spec.__class__(
        **{**spec.__dict__, "seq_q": 256})))
    assert "GQA group 3" in " ".join(paged_reasons(spec.__class__(
        **{**spec.__dict__, "heads_q": 6})))
    assert paged_reasons(spec.__class__(**{**spec.__dict__, "device_type": "cpu",
                                           "seq_q": 256, "heads_q": 6})) == []
    assert "block_size=48" in " ".join(paged_reasons(spec.__class__(
        **{**spec.__dict__, "block_size": 48})))


class _BrokenPaged(ad.Backend):
    """A paged kernel that raises at run time, ranked first for paged CPU calls."""

    name = "broken-paged"
    ranking = {"cpu/paged": "first"}
    capabilities = ad.Capabilities(device_types=frozenset({"cpu"}),
                                   dtypes=frozenset({torch.float32}), backward=False,
                                   extras=frozenset({"paged"}))

    def forward(self, q, k, v, **kw):  # type: ignore[no-untyped-def]
        raise RuntimeError("dense calls are not under test")

    def forward_paged(self, q, k_cache, v_cache, **kw):  # type: ignore[no-untyped-def]
        raise RuntimeError("kernel launch failed")


def test_a_native_route_failing_at_run_time_falls_back():
    """auto: the failing backend is demoted for the signature (warned once) and the
    next route runs; a forced selection raises BackendRuntimeError."""
    ad.register_backend(_BrokenPaged.name)(_BrokenPaged)
    try:
        c = make_case([5, 9], 2, 4, 2, 8, 4)
        kw = dict(block_table=c.block_table, cache_seqlens=c.cache_seqlens)
        assert ad.explain_paged(c.q, c.k_cache, c.v_cache, **kw).backend == _BrokenPaged.name
        with pytest.warns(ad.FallbackWarning, match="kernel launch failed"):
            out = ad.attention_paged(c.q, c.k_cache, c.v_cache, **kw)
        ref, _ = paged_reference(c)
        assert max_err(out, ref) <= 1e-5
        again = ad.attention_paged(c.q, c.k_cache, c.v_cache, **kw)  # the new plan, no retry
        assert torch.equal(again, out)
        with pytest.raises(ad.BackendRuntimeError, match="kernel launch failed"):
            ad.attention_paged(c.q, c.k_cache, c.v_cache, backend=_BrokenPaged.name, **kw)
    finally:
        ad.unregister_backend(_BrokenPaged.name)
        ad.clear_cache()


def test_paged_host_cost_script_runs_on_cpu(tmp_path):
    """bench/paged_host_cost.py (in its own process: it registers a backend) runs
    and reports all three calls; the GPU decode scripts at least import."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    out = tmp_path / "host.json"
    run = subprocess.run([sys.executable, str(bench / "paged_host_cost.py"), "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    us = json.loads(out.read_text())["us"]
    assert set(us) == {"paged, checked", "paged, check_values=False", "dense (same keys, bshd)"}
    assert all(t > 0 for t in us.values())
    code = "import decode_profile, triton_decode_tune"
    imp = subprocess.run([sys.executable, "-c", code], cwd=bench, capture_output=True,
                         text=True, timeout=120)
    assert imp.returncode == 0, imp.stderr[-2000:]


def test_no_route_runs_twice_in_one_call(tmp_path):
    """Should a failing backend's demotion not exclude it (demotion disabled
    here), a paged call raises the kernel's error instead of retrying the same
    route forever (in a subprocess with a timeout: a loop would hang)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import sys
sys.path[:0] = [{str(Path(__file__).parent)!r}]
import torch, attention_dispatch as ad
from attention_dispatch._core import reliability
from test_paged import _BrokenPaged, make_case
reliability.demote = lambda *a, **k: None
ad.register_backend(_BrokenPaged.name)(_BrokenPaged)
c = make_case([5, 9], 2, 4, 2, 8, 4)
try:
    ad.attention_paged(c.q, c.k_cache, c.v_cache, block_table=c.block_table,
                       cache_seqlens=c.cache_seqlens, backend="broken-paged,auto")
except RuntimeError as exc:
    print("RAISED", type(exc).__name__, exc)
"""
    env = dict(os.environ, ATTENTION_DISPATCH_CANARY="0")  # so the broken backend runs
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, env=env)
    except subprocess.TimeoutExpired:
        raise AssertionError("the paged call retried one route without end") from None
    assert "RAISED RuntimeError kernel launch failed" in run.stdout, (
        run.stdout[-1000:] + run.stderr[-2000:])
