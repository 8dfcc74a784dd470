"""The SDPA drop-in: torch's signature and semantics (top-left causal, masks,
scale, GQA, dropout, broadcasting), dispatched; ``patch_sdpa`` routes torch's
function through it and restores it."""

from __future__ import annotations

import inspect
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import attention_dispatch as ad
from attention_dispatch import sdpa as sdpa_mod

F64 = torch.float64


def torch_math(q, k, v, mask=None, dropout_p=0.0, is_causal=False, **kw):
    """torch's math kernel; it refuses a mask together with is_causal, so the
    top-left causal mask is folded into the mask then (torch's flash kernel
    combines them the same way)."""
    if is_causal and mask is not None:
        tl = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        mask = mask & tl if mask.dtype == torch.bool else mask.masked_fill(~tl, float("-inf"))
        is_causal = False
    with sdpa_kernel(SDPBackend.MATH):
        return sdpa_mod.TORCH_SDPA(q, k, v, mask, dropout_p, is_causal, **kw)


def qkv(b=2, hq=4, hkv=2, sq=5, sk=7, d=8, dv=8, grad=False):
    g = torch.Generator().manual_seed(sq * 100 + sk)
    return [torch.randn(b, h, s, e, dtype=F64, generator=g).requires_grad_(grad)
            for h, s, e in ((hq, sq, d), (hkv, sk, d), (hkv, sk, dv))]


def make_mask(kind, b, h, sq, sk):
    g = torch.Generator().manual_seed(1)
    if kind == "bool":
        m = torch.rand(b, 1, sq, sk, generator=g) > 0.3
        m[..., 0] = True  # every row keeps a key, also under top-left causal
        return m
    if kind == "float":
        return torch.randn(b, h, sq, sk, dtype=F64, generator=g)
    return None


def test_signature_is_torchs():
    ours = inspect.signature(ad.scaled_dot_product_attention)
    assert list(ours.parameters) == ["query", "key", "value", "attn_mask", "dropout_p",
                                     "is_causal", "scale", "enable_gqa"]
    assert ours.parameters["scale"].kind is inspect.Parameter.KEYWORD_ONLY
    assert ours.parameters["enable_gqa"].kind is inspect.Parameter.KEYWORD_ONLY
    assert "scale=None, enable_gqa=False" in F.scaled_dot_product_attention.__doc__


@pytest.mark.parametrize("sq,sk", [(3, 7), (7, 3), (5, 5), (1, 6), (6, 1)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("is_causal", [True, False])
def test_equals_torch_math_float64(sq, sk, mask_kind, is_causal):
    q, k, v = qkv(sq=sq, sk=sk)
    mask = make_mask(mask_kind, 2, 4, sq, sk)
    for kw in ({"enable_gqa": True}, {"enable_gqa": True, "scale": 0.3}):
        ref = torch_math(q, k, v, mask, is_causal=is_causal, **kw)
        out = ad.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, **kw)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sq,sk", [(3, 7), (7, 3), (4, 4)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_gradients_equal_torch_math(sq, sk, mask_kind):
    q, k, v = qkv(sq=sq, sk=sk, dv=6, grad=True)
    mask = make_mask(mask_kind, 2, 4, sq, sk)
    causal = mask_kind != "float"  # plus one non-causal case with a float mask
    go = torch.randn(2, 4, sq, 6, dtype=F64)
    ref = torch_math(q, k, v, mask, is_causal=causal, scale=0.7, enable_gqa=True)
    want = torch.autograd.grad(ref, (q, k, v), go)
    out = ad.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, scale=0.7,
                                          enable_gqa=True)
    got = torch.autograd.grad(out, (q, k, v), go)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_float_mask_gradient():
    q, k, v = qkv(sq=4, sk=6, hkv=4)
    bias = torch.randn(1, 4, 4, 6, dtype=F64, requires_grad=True)
    want = torch.autograd.grad(torch_math(q, k, v, bias).sum(), bias)[0]
    got = torch.autograd.grad(ad.scaled_dot_product_attention(q, k, v, bias).sum(), bias)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shapes", [
    ((5, 4), (6, 4), (6, 3)),                                  # 2-D
    ((3, 5, 4), (3, 6, 4), (3, 6, 3)),                         # 3-D: (N, L, E)
    ((2, 3, 2, 5, 4), (3, 1, 6, 4), (1, 3, 1, 6, 3)),          # 5-D, broadcast, MQA
    ((2, 1, 5, 4), (1, 3, 6, 4), (1, 3, 6, 3)),                # batch and query heads broadcast
])
@pytest.mark.parametrize("is_causal", [False, True])
def test_ranks_and_broadcasting(shapes, is_causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, dtype=F64, generator=g) for s in shapes)
    mask = torch.rand(shapes[0][-2], shapes[1][-2], generator=g) > 0.2
    mask[:, 0] = True
    for m in (None, mask):
        ref = torch_math(q, k, v, m, is_causal=is_causal)
        out = ad.scaled_dot_product_attention(q, k, v, m, is_causal=is_causal)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_fully_masked_row_is_zero_like_torch_cpu():
    q, k, v = qkv(hkv=4)
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[2] = False
    out = ad.scaled_dot_product_attention(q, k, v, mask)
    assert out[:, :, 2].abs().max() == 0
    torch.testing.assert_close(out, torch_math(q, k, v, mask), rtol=0, atol=1e-12)


