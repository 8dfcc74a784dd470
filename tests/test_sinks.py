"""Attention sinks (``sinks=``, one logit per query head) on the CPU: the
output, lse and gradients (q, k, v, sinks) of the backends that take them
(math natively; sdpa-flash through its LSE) against the float64 reference,
with causal Sq != Sk, GQA, key padding, windows, softcap, ALiBi, float masks,
rows with no key, views and both layouts; varlen; merge_attention and
simulated ring attention applying the sink once; dropout's definition; the
refusals of the backends without sinks; typed errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch import testing
from attention_dispatch._core import CallSpec, call, validate
from attention_dispatch._core.selfcheck import check_call
from attention_dispatch.distributed import simulate_ring
from attention_dispatch.structured.varlen import cu_seqlens

Tensor = torch.Tensor


def _qkv(b=2, hq=4, hkv=2, sq=7, sk=5, d=8, dtype=torch.float64, seed=0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g).to(dtype).requires_grad_()
            for h, s in ((hq, sq), (hkv, sk), (hkv, sk))]


def _sinks(h=4, dtype=torch.float32, seed=1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(h, generator=g) * 2).to(dtype).requires_grad_()


def _grads(out: Tensor, w: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad((out.double() * w).sum(), inputs))


def _check(got: Tensor, want: Tensor, dtype: torch.dtype) -> None:
    err = (got.double() - want).abs().max().item()
    assert err <= testing.atol(dtype) * (1 + want.abs().max().item()), err


CASES = {
    "causal-sq>sk": dict(causal=True),                       # 2 rows with no key
    "causal-sq<sk": dict(causal=True, sk=11),
    "padding": dict(kpm=[[1, 1, 1, 0, 1], [0, 0, 0, 0, 0]]),  # batch row 1: no key at all
    "padding-causal": dict(causal=True, kpm=[[0, 1, 1, 1, 1], [1, 1, 0, 1, 1]]),
    "window": dict(window=(2, 0), sk=9),
    "softcap-alibi": dict(softcap=3.0, alibi=True, sk=9),
    "float-mask": dict(float_mask=True),
    "mha": dict(hkv=4),
}


def _call_args(case: dict, sq: int, sk: int, b: int = 2, h: int = 4) -> dict[str, Any]:
    kw: dict[str, Any] = {k: case[k] for k in ("causal", "window", "softcap") if k in case}
    if "kpm" in case:
        kw["key_padding_mask"] = torch.tensor(case["kpm"], dtype=torch.bool)
    if case.get("alibi"):
        kw["alibi_slopes"] = torch.rand(h, generator=torch.Generator().manual_seed(3))
    if case.get("float_mask"):
        g = torch.Generator().manual_seed(4)
        m = torch.randn(b, 1, sq, sk, generator=g)
        kw["mask"] = m.masked_fill(torch.rand(b, 1, sq, sk, generator=g) > 0.7, float("-inf"))
    return kw


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", ["math", "sdpa-flash"])
def test_forward_and_gradients(backend: str, name: str, layout: str, dtype: torch.dtype
                               ) -> None:
    case = CASES[name]
    sk = case.get("sk", 5)
    q, k, v = _qkv(hkv=case.get("hkv", 2), sk=sk, dtype=dtype)
    sinks = _sinks(dtype=torch.float32 if dtype == torch.float32 else torch.float64)
    kw = _call_args(case, 7, sk)
    if "mask" in kw:
        kw["mask"] = kw["mask"].to(dtype)
    views = [q, k, v] if layout == "bhsd" else [t.transpose(1, 2) for t in (q, k, v)]
    try:
        out, lse = ad.attention(*views, layout=layout, sinks=sinks, return_lse=True,
                                backend=backend, **kw)
    except ad.BackendUnavailable as exc:
        assert backend != "math" and "softcap" in name, exc  # sdpa-flash: no softcap
        return
    if layout == "bshd":
        out = out.transpose(1, 2)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    ref, ref_lse = testing.reference_attention(*ref_in[:3], sinks=ref_in[3], **kw)
    _check(out, ref, dtype)
    _check(lse, ref_lse, torch.float32)
    w = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for got, want in zip(_grads(out, w, [q, k, v, sinks]), _grads(ref, w, ref_in)):
        _check(got, want, dtype)


@pytest.mark.parametrize("backend", ["math", "sdpa-flash"])
def test_rows_with_no_key_give_zero_and_the_sink(backend: str) -> None:
    """Causal Sq > Sk (rows 0, 1 see nothing) and a batch row without real keys:
    out 0, lse = sinks[h]; their gradients are zero and finite."""
    q, k, v = _qkv(sq=7, sk=5)
    sinks = _sinks(dtype=torch.float64)
    kpm = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out, lse = ad.attention(q, k, v, causal=True, key_padding_mask=kpm, sinks=sinks,
                            return_lse=True, backend=backend)
    s = sinks.detach().float()[:, None]
    assert not out[0, :, :2].any() and not out[1].any()
    assert torch.equal(lse[0, :, :2], s.expand(4, 2)) and torch.equal(lse[1], s.expand(4, 7))
    assert torch.isfinite(out[0, :, 2:]).all() and out[0, :, 2:].abs().sum() > 0
    gq, gs = torch.autograd.grad(out[1].sum() + out[0, :, :2].sum(), [q, sinks])
    assert torch.isfinite(gq).all() and not gq.any() and not gs.any()


def test_no_key_at_all_and_empty_calls() -> None:
    """Sk == 0 (the dispatcher's empty path): out 0, lse the sink."""
    q = torch.randn(1, 4, 3, 8)
    k = v = torch.randn(1, 2, 0, 8)
    sinks = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out, lse = ad.attention(q, k, v, sinks=sinks, return_lse=True)
    assert not out.any() and torch.equal(lse, sinks[None, :, None].expand(1, 4, 3))


def test_views_and_float32_sinks_with_half_inputs() -> None:
    """Expanded (stride-0) and step-sliced inputs, bfloat16 with float32 sinks and
    bfloat16 sinks: within the accuracy rule of the reference."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 14, 8, generator=g).to(torch.bfloat16)[:, :, ::2]
    k = torch.randn(1, 2, 6, 8, generator=g).to(torch.bfloat16).expand(2, 2, 6, 8)
    v = torch.randn(2, 6, 2, 8, generator=g).to(torch.bfloat16).transpose(1, 2)
    for sinks in (_sinks().detach(), _sinks().detach().to(torch.bfloat16)):
        out = ad.attention(q, k, v, causal=True, sinks=sinks)
        ref, _ = testing.reference_attention(q, k, v, causal=True, sinks=sinks)
        _check(out, ref, torch.bfloat16)


def test_dropout_drops_the_real_keys_probabilities() -> None:
    """With dropout the sink's mass is removed and the real keys' probabilities are
    dropped out: v = identity reads the probabilities back (p / (1 - p_drop) or 0)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 8, 8, generator=g)
    v = torch.eye(8).expand(1, 2, 8, 8)
    sinks = torch.tensor([1.5, -0.5])
    p, _ = testing.reference_attention(q, k, v, sinks=sinks)  # = the probabilities
    torch.manual_seed(0)
    out = ad.attention(q, k, v, sinks=sinks, dropout_p=0.4, backend="math")
    kept = out != 0
    assert 0 < kept.float().mean() < 1
    assert torch.allclose(out[kept].double(), p[kept] / 0.6, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["math", "sdpa-flash"])  # native; padded to dense
