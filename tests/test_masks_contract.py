"""The contract, point by point, on every backend available on the CPU.

* causal is bottom-right: query i sees key j iff j <= i + (Sk - Sq);
* a query row with no allowed key gives exactly 0, lse -inf and zero,
  finite gradients;
* output dtype is the input dtype; lse is float32 (B, Hq, Sq);
* layout="bshd" returns bshd and equals the bhsd call transposed;
* GQA/MQA: query head h reads kv head h // (Hq // Hkv);
* bool mask True = may attend, float mask is added to the scores,
  key_padding_mask True = real key;
* Sk == 0 gives zeros.

The cases here are built so that the expected values follow from the
contract by hand (one-hot values, uniform scores), not only from the
reference implementation.
"""

from __future__ import annotations

import math

import dataclasses

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch.testing import reference_attention

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def has_lse(backend: str) -> bool:
    return ad.get_backend(backend).capabilities_on(torch.device("cpu")).lse


def lse_call(backend: str, q, k, v, **kw):
    """(out, lse); lse is None for a backend that returns none (not asked for)."""
    if has_lse(backend):
        return ad.attention(q, k, v, backend=backend, return_lse=True, **kw)
    return ad.attention(q, k, v, backend=backend, **kw), None


def rand(*shape, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_(requires_grad)


def qkv(b=2, hq=4, hkv=4, sq=6, sk=6, d=16, dv=None, dtype=torch.float32, grad=False):
    return (rand(b, hq, sq, d, dtype=dtype, seed=1, requires_grad=grad),
            rand(b, hkv, sk, d, dtype=dtype, seed=2, requires_grad=grad),
            rand(b, hkv, sk, dv or d, dtype=dtype, seed=3, requires_grad=grad))


def assert_close_to_ref(out, ref, dtype=torch.float32):
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2,
           torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(out.double(), ref.double(), atol=tol, rtol=tol)


# ---------------------------------------------------------------- causal


@pytest.mark.parametrize("sq,sk", [(3, 5), (5, 3), (4, 4), (1, 6), (6, 1), (2, 9), (9, 2)])
def test_causal_is_bottom_right_by_construction(cpu_backend, sq, sk):
    """q = 0 gives uniform weights over the allowed keys; v = identity makes
    the output the weight matrix itself."""
    # build the expectation: row i attends keys j <= i + (sk - sq), uniformly
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    allowed = (j <= i + (sk - sq)).double()
    counts = allowed.sum(-1, keepdim=True)
    expected = torch.where(counts > 0, allowed / counts.clamp(min=1), torch.zeros_like(allowed))
    # run with D == Dv (pad the one-hot values to the head dim of q/k)
    d = max(8, sk)
    q = torch.zeros(1, 1, sq, d)
    k = torch.randn(1, 1, sk, d)
    v = torch.zeros(1, 1, sk, d)
    v[0, 0, :, :sk] = torch.eye(sk)
    out = ad.attention(q, k, v, causal=True, backend=cpu_backend)
    torch.testing.assert_close(out[0, 0, :, :sk].double(), expected, atol=1e-6, rtol=1e-6)
    assert (out[0, 0, :, sk:] == 0).all()


@pytest.mark.parametrize("sq,sk", [(5, 11), (11, 5), (8, 8), (1, 17), (17, 1)])
@pytest.mark.parametrize("gqa", [False, True])
def test_causal_matches_reference(cpu_backend, sq, sk, gqa):
    q, k, v = qkv(sq=sq, sk=sk, hkv=2 if gqa else 4)
    out, lse = lse_call(cpu_backend, q, k, v, causal=True)
    ref, ref_lse = reference_attention(q, k, v, causal=True)
    assert_close_to_ref(out, ref)
    if lse is None:
        return
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert_close_to_ref(lse[fin], ref_lse[fin])


# ------------------------------------------------------- fully masked rows


def _dead_row_call(kind, dtype, b=2, h=2, sq=6, sk=4, d=8):
    """Inputs with some rows that have no allowed key; returns kwargs and a
    bool (B, H, Sq) tensor of dead rows."""
    q, k, v = qkv(b=b, hq=h, hkv=h, sq=sq, sk=sk, d=d, dtype=dtype, grad=True)
    dead = torch.zeros(b, h, sq, dtype=torch.bool)
    kw = {}
    if kind == "bool":
        m = torch.rand(b, 1, sq, sk, generator=torch.Generator().manual_seed(5)) > 0.3
        m[..., 0] = True
        m[:, :, 2] = False
        m[1, :, 4] = False
        kw["mask"] = m
        dead[:, :, 2] = True
        dead[1, :, 4] = True
    elif kind == "float":
        m = rand(b, h, sq, sk, dtype=dtype, seed=6)
        m[:, :, 1] = float("-inf")
        m[0, 1, 3] = float("-inf")
        kw["mask"] = m
        dead[:, :, 1] = True
        dead[0, 1, 3] = True
    elif kind == "padding":
        kpm = torch.ones(b, sk, dtype=torch.bool)
        kpm[0] = False  # a whole batch row of padding
        kpm[1, -1] = False
        kw["key_padding_mask"] = kpm
        dead[0] = True
    elif kind == "causal":  # Sq > Sk: the first Sq - Sk rows see no key
        kw["causal"] = True
        dead[:, :, : sq - sk] = True
    elif kind == "padding+causal":
        kpm = torch.zeros(b, sk, dtype=torch.bool)
        kpm[0, 2:] = True  # batch 0: first real key is 2 -> rows i with 2 > i + (sk-sq)
        kpm[1, :] = True
        kw["key_padding_mask"] = kpm
        kw["causal"] = True
        i = torch.arange(sq)
        dead[0] = (2 > i + (sk - sq))[None, :]
        dead[1] = (0 > i + (sk - sq))[None, :]
    return (q, k, v), kw, dead


@pytest.mark.parametrize("kind", ["bool", "float", "padding", "causal", "padding+causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_fully_masked_rows(cpu_backend, kind, dtype, layout):
    (q, k, v), kw, dead = _dead_row_call(kind, dtype)
    assert dead.any() and not dead.all()
    if layout == "bshd":
        q_, k_, v_ = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    else:
        q_, k_, v_ = q, k, v
    try:
        out, lse = ad.attention(q_, k_, v_, backend=cpu_backend, return_lse=True,
                                layout=layout, **kw)
    except ad.BackendUnavailable as exc:  # a declared refusal (e.g. half-precision grads)
        assert cpu_backend != "math"
        pytest.skip(str(exc))
    if layout == "bshd":
        out = out.transpose(1, 2)
    assert out.dtype == dtype and lse.dtype == torch.float32
    # exactly zero output and -inf lse on dead rows, finite elsewhere
    assert (out[dead] == 0).all()
    assert torch.isneginf(lse[dead]).all()
    assert torch.isfinite(lse[~dead]).all()
    assert torch.isfinite(out).all()
    ref, ref_lse = reference_attention(q.detach(), k.detach(), v.detach(), **kw)
    assert_close_to_ref(out.detach(), ref, dtype)
    # gradients: finite everywhere, zero for the queries of dead rows
    g = rand(*out.shape, seed=9).to(dtype)
    out.backward(g)
    grads = [t.grad if layout == "bhsd" else t.grad.transpose(1, 2) for t in (q_, k_, v_)]
    for t in grads:
        assert t is not None and torch.isfinite(t).all()
    dq, dk, dv = grads
    assert (dq[dead] == 0).all()
    if kind == "padding":  # batch row 0 has no real key at all: nothing flows to it
        assert (dk[0] == 0).all() and (dv[0] == 0).all()
        assert (dq[0] == 0).all()
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference_attention(qr, kr, vr, **kw)
    ref.backward(g.double())
    tol = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 1e-1}[dtype]
    for got, want in zip(grads, (qr.grad, kr.grad, vr.grad)):
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_all_rows_dead_gives_zero_and_zero_grads(cpu_backend):
    q, k, v = qkv(grad=True)
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    out, lse = lse_call(cpu_backend, q, k, v, mask=mask)
    assert torch.equal(out, torch.zeros_like(out))
    assert lse is None or torch.isneginf(lse).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_float_mask_minus_inf_row_and_large_negative_differ(cpu_backend):
    """-inf everywhere is a dead row (0); a large finite negative bias is not
    a mask: the row still averages its keys."""
    q, k, v = qkv(b=1, hq=1, hkv=1)
    m = torch.zeros(1, 1, 6, 6)
    m[0, 0, 0] = float("-inf")
    m[0, 0, 1] = -50.0
    out = ad.attention(q, k, v, mask=m, backend=cpu_backend)
    assert (out[0, 0, 0] == 0).all()
    ref, _ = reference_attention(q, k, v, mask=m)
    assert_close_to_ref(out, ref)
    assert out[0, 0, 1].abs().sum() > 0


# ------------------------------------------------------------ mask meaning


def test_bool_mask_true_means_may_attend(cpu_backend):
    """Each query allowed exactly one key j(i) returns v[j(i)]."""
    sq, sk, d = 5, 7, 8
    q, k, v = qkv(b=2, hq=3, hkv=3, sq=sq, sk=sk, d=d)
    pick = torch.tensor([3, 0, 6, 6, 1])
    mask = torch.zeros(sq, sk, dtype=torch.bool)
    mask[torch.arange(sq), pick] = True
    out = ad.attention(q, k, v, mask=mask, backend=cpu_backend)
    torch.testing.assert_close(out, v[:, :, pick], atol=1e-6, rtol=1e-6)


def test_float_mask_is_added_to_scores(cpu_backend):
    """With q = 0 the scores are 0, so softmax(mask) are the weights."""
    sq, sk, d = 4, 6, 8
    q = torch.zeros(1, 2, sq, d)
    k = torch.randn(1, 2, sk, d)
    v = torch.randn(1, 2, sk, d)
    bias = torch.randn(1, 2, sq, sk)
    out = ad.attention(q, k, v, mask=bias, backend=cpu_backend)
    expected = torch.softmax(bias, -1) @ v
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # a per-row constant added to the scores changes nothing
    out2 = ad.attention(q, k, v, mask=bias + torch.randn(1, 2, sq, 1) * 10, backend=cpu_backend)
    torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)


def test_key_padding_true_means_real_key(cpu_backend):
    q, k, v = qkv(b=2, sq=4, sk=5)
    kpm = torch.tensor([[False, False, True, False, False], [True, True, True, True, True]])
    out = ad.attention(q, k, v, key_padding_mask=kpm, backend=cpu_backend)
    # batch 0: a single real key (2) -> its value, for every query
    torch.testing.assert_close(out[0], v[0, :, 2:3].expand(-1, 4, -1), atol=1e-6, rtol=1e-6)
    # batch 1: nothing padded -> the plain call
    torch.testing.assert_close(out[1:], ad.attention(q[1:], k[1:], v[1:], backend=cpu_backend),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(6, 9), (1, 9), (4, 6, 9), (2, 1, 6, 9), (1, 4, 1, 9),
                                   (2, 4, 6, 9), (2, 1, 1, 9)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_broadcast_shapes(cpu_backend, shape, kind):
    """Any mask broadcastable to (B, Hq, Sq, Sk) with 2 to 4 dims is accepted."""
    q, k, v = qkv(b=2, hq=4, hkv=2, sq=6, sk=9)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(*shape, generator=g) > 0.3 if kind == "bool" else torch.randn(*shape,
                                                                                    generator=g)
    for causal in (False, True):
        out = ad.attention(q, k, v, mask=mask, causal=causal, backend=cpu_backend)
        ref, _ = reference_attention(q, k, v, mask=mask, causal=causal)
        assert_close_to_ref(out, ref)


def test_scale(cpu_backend):
    q, k, v = qkv()
    default = ad.attention(q, k, v, backend=cpu_backend)
    explicit = ad.attention(q, k, v, backend=cpu_backend, scale=1 / math.sqrt(16))
    torch.testing.assert_close(default, explicit)
    out = ad.attention(q, k, v, backend=cpu_backend, scale=0.7)
    assert_close_to_ref(out, reference_attention(q, k, v, scale=0.7)[0])
    assert not torch.allclose(out, default)


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("return_lse", [False, True])
def test_output_dtype_is_input_dtype(cpu_backend, dtype, return_lse):
    q, k, v = qkv(dtype=dtype, sq=5, sk=7)
    if return_lse and not has_lse(cpu_backend):
        pytest.skip(f"{cpu_backend} returns no LSE")
    res = ad.attention(q, k, v, causal=True, return_lse=return_lse, backend=cpu_backend)
    out = res[0] if return_lse else res
    assert isinstance(out, torch.Tensor)
    assert out.dtype == dtype and out.shape == (2, 4, 5, 16)
    if return_lse:
        lse = res[1]
        assert lse.dtype == torch.float32 and lse.shape == (2, 4, 5)
    assert_close_to_ref(out, reference_attention(q, k, v, causal=True)[0], dtype)


# ------------------------------------------------------------------ layout


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"mask": "bool"}, {"kpm": True}],
                         ids=["plain", "causal", "bool-mask", "padding"])
