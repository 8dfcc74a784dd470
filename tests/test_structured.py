"""Sliding windows, softcap, ALiBi and the LSE on every CPU backend that
declares them, against the float64 reference; the reference itself against
the plain definitions; refusals with reasons; errors for bad arguments before
any kernel; the decision cache and the torch.compile key."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch import testing
from attention_dispatch._core.capabilities import Capabilities, capability_reasons
from attention_dispatch._core.spec import CallSpec, window_has_empty_rows

CASES = testing.structured_cases()
FP64 = testing.structured_cases(dtypes=(torch.float64,))


def _check(name: str, case: testing.Case) -> None:
    try:
        assert testing.check_backend(name, case, "cpu").ok
    except ad.BackendUnavailable as exc:
        if name == "math":
            pytest.fail(f"math must take every structured case, refused {case}:\n{exc}")
        why = "; ".join(exc.reasons.get(name, []))
        assert why, f"{name} refused {case} without a reason"
        pytest.skip(f"{name} refuses {case}: {why}")


@pytest.mark.parametrize("case", CASES + FP64, ids=str)
def test_structured_conformance(cpu_backend, case):
    _check(cpu_backend, case)


def test_cases_cover_every_feature():
    cases = testing.structured_cases(dtypes=(torch.float32,))
    assert any(c.window and c.causal for c in cases) and any(c.window and not c.causal
                                                             for c in cases)
    assert any(c.window and c.seq_q > c.seq_k for c in cases)
    assert any(c.window and c.grad for c in cases) and any(c.window and c.lse for c in cases)
    assert {c.alibi for c in cases} == {"none", "heads", "batch"}
    assert any(c.softcap and c.grad for c in cases) and any(c.softcap and c.lse for c in cases)
    assert any(c.alibi != "none" and c.softcap and c.window for c in cases)
    assert any(c.heads_kv == 1 and c.softcap for c in cases)


# --------------------------------------------------- the reference, plainly


def _qkv(b=2, h=3, sq=9, sk=13, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
                 for s in (sq, sk, sk))


@pytest.mark.parametrize("window,causal", [((2, 1), False), ((3, -1), True), ((-1, 0), False),
                                           ((0, 0), True), ((5, 5), True)])
def test_reference_window_is_the_band_mask(window, causal):
    q, k, v = _qkv()
    sq, sk = q.shape[2], k.shape[2]
    i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
    centre = i + sk - sq
    band = torch.ones(sq, sk, dtype=torch.bool)
    if window[0] >= 0:
        band &= j >= centre - window[0]
    if window[1] >= 0:
        band &= j <= centre + window[1]
    want = testing.reference_attention(q, k, v, mask=band, causal=causal)
    got = testing.reference_attention(q, k, v, window=window, causal=causal)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_reference_alibi_and_softcap_are_the_formulas():
    q, k, v = _qkv()
    sq, sk = q.shape[2], k.shape[2]
    slopes = torch.tensor([[0.5, 0.25, 0.125], [1.0, 0.1, 0.01]])
    dist = (torch.arange(sq)[:, None] + sk - sq - torch.arange(sk)[None, :]).abs().double()
    bias = -slopes.double()[:, :, None, None] * dist
    for a, b in zip(testing.reference_attention(q, k, v, alibi_slopes=slopes),
                    testing.reference_attention(q, k, v, mask=bias)):
        torch.testing.assert_close(a, b)
    s = torch.einsum("bhid,bhjd->bhij", q, k) / 8 ** 0.5
    capped = 2.0 * torch.tanh(s / 2.0)
    out, lse = testing.reference_attention(q, k, v, softcap=2.0)
    torch.testing.assert_close(lse, torch.logsumexp(capped, -1))
    torch.testing.assert_close(out, torch.softmax(capped, -1) @ v)


def test_softcap_applies_before_the_float_mask():
    """c * tanh(s / c) caps the scores only: a float mask added after it is not capped."""
    q, k, v = _qkv(b=1, h=1, sq=4, sk=4)
    bias = torch.full((4, 4), -100.0, dtype=torch.float64)
    bias.fill_diagonal_(0.0)
    out, _ = testing.reference_attention(q, k, v, mask=bias, softcap=1.0)
    torch.testing.assert_close(out[0, 0], v[0, 0], atol=1e-12, rtol=0)
    got = ad.attention(q, k, v, mask=bias, softcap=1.0, backend="math")
    torch.testing.assert_close(got, out)


# ----------------------------------------------------------- semantics


def test_full_window_is_no_window():
    q, k, v = _qkv()
    spec = ad.explain(q, k, v, window=(-1, -1)).spec
    assert spec.window is None
    torch.testing.assert_close(ad.attention(q, k, v, window=(-1, -1), backend="math"),
                               ad.attention(q, k, v, backend="math"))
    assert ad.explain(q, k, v, softcap=0.0).spec.softcap is None  # 0 = off (flash-attn)


@pytest.mark.parametrize("sq,sk,window,causal", [(19, 7, (0, 0), False), (7, 19, (2, 0), True),
                                                 (5, 5, (1, 1), False), (12, 5, (3, -1), True),
                                                 (4, 30, (-1, 0), False), (9, 0, (1, 1), False)])
def test_window_empty_rows_are_predicted(sq, sk, window, causal):
    """CallSpec.may_have_empty_rows must see every row a window leaves without keys
    (the dispatcher's row fix for kernels that need it depends on it)."""
    i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
    d = j - (i + sk - sq)
    keep = torch.ones(sq, sk, dtype=torch.bool)
    keep &= d >= -window[0] if window[0] >= 0 else keep
    keep &= d <= window[1] if window[1] >= 0 else keep
    keep &= d <= 0 if causal else keep
    assert window_has_empty_rows(sq, sk, window, causal) == bool((~keep.any(-1)).any())


@pytest.mark.parametrize("name", ["math", "sdpa-flash"])
def test_window_empty_rows_give_zero_and_zero_grads(name):
    q, k, v = (t.float().requires_grad_() for t in _qkv(sq=12, sk=5))
    out = ad.attention(q, k, v, window=(1, 0), backend=name)
    _, lse = ad.attention(q.detach(), k.detach(), v.detach(), window=(1, 0), backend="math",
                          return_lse=True)
    dead = torch.isneginf(lse)
    assert dead.any() and (out[dead] == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[dead] == 0).all()


def test_lse_on_every_cpu_backend_that_declares_it(cpu_backend):
    case = replace(testing.Case(), lse=True, window=(3, 1), causal=True, alibi="heads",
                   seq_q=10, seq_k=14)
    _check(cpu_backend, case)


def test_auto_routes_around_backends_that_refuse():
    q, k, v = (t.float() for t in _qkv())
    d = ad.explain(q, k, v, softcap=5.0)
    assert any(r.startswith("softcap=5.0; allowed: no softcap") for r in d.reasons("sdpa-flash"))
    assert d.backend is not None and ad.get_backend(d.backend).capabilities.softcap
    torch.testing.assert_close(ad.attention(q, k, v, softcap=5.0),
                               testing.reference_attention(q, k, v, softcap=5.0)[0].float())


@pytest.mark.parametrize("feature,kw,text", [("window", dict(window=(2, 2)), "window=(2, 2)"),
                                             ("softcap", dict(softcap=3.0), "softcap=3.0"),
                                             ("alibi", dict(alibi=True), "alibi_slopes"),
                                             ("varlen", dict(varlen=True), "varlen")])
def test_every_backend_declares_or_refuses_with_reason(feature, kw, text):
    """The new Capabilities fields default to False; an undeclared feature is
    refused by the generic checker with a reason naming it."""
    spec = CallSpec(device_type="cpu", device_index=None, dtype=torch.float32, batch=1,
                    heads_q=2, heads_kv=2, seq_q=8, seq_k=8, head_dim=16, head_dim_v=16, **kw)
    assert capability_reasons(Capabilities(device_types=frozenset({"cpu"}),
                                           dtypes=frozenset({torch.float32})), spec)
    for name in ad.list_backends():
        try:
            caps = ad.get_backend(name).capabilities
        except ad.AttentionDispatchError:
            continue
        reasons = capability_reasons(caps, spec)
        if not getattr(caps, feature):
            assert any(text in r and "allowed" in r for r in reasons), (name, reasons)


def test_undeclared_alibi_never_reaches_forward(register_temp):
    """A plugin written before ALiBi existed (forward without alibi_slopes=)
    keeps working: alibi calls are refused before, plain calls run."""

    class Old(ad.Backend):
        capabilities = ad.Capabilities(device_types=frozenset({"cpu"}),
                                       dtypes=frozenset({torch.float32}))

        def forward(self, q, k, v, *, spec, mask, key_padding_mask, dropout_p, scale):
            return testing.reference_attention(q, k, v, scale=scale)[0].float(), None

    register_temp("old", Old)
    q, k, v = (t.float() for t in _qkv())
    with pytest.raises(ad.BackendUnavailable, match="alibi_slopes given; allowed: no ALiBi"):
        ad.attention(q, k, v, alibi_slopes=torch.ones(3), backend="old")
    assert ad.attention(q, k, v, alibi_slopes=torch.ones(3), backend="old,math").shape == q.shape
    ad.attention(q, k, v, backend="old")


# ------------------------------------------------------------- bad input


BAD = [
    (dict(window=(1,)), ad.AttentionTypeError, "window"),
    (dict(window=5), ad.AttentionTypeError, "window"),
    (dict(window=(1.0, 2)), ad.AttentionTypeError, "window"),
    (dict(window=(True, 2)), ad.AttentionTypeError, "window"),
    (dict(window=(-2, 0)), ad.AttentionInputError, "window"),
    (dict(softcap=-1.0), ad.AttentionInputError, "softcap"),
    (dict(softcap=float("nan")), ad.AttentionInputError, "softcap"),
    (dict(softcap=float("inf")), ad.AttentionInputError, "softcap"),
    (dict(softcap="2"), ad.AttentionTypeError, "softcap"),
    (dict(softcap=True), ad.AttentionTypeError, "softcap"),
    (dict(alibi_slopes=[0.5, 0.5, 0.5]), ad.AttentionTypeError, "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(3, dtype=torch.float64)), ad.AttentionTypeError,
     "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(4)), ad.AttentionInputError, "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(3, 3)), ad.AttentionInputError, "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(1, 2, 3)), ad.AttentionInputError, "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(3, device="meta")), ad.AttentionInputError, "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(3, requires_grad=True)), ad.AttentionInputError,
     "alibi_slopes"),
]