def test_top_left_causal_builds_no_dense_mask():
    """Sq < Sk: keys sliced (square causal); Sq > Sk: a window; no mask tensor."""
    q, k, v = qkv(sq=3, sk=9)
    spec = sdpa_mod.explain_sdpa(q, k, v, is_causal=True, enable_gqa=True).spec
    assert (spec.seq_k, spec.causal, spec.mask_kind, spec.window) == (3, True, "none", None)
    q, k, v = qkv(sq=9, sk=3)
    spec = sdpa_mod.explain_sdpa(q, k, v, is_causal=True, enable_gqa=True).spec
    assert (spec.seq_k, spec.causal, spec.mask_kind, spec.window) == (3, False, "none", (-1, 6))


def test_selection_reaches_the_dispatcher(spy_backend):
    q, k, v = (t.float() for t in qkv(hkv=4))
    with ad.use_backend("spy"):
        ad.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert len(spy_backend.calls) == 1 and spy_backend.calls[0][1].causal
    assert sdpa_mod.explain_sdpa(q, k, v, backend="spy").backend == "spy"


def test_env_var_selects_backend(monkeypatch, spy_backend):
    monkeypatch.setenv("ATTENTION_DISPATCH_BACKEND", "spy")
    ad.clear_cache()
    q, k, v = (t.float() for t in qkv(hkv=4))
    ad.scaled_dot_product_attention(q, k, v)
    assert len(spy_backend.calls) == 1


def test_errors_name_torchs_arguments():
    q, k, v = qkv()
    with pytest.raises(ad.AttentionInputError, match="^key:") as e:
        ad.scaled_dot_product_attention(q, k, v)  # GQA heads without enable_gqa
    assert e.value.argument == "key"
    with pytest.raises(ad.AttentionTypeError) as e:
        ad.scaled_dot_product_attention(q, k, v, is_causal=1, enable_gqa=True)
    assert e.value.argument == "is_causal"
    with pytest.raises(ad.AttentionTypeError) as e:
        ad.scaled_dot_product_attention(q, k, v, torch.ones(5, 7, dtype=torch.long),
                                        enable_gqa=True)
    assert e.value.argument == "attn_mask"
    with pytest.raises(ad.AttentionInputError) as e:
        ad.scaled_dot_product_attention(q, k, v[..., :5, :], enable_gqa=True)
    assert e.value.argument == "value"
    with pytest.raises(ad.AttentionInputError) as e:
        ad.scaled_dot_product_attention(q, k, v, dropout_p=1.5, enable_gqa=True)
    assert e.value.argument == "dropout_p"