@pytest.mark.parametrize("causal", [False, True])
def test_varlen(causal: bool, backend: str) -> None:
    """Per-head sinks, the same for every sequence; a sequence without keys gives
    out 0 and lse the sink; gradients of q, k, v and sinks."""
    lq, lk = [3, 4, 2], [5, 0, 6]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lq), 4, 8, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.randn(sum(lk), 2, 8, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(sum(lk), 2, 8, generator=g, dtype=torch.float64).requires_grad_()
    sinks = _sinks(dtype=torch.float64)
    cu_q, cu_k = (cu_seqlens(torch.tensor(x, dtype=torch.int32)) for x in (lq, lk))
    out, lse = ad.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                   sinks=sinks, return_lse=True, backend=backend)
    w = torch.randn(out.shape, dtype=torch.float64, generator=g)
    got = _grads(out, w, [q, k, v, sinks])
    ref_in = [t.detach().requires_grad_() for t in (q, k, v, sinks)]
    refs, ref_lses = [], []
    for b in range(3):
        qs, ks, vs = (t[c[b]:c[b + 1]].transpose(0, 1)[None]
                      for t, c in zip(ref_in[:3], (cu_q, cu_k, cu_k)))
        o, s = testing.reference_attention(qs, ks, vs, causal=causal, sinks=ref_in[3])
        refs.append(o[0].transpose(0, 1))
        ref_lses.append(s[0])
    ref, ref_lse = torch.cat(refs), torch.cat(ref_lses, -1)
    _check(out, ref, torch.float64)
    _check(lse, ref_lse, torch.float32)
    assert not out[3:7].any() and torch.equal(lse[:, 3:7], sinks.detach().float()[:, None]
                                               .expand(4, 4))
    for a, b in zip(got, _grads(ref, w, ref_in)):
        _check(a, b, torch.float64)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_merge_of_two_chunks_equals_one_call(layout: str) -> None:
    """Chunks computed without sinks, merged with sinks= == one call with sinks;
    the sinks' gradient through the merge too (one chunk fully masked for row 0)."""
    q, k, v = _qkv(sq=5, sk=9)
    sinks = _sinks(dtype=torch.float64)
    tr = (lambda t: t) if layout == "bhsd" else (lambda t: t.transpose(1, 2))
    parts = [ad.attention(tr(q), tr(k[:, :, a:b]), tr(v[:, :, a:b]), layout=layout,
                          return_lse=True) for a, b in ((0, 4), (4, 9))]
    out, lse = ad.merge_attention([p[0] for p in parts], [p[1] for p in parts], layout=layout,
                                  sinks=sinks)
    one, one_lse = ad.attention(tr(q), tr(k), tr(v), layout=layout, sinks=sinks,
                                return_lse=True)
    _check(out, one.detach(), torch.float32)
    _check(lse, one_lse, torch.float32)
    w = torch.randn(out.shape, dtype=torch.float64)
    (g1,), (g2,) = _grads(out, w, [sinks]), _grads(one, w, [sinks])
    _check(g1, g2, torch.float32)