@pytest.mark.parametrize("heads_kv", [4, 2, 1])
def test_bshd_layout(cpu_backend, kw, heads_kv):
    b, hq, sq, sk, d = 2, 4, 5, 8, 16
    q, k, v = qkv(b=b, hq=hq, hkv=heads_kv, sq=sq, sk=sk, d=d)
    call = {"causal": kw.get("causal", False)}
    if kw.get("mask"):
        call["mask"] = torch.rand(b, 1, sq, sk, generator=torch.Generator().manual_seed(1)) > 0.4
    if kw.get("kpm"):
        call["key_padding_mask"] = torch.arange(sk)[None] < torch.tensor([[3], [8]])
    out_bhsd, lse_bhsd = lse_call(cpu_backend, q, k, v, **call)
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out_bshd, lse_bshd = lse_call(cpu_backend, qs, ks, vs, layout="bshd", **call)
    assert out_bshd.shape == (b, sq, hq, d)
    torch.testing.assert_close(out_bshd, out_bhsd.transpose(1, 2), atol=1e-6, rtol=1e-6)
    if lse_bshd is not None:
        assert lse_bshd.shape == (b, hq, sq)
        torch.testing.assert_close(lse_bshd, lse_bhsd, atol=1e-6, rtol=1e-6)
    # non-contiguous bshd views of bhsd storage work as well
    out_view = ad.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                            layout="bshd", backend=cpu_backend, **call)
    torch.testing.assert_close(out_view, out_bhsd.transpose(1, 2), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------- GQA


@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 3), (8, 2), (4, 1), (6, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_mqa_head_mapping(cpu_backend, hq, hkv, causal):
    """Query head h reads kv head h // (Hq // Hkv) (not h % Hkv)."""
    q, k, v = qkv(hq=hq, hkv=hkv, sq=5, sk=7)
    out = ad.attention(q, k, v, causal=causal, backend=cpu_backend)
    group = hq // hkv
    for h in range(hq):
        kh = h // group
        one = ad.attention(q[:, h:h + 1], k[:, kh:kh + 1], v[:, kh:kh + 1], causal=causal,
                           backend="math")
        torch.testing.assert_close(out[:, h:h + 1], one, atol=1e-5, rtol=1e-5)
    assert_close_to_ref(out, reference_attention(q, k, v, causal=causal)[0])
    if hkv > 1:  # the interleaved mapping h % Hkv would give something else
        wrong = torch.arange(hq) % hkv
        alt = reference_attention(q, k[:, wrong], v[:, wrong], causal=causal)[0]
        assert not torch.allclose(out.double(), alt, atol=1e-3)


# ----------------------------------------------------------- empty lengths


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_sk_zero_gives_zeros(cpu_backend, layout):
    b, h, sq, d = 2, 4, 3, 8
    q = torch.randn(b, h, sq, d, requires_grad=True)
    k = torch.randn(b, 2, 0, d, requires_grad=True)
    v = torch.randn(b, 2, 0, d, requires_grad=True)
    qq, kk, vv = (t.transpose(1, 2) if layout == "bshd" else t for t in (q, k, v))
    kpm = torch.ones(b, 0, dtype=torch.bool)
    out, lse = lse_call(cpu_backend, qq, kk, vv, layout=layout, causal=True,
                        key_padding_mask=kpm)
    expect_shape = (b, sq, h, d) if layout == "bshd" else (b, h, sq, d)
    assert out.shape == expect_shape and out.dtype == q.dtype
    assert torch.equal(out, torch.zeros(expect_shape))
    assert lse is None or (lse.shape == (b, h, sq) and torch.isneginf(lse).all())
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
    assert k.grad is not None and k.grad.numel() == 0


def test_sq_zero_gives_empty(cpu_backend):
    q = torch.randn(2, 4, 0, 8)
    k = torch.randn(2, 4, 5, 8)
    out, lse = lse_call(cpu_backend, q, k, k, causal=True)
    assert out.shape == (2, 4, 0, 8) and (lse is None or lse.shape == (2, 4, 0))


def test_different_value_head_dim_on_math():
    q, k, v = qkv(d=16, dv=24)
    out = ad.attention(q, k, v, backend="math", causal=True)
    assert out.shape == (2, 4, 6, 24)
    assert_close_to_ref(out, reference_attention(q, k, v, causal=True)[0])


# ------------------------------------------- float mask that needs a gradient


def _learned_bias_call(backend, device="cpu", dtype=torch.float32):
    q, k, v = (t.to(device) for t in qkv(hkv=2, sq=5, sk=9, dtype=dtype, grad=False))
    bias = (rand(1, 4, 5, 9, seed=4) * 0.5).to(device=device, dtype=dtype).requires_grad_()
    q.requires_grad_()
    out = ad.attention(q, k, v, mask=bias, causal=True, backend=backend)
    g = rand(*out.shape, seed=8).to(device=device, dtype=dtype)
    out.backward(g)
    qr = q.detach().cpu().double().requires_grad_()
    br = bias.detach().cpu().double().requires_grad_()
    ref, _ = reference_attention(qr, k.cpu(), v.cpu(), mask=br, causal=True)
    ref.backward(g.cpu().double())
    return out, ref, (q.grad, bias.grad), (qr.grad, br.grad)


def test_float_mask_gradient(cpu_backend):
    """A float mask that requires grad (a learned bias) gets its gradient, or
    the backend refuses the call with a reason; it never crashes or drops it."""
    try:
        out, ref, (dq, dbias), (rq, rbias) = _learned_bias_call(cpu_backend)
    except ad.BackendUnavailable as exc:
        assert any("mask" in r for r in exc.reasons[cpu_backend]), exc
        pytest.skip(f"{cpu_backend} refuses a mask that requires grad: {exc.reasons}")
    assert_close_to_ref(out.detach(), ref.detach())
    assert dbias is not None, "the mask's gradient was dropped"
    torch.testing.assert_close(dbias.double(), rbias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dq.double(), rq, atol=1e-5, rtol=1e-5)


def test_float_mask_gradient_with_auto():
    """auto never picks a backend that cannot differentiate the mask, also
    when the same signature was planned under no_grad first."""
    q, k, v = qkv(sq=5, sk=9)
    bias = torch.zeros(1, 4, 5, 9, requires_grad=True)
    with torch.no_grad():
        ad.attention(q, k, v, mask=bias)
        assert not ad.explain(q, k, v, mask=bias).spec.mask_grad
    d = ad.explain(q, k, v, mask=bias)
    assert d.spec.mask_grad and d.spec.requires_grad
    out = ad.attention(q, k, v, mask=bias)
    out.sum().backward()
    assert bias.grad is not None and torch.isfinite(bias.grad).all()


def test_kernels_without_mask_gradient_refuse_a_learned_bias():
    """torch's CPU flash kernel and cuDNN attention cannot differentiate the
    bias: they refuse such calls (checked on CallSpecs, no device needed)."""
    def spec(device, **kw):
        return ad.CallSpec(device_type=device, device_index=None, dtype=torch.bfloat16,
                           batch=1, heads_q=4, heads_kv=4, seq_q=16, seq_k=16, head_dim=64,
                           head_dim_v=64, mask_kind="float", **kw)

    grad = dict(requires_grad=True, mask_grad=True)
    flash = ad.get_backend("sdpa-flash")
    assert any("requires grad" in r for r in flash.supports(spec("cpu", **grad)))
    cpu32 = dict(requires_grad=True, dtype=torch.float32)
    assert flash.supports(dataclasses.replace(spec("cpu"), **cpu32)) == []
    # and half-precision gradients on the CPU (its backward is inexact there)
    assert any("half precision" in r for r in flash.supports(spec("cpu", requires_grad=True)))
    cudnn = ad.get_backend("sdpa-cudnn")
    assert any("requires grad" in r for r in cudnn.supports(spec("cuda", **grad)))
    assert cudnn.supports(spec("cuda", requires_grad=True)) == []
    # the memory-efficient kernel differentiates its bias
    assert ad.get_backend("sdpa-mem-efficient").supports(spec("cuda", **grad)) == []


# ----------------------------------------------------------------- empty-row fix: no extra buffer


def test_zero_empty_rows_reuses_the_output_when_it_can() -> None:
    from attention_dispatch._core.masks import zero_empty_rows

    alive = torch.tensor([True, False])[:, None, None]  # (B, 1, 1): batch row 1 dead
    out = torch.ones(2, 3, 4, 5)
    got, _ = zero_empty_rows(out, None, alive)
    assert got is out and got[1].abs().sum() == 0 and got[0].eq(1).all()  # in place
    v = torch.ones(2, 3, 4, 5)
    got, _ = zero_empty_rows(v, None, alive, inputs=(v,))  # shares an input's memory
    assert got is not v and v.eq(1).all() and got[1].abs().sum() == 0
    g = torch.ones(2, 3, 4, 5, requires_grad=True) * 1.0
    got, _ = zero_empty_rows(g, None, torch.ones(2, 1, 1, dtype=torch.bool))
    assert got is g  # autograd, no dead row: nothing copied
    got, lse = zero_empty_rows(g, torch.zeros(2, 3, 4), alive)
    assert got is not g and got[1].abs().sum() == 0 and torch.isneginf(lse[1]).all()
    got.sum().backward()