@pytest.mark.parametrize("kw,exc,argument", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_structured_arguments_fail_before_any_kernel(spy_backend, kw, exc, argument):
    q, k, v = (t.float() for t in _qkv(b=2, h=3))
    with pytest.raises(exc) as info:
        ad.attention(q, k, v, backend="spy", **kw)
    assert info.value.argument == argument
    assert argument in str(info.value) and "expected" in str(info.value)
    with pytest.raises(exc):
        ad.explain(q, k, v, **kw)
    assert spy_backend.calls == []


def test_window_list_is_accepted():
    q, k, v = (t.float() for t in _qkv())
    torch.testing.assert_close(ad.attention(q, k, v, window=[2, 1], backend="math"),
                               ad.attention(q, k, v, window=(2, 1), backend="math"))


# ----------------------------------------------- decision cache and compile


def test_cache_key_holds_the_new_arguments(spy_backend):
    """Different windows / softcaps / ALiBi presence never share a cached plan."""
    q, k, v = (t.float() for t in _qkv())
    calls = [dict(), dict(window=(2, 0)), dict(window=(3, 0)), dict(softcap=1.0),
             dict(softcap=2.0), dict(alibi_slopes=torch.ones(3))]
    for kw in calls:
        ad.attention(q, k, v, backend="math", **kw)
        ad.attention(q, k, v, backend="math", **kw)  # a cache hit
    for kw in calls:
        want = testing.reference_attention(q, k, v, **kw)[0].float()
        torch.testing.assert_close(ad.attention(q, k, v, backend="math", **kw), want)


def test_compile_key_holds_the_new_arguments():
    from attention_dispatch._core import CallOptions
    from attention_dispatch._core import compile as _compile

    q, k, v = (t.float() for t in _qkv())
    base = CallOptions(causal=True)
    variants = [base, base._replace(window=(2, 0)), base._replace(window=(3, 0)),
                base._replace(softcap=1.0), base._replace(alibi_slopes=torch.ones(3))]
    keys = {_compile.constant_key(q, k, v, o, "auto") for o in variants}
    assert len(keys) == 5


def test_torch_compile_traces_structured_calls():
    """Under torch.compile (fullgraph) the plan is decided at trace time with
    the window, softcap and slopes; the result equals eager."""
    q, k, v = (t.float() for t in _qkv())
    slopes = torch.tensor([0.5, 0.25, 0.125])

    def f(q, k, v, slopes):
        return ad.attention(q, k, v, causal=True, window=(3, 0), softcap=2.0,
                            alibi_slopes=slopes, backend="math")

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, slopes), f(q, k, v, slopes))


def test_torch_compile_traces_two_new_signatures_in_one_frame():
    """Two calls with different signatures, both first seen while one frame is
    traced (e.g. a model with full and sliding-window layers): each gets its
    own plan (dynamo reads the plan list once per frame, so plans are looked
    up under their own attribute names).  The key padding call runs on the
    CPU flash kernel, whose data-dependent cut of padded tail keys is skipped
    while tracing."""
    q, k, v = (t.float() for t in _qkv())
    kpm = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool)
    kpm[0, :2] = False

    def f(q, k, v, kpm):
        a = ad.attention(q, k, v, causal=True, window=(2, 0), key_padding_mask=kpm)
        return a + ad.attention(q[:, :, :1], k, v, key_padding_mask=kpm)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, kpm), f(q, k, v, kpm))