def test_merge_thd_and_empty_rows() -> None:
    """thd layout: a row no partial saw gives out 0 and lse the sink."""
    outs = [torch.randn(5, 3, 4), torch.zeros(5, 3, 4)]
    lses = [torch.randn(3, 5), torch.full((3, 5), float("-inf"))]
    outs[0][2] = 0
    lses[0][:, 2] = float("-inf")
    sinks = torch.tensor([0.0, 1.0, -1.0])
    out, lse = ad.merge_attention(outs, lses, layout="thd", sinks=sinks)
    assert not out[2].any() and torch.equal(lse[:, 2], sinks)
    alpha = torch.sigmoid(lses[0] - sinks[:, None]).transpose(0, 1)[..., None]
    torch.testing.assert_close(out, outs[0] * alpha)
    torch.testing.assert_close(lse, torch.logaddexp(lses[0], sinks[:, None]))


@pytest.mark.parametrize("sharding", ["contiguous", "zigzag"])
def test_simulated_ring_applies_the_sink_once(sharding: str) -> None:
    q, k, v = _qkv(hq=4, hkv=2, sq=16, sk=16)
    sinks = _sinks(dtype=torch.float64)
    out, lse = simulate_ring(q, k, v, 4, causal=True, sharding=sharding, sinks=sinks,
                             return_lse=True, backend="math")
    ref_in = [t.detach().requires_grad_() for t in (q, k, v, sinks)]
    ref, ref_lse = testing.reference_attention(*ref_in[:3], causal=True, sinks=ref_in[3])
    _check(out, ref, torch.float32)
    _check(lse, ref_lse, torch.float32)
    w = torch.randn(ref.shape, dtype=torch.float64)
    for a, b in zip(_grads(out, w, [q, k, v, sinks]), _grads(ref, w, ref_in)):
        _check(a, b, torch.float32)


