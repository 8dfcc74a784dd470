"""ad.Attend against the seed module's math path (recurrent-memory-transformer-pytorch).

The seed's math path is written out below as it was; Attend must give the
same output wherever every query row has at least one key.  The one
deliberate difference: a row with all keys masked gives 0 (the seed gives a
uniform average over the masked keys).
"""

from __future__ import annotations

import pytest
import torch
from einops import einsum

import attention_dispatch as ad


def seed_attend(q, k, v, mask=None, causal=False):
    scale = q.shape[-1] ** -0.5
    kv_eq = "b j d" if k.ndim == 3 else "b h j d"
    sim = einsum(q, k, f"b h i d, {kv_eq} -> b h i j") * scale
    if mask is not None:
        if mask.ndim == 2:
            mask = mask[:, None, None, :]
        sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    if causal:
        i, j = sim.shape[-2:]
        causal_mask = torch.ones((i, j), dtype=torch.bool).triu(j - i + 1)
        sim = sim.masked_fill(causal_mask, -torch.finfo(sim.dtype).max)
    attn = sim.softmax(dim=-1)
    return einsum(attn, v, f"b h i j, {kv_eq} -> b h i d")


def inputs(b=2, h=4, i=6, j=6, d=16, shared_kv=False, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, i, d, generator=g, dtype=dtype)
    kv_shape = (b, j, d) if shared_kv else (b, h, j, d)
    k = torch.randn(*kv_shape, generator=g, dtype=dtype)
    v = torch.randn(*kv_shape, generator=g, dtype=dtype)
    return q, k, v


def padding_mask(b, j, seed=1):
    """(b, j) bool, True = keep, every batch row keeps at least its first key."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, j, generator=g) > 0.4
    m[:, 0] = True
    return m


def full_mask(b, h, i, j, seed=2):
    """(b, h, i, j) bool, every query row keeps at least its last key."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, h, i, j, generator=g) > 0.5
    m[..., -1] = True
    return m


CONFIGS = [
    # id, (i, j), causal, mask kind, shared kv
    ("plain", (6, 6), False, None, False),
    ("plain-i<j", (5, 9), False, None, False),
    ("key-padding", (6, 8), False, "padding", False),
    ("bool-4d", (7, 7), False, "full", False),
    ("bool-4d-broadcast-heads", (4, 9), False, "full-h1", False),
    ("causal-i==j", (8, 8), True, None, False),
    ("causal-i<j", (5, 11), True, None, False),
    ("causal-i<j-padding", (5, 11), True, "padding", False),
    ("causal-i<j-bool-4d", (5, 11), True, "full", False),
    ("mqa-kv-bjd", (6, 6), False, None, True),
    ("mqa-kv-bjd-causal-i<j", (4, 10), True, None, True),
    ("mqa-kv-bjd-padding", (6, 9), False, "padding", True),
    ("mqa-kv-bjd-bool-4d", (6, 9), False, "full", True),
]


def make_mask(kind, b, h, i, j):
    if kind is None:
        return None
    if kind == "padding":
        return padding_mask(b, j)
    if kind == "full":
        return full_mask(b, h, i, j)
    if kind == "full-h1":
        return full_mask(b, 1, i, j)
    raise ValueError(kind)


@pytest.mark.parametrize("use_flash", [None, True, False])
@pytest.mark.parametrize("cid,shape,causal,mask_kind,shared_kv", CONFIGS,
                         ids=[c[0] for c in CONFIGS])
def test_matches_seed_math_path(cid, shape, causal, mask_kind, shared_kv, use_flash):
    i, j = shape
    b, h = 2, 4
    q, k, v = inputs(b=b, h=h, i=i, j=j, shared_kv=shared_kv)
    mask = make_mask(mask_kind, b, h, i, j)
    if causal and mask_kind == "padding":
        # bottom-right causal with i < j always leaves key 0 visible: no dead row
        assert j >= i
    module = ad.Attend(causal=causal, use_flash=use_flash).eval()
    out = module(q, k, v, mask=mask)
    expected = seed_attend(q, k, v, mask=mask, causal=causal)
    assert out.shape == expected.shape == (b, h, i, 16)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_matches_seed_in_float64_tightly():
    q, k, v = inputs(i=5, j=9, dtype=torch.float64)
    mask = padding_mask(2, 9)
    out = ad.Attend(causal=True).eval()(q, k, v, mask=mask)
    torch.testing.assert_close(out, seed_attend(q, k, v, mask=mask, causal=True),
                               atol=1e-12, rtol=1e-12)


def test_gradients_match_seed():
    q, k, v = (t.requires_grad_() for t in inputs(i=5, j=7))
    mask = padding_mask(2, 7)
    out = ad.Attend(causal=True).eval()(q, k, v, mask=mask)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    expected = seed_attend(q, k, v, mask=mask, causal=True)
    want = torch.autograd.grad(expected, (q, k, v), g)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_use_flash_false_runs_math(spy_class, register_temp, monkeypatch):
    """use_flash=False means backend="math"; default/True means auto."""
    assert ad.Attend(use_flash=False).backend == "math"
    assert ad.Attend().backend == "auto" and ad.Attend(use_flash=True).backend == "auto"
    register_temp("math", spy_class, replace=True)  # count the calls that reach "math"
    spy = ad.get_backend("math")
    q, k, v = inputs()
    with ad.use_backend("sdpa-flash"):  # would win if Attend(use_flash=False) deferred
        ad.Attend(use_flash=False).eval()(q, k, v)
        assert len(spy.calls) == 1
        ad.Attend(use_flash=True).eval()(q, k, v)
        assert len(spy.calls) == 1