def test_dropout_applied_seeded_and_mean_preserving():
    torch.manual_seed(0)
    n, sq, sk, d = 4000, 4, 8, 4
    q1, k1, v1 = (torch.randn(1, 1, s, d) for s in (sq, sk, sk))
    q, k, v = (t.expand(n, -1, -1, -1) for t in (q1, k1, v1))
    ref = ad.scaled_dot_product_attention(q1, k1, v1, is_causal=True)[0]
    torch.manual_seed(5)
    draws = ad.scaled_dot_product_attention(q, k, v, dropout_p=0.5, is_causal=True)
    torch.manual_seed(5)
    again = ad.scaled_dot_product_attention(q, k, v, dropout_p=0.5, is_causal=True)
    assert torch.equal(draws, again)
    assert (draws - ref).abs().amax() > 0.1  # applied
    stderr = draws.std(0) / n ** 0.5  # the mean over draws converges to the output
    assert ((draws.mean(0) - ref).abs() <= 6 * stderr + 1e-4).all()
    assert ad.scaled_dot_product_attention(q1, k1, v1, dropout_p=1.0).abs().max() == 0


class ViTBlock(nn.Module):
    """A ViT-style block (timm's Attention): qkv projection, torch's SDPA
    looked up at call time, projection, MLP."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


def test_patch_routes_and_restores(spy_backend):
    torch.manual_seed(0)
    block, x = ViTBlock(), torch.randn(2, 17, 32, requires_grad=True)
    original = F.scaled_dot_product_attention
    ref = block(x)
    (gref,) = torch.autograd.grad(ref.sum(), x)
    with ad.patch_sdpa() as fn:
        assert F.scaled_dot_product_attention is fn is ad.scaled_dot_product_attention
        out = block(x)
        (got,) = torch.autograd.grad(out.sum(), x)
        with ad.use_backend("spy"):
            block(x)
    assert F.scaled_dot_product_attention is original
    assert len(spy_backend.calls) == 1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, gref, rtol=0, atol=1e-5)


def test_patch_restores_on_error_and_nests(spy_backend):
    original = F.scaled_dot_product_attention
    with pytest.raises(RuntimeError, match="boom"):
        with ad.patch_sdpa():
            raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is original
    with ad.patch_sdpa() as outer:
        with ad.patch_sdpa(backend="spy") as inner:
            assert F.scaled_dot_product_attention is inner
            ViTBlock()(torch.randn(1, 5, 32))
        assert F.scaled_dot_product_attention is outer
    assert F.scaled_dot_product_attention is original
    assert len(spy_backend.calls) == 1


def test_patched_process_never_calls_itself(cpu_backend):
    """With torch's function replaced by one that raises, every CPU backend
    still runs: no adapter goes through torch.nn.functional's SDPA."""
    def trap(*args, **kwargs):
        raise AssertionError("an adapter called torch.nn.functional.scaled_dot_product_attention")

    q, k, v = (t.float() for t in qkv(hkv=4))
    ref = ad.attention(q, k, v, causal=True, backend="math")  # bottom-right
    with ad.patch_sdpa():
        torch.nn.functional.scaled_dot_product_attention = trap
        try:
            out = ad.attention(q, k, v, causal=True, backend=cpu_backend)
        finally:
            torch.nn.functional.scaled_dot_product_attention = ad.scaled_dot_product_attention
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_no_module_calls_torchs_function_by_name():
    root = pathlib.Path(ad.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for needle in ("F.scaled_dot_product_attention(",
                       "functional.scaled_dot_product_attention("):
            assert needle not in text, f"{path} calls torch's SDPA by name"


def test_per_key_bool_mask_becomes_key_padding():
    q, k, v = qkv(hkv=4)
    pad = torch.rand(2, 1, 1, 7, generator=torch.Generator().manual_seed(3)) > 0.4
    pad[..., 0] = True
    spec = sdpa_mod.explain_sdpa(q, k, v, pad).spec
    assert spec.key_padding and spec.mask_kind == "none"
    for causal in (False, True):
        torch.testing.assert_close(ad.scaled_dot_product_attention(q, k, v, pad, is_causal=causal),
                                   torch_math(q, k, v, pad, is_causal=causal), rtol=0, atol=1e-12)
    one = pad[:1]  # batch-broadcast padding
    torch.testing.assert_close(ad.scaled_dot_product_attention(q, k, v, one),
                               torch_math(q, k, v, one), rtol=0, atol=1e-12)