def test_backends_without_sinks_refuse_with_a_reason() -> None:
    q, k, v = (t.detach().float() for t in _qkv(sq=64, sk=64))
    d = ad.explain(q, k, v, sinks=torch.zeros(4))
    assert d.backend in ("sdpa-flash", "math") and d.spec.sinks
    assert not d.reasons("sdpa-flash") and not d.reasons("math")
    for name in ("sdpa", "chunked"):
        if name in ad.list_backends():
            assert any("has no attention sinks" in r for r in d.reasons(name)), name
    assert any("sinks on the CPU" in r for r in d.reasons("flex"))
    assert "sinks=True" in str(d)
    with pytest.raises(ad.BackendUnavailable, match="sinks"):
        ad.attention(q, k, v, sinks=torch.zeros(4), backend="sdpa")


def test_sdpa_flash_refuses_sinks_on_cuda() -> None:
    spec = validate(*(t.detach().half() for t in _qkv()), sinks=torch.zeros(4))
    cuda = CallSpec(**{**spec.__dict__, "device_type": "cuda", "device_index": 0})
    assert any("sinks on CUDA" in r for r in ad.get_backend("sdpa-flash").check(cuda))


def test_verify_mode_and_autotune_check_take_sinks() -> None:
    q, k, v = (t.detach().float() for t in _qkv())
    sinks = _sinks().detach()
    with ad.verify(2):
        out = ad.attention(q, k, v, causal=True, sinks=sinks)
    ref, _ = testing.reference_attention(q, k, v, causal=True, sinks=sinks)
    _check(out, ref, torch.float32)
    spec = validate(q, k, v, causal=True, sinks=sinks)
    assert check_call(call, "math", spec) is None
    assert check_call(call, "sdpa-flash", spec) is None


def test_the_decision_cache_keys_on_sinks_needing_a_gradient() -> None:
    q, k, v = (t.detach() for t in _qkv())
    sinks = _sinks(dtype=torch.float64)
    with torch.no_grad():
        ad.attention(q, k, v, sinks=sinks)
    out = ad.attention(q, k, v, sinks=sinks)
    (g,) = torch.autograd.grad(out.sum(), sinks)
    assert g.abs().sum() > 0
    assert validate(q, k, v, sinks=sinks).requires_grad
    with torch.no_grad():
        assert not validate(q, k, v, sinks=sinks).requires_grad


@pytest.mark.parametrize("sinks, err, match", [
    ([0.0] * 4, ad.AttentionTypeError, "torch.Tensor"),
    (torch.zeros(4, dtype=torch.int64), ad.AttentionTypeError, "float32 or q's dtype"),
    (torch.zeros(4, dtype=torch.float16), ad.AttentionTypeError, "float32 or q's dtype"),
    (torch.zeros(2), ad.AttentionInputError, r"shape \(Hq,\) = \(4,\)"),
    (torch.zeros(1, 4), ad.AttentionInputError, r"shape \(Hq,\)"),
    (torch.zeros(4, device="meta"), ad.AttentionInputError, "device"),
])
def test_bad_sinks_raise_typed_errors(sinks: Any, err: type, match: str) -> None:
    q, k, v = (t.detach() for t in _qkv())
    for fn in (ad.attention, ad.explain):
        with pytest.raises(err, match=match) as info:
            fn(q, k, v, sinks=sinks)
        assert info.value.argument == "sinks"  # type: ignore[attr-defined]
    cu = torch.tensor([0, 7], dtype=torch.int32)
    with pytest.raises(err, match=match):
        ad.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                            cu, torch.tensor([0, 5], dtype=torch.int32), 7, 5, sinks=sinks)


def test_merge_rejects_bad_sinks() -> None:
    outs, lses = [torch.zeros(1, 3, 2, 4)], [torch.zeros(1, 3, 2)]
    with pytest.raises(ad.AttentionInputError, match="sinks"):
        ad.merge_attention(outs, lses, sinks=torch.zeros(4))
    with pytest.raises(ad.AttentionTypeError, match="sinks"):
        ad.merge_attention(outs, lses, sinks=[0.0, 0.0, 0.0])


def test_spec_field() -> None:
    assert CallSpec.__dataclass_fields__["sinks"].default is False