def test_use_flash_false_explained():
    q, k, v = inputs()
    m = ad.Attend(use_flash=False)
    assert ad.explain(q, k, v, backend=m.backend).backend == "math"
    assert ad.explain(q, k, v, backend=ad.Attend().backend).backend == "sdpa-flash"


def test_backend_argument_is_passed(spy_backend):
    q, k, v = inputs()
    ad.Attend(backend="spy", causal=True).eval()(q, k, v)
    assert len(spy_backend.calls) == 1
    spec = spy_backend.calls[0][1]
    assert spec.causal and not spec.dropout


def test_dropout_only_in_training():
    torch.manual_seed(0)
    q, k, v = inputs()
    module = ad.Attend(dropout=0.5)
    module.eval()
    e1 = module(q, k, v)
    e2 = module(q, k, v)
    assert torch.equal(e1, e2)  # eval: deterministic
    torch.testing.assert_close(e1, seed_attend(q, k, v), atol=2e-5, rtol=2e-5)
    module.train()
    t1 = module(q, k, v)
    t2 = module(q, k, v)
    assert not torch.allclose(t1, e1)  # dropout applied
    assert not torch.allclose(t1, t2)  # fresh draws
    # training with dropout 0 is the eval output
    torch.testing.assert_close(ad.Attend(dropout=0.0).train()(q, k, v), e1)


def test_dropout_in_training_uses_a_dropping_backend(spy_backend):
    """The training call asks for dropout; a backend that cannot drop out
    (the spy) is not allowed to take it."""
    q, k, v = inputs()
    module = ad.Attend(dropout=0.5, backend="spy")
    module.eval()(q, k, v)
    assert len(spy_backend.calls) == 1
    with pytest.raises(ad.BackendUnavailable, match="dropout"):
        module.train()(q, k, v)
    module.backend = "spy,math"
    module(q, k, v)
    assert len(spy_backend.calls) == 1


def test_fully_masked_row_gives_zero_not_uniform_average():
    """The deliberate difference from the seed."""
    q, k, v = inputs(i=4, j=6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False  # batch row 1: every key masked
    out = ad.Attend().eval()(q, k, v, mask=mask)
    seed = seed_attend(q, k, v, mask=mask)
    torch.testing.assert_close(out[0], seed[0], atol=2e-5, rtol=2e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    # the seed averages the masked values uniformly instead
    torch.testing.assert_close(seed[1], v[1].mean(dim=-2, keepdim=True).expand_as(seed[1]),
                               atol=1e-5, rtol=1e-5)
    # same with a 4-D bool mask and for both backends
    full = torch.ones(2, 4, 4, 6, dtype=torch.bool)
    full[0, 2, 1] = False
    for use_flash in (None, False):
        o = ad.Attend(use_flash=use_flash).eval()(q, k, v, mask=full)
        assert torch.equal(o[0, 2, 1], torch.zeros(16))
        s = seed_attend(q, k, v, mask=full)
        keep = torch.ones(2, 4, 4, dtype=torch.bool)
        keep[0, 2, 1] = False
        torch.testing.assert_close(o[keep], s[keep], atol=2e-5, rtol=2e-5)


def test_float_mask_is_rejected():
    q, k, v = inputs()
    with pytest.raises(ad.AttentionInputError) as ei:
        ad.Attend()(q, k, v, mask=torch.zeros(2, 4, 6, 6))
    assert ei.value.argument == "mask"


def test_padding_mask_must_be_bool():
    """A float (b, j) mask: the error names the caller's own argument, mask,
    and says it must be bool (not key_padding_mask, which the caller never passed)."""
    q, k, v = inputs()
    with pytest.raises(ad.AttentionTypeError) as ei:
        ad.Attend()(q, k, v, mask=torch.ones(2, 6))
    assert ei.value.argument == "mask"
    msg = str(ei.value)
    assert msg.startswith("mask: expected a bool tensor") and "key_padding_mask" not in msg
    assert "got float32 tensor of shape (2, 6)" in msg and "mask.bool()" in msg


def test_padding_mask_of_the_wrong_shape_names_mask():
    q, k, v = inputs()
    with pytest.raises(ad.AttentionInputError) as ei:
        ad.Attend()(q, k, v, mask=torch.ones(3, 6, dtype=torch.bool))
    assert ei.value.argument == "mask" and "key_padding_mask" not in str(ei.value)
    assert "(b, j) = (2, 6)" in str(ei.value) and "(3, 6)" in str(ei.value)


def test_is_a_module_with_repr():
    m = ad.Attend(dropout=0.1, causal=True)
    assert isinstance(m, torch.nn.Module)
    assert "dropout=0.1" in repr(m) and "causal=True" in repr(m)
    assert list(m.parameters()) == []
