"""Dropout on the attention weights: applied exactly when dropout_p > 0, never
silently ignored, unbiased, reproducible under a seed."""

from __future__ import annotations

import pytest
import torch

import attention_dispatch as ad


def test_mean_over_draws_approaches_no_dropout_output():
    """Inverted dropout is unbiased: E[out_p] = out_0.  N identical batch rows
    give N independent draws in one call."""
    torch.manual_seed(0)
    n, h, sq, sk, d = 4000, 1, 4, 8, 4
    q1, k1, v1 = torch.randn(1, h, sq, d), torch.randn(1, h, sk, d), torch.randn(1, h, sk, d)
    q, k, v = (t.expand(n, -1, -1, -1) for t in (q1, k1, v1))
    ref = ad.attention(q1, k1, v1, backend="math")[0]
    draws = ad.attention(q, k, v, dropout_p=0.5, backend="math")
    mean = draws.mean(0)
    # the draws do differ from the reference ...
    assert (draws - ref).abs().amax() > 0.1
    # ... but their mean converges: per-element std of the mean is std/sqrt(n)
    # (about 0.006 here); 6 standard errors plus a little is the bound
    stderr = draws.std(0) / n ** 0.5
    assert ((mean - ref).abs() <= 6 * stderr + 1e-4).all()
    rel = (mean - ref).norm() / ref.norm()
    assert rel < 0.05, rel


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_fraction_of_dropped_weights_is_p(p):
    """q = 0 makes the weights uniform (1/Sk) and v = identity makes the output
    the weight matrix: each entry is 0 (dropped) or 1 / (Sk * (1 - p))."""
    torch.manual_seed(1)
    b, h, sq, sk = 32, 4, 16, 32
    q = torch.zeros(b, h, sq, sk)
    k = torch.randn(b, h, sk, sk)
    v = torch.eye(sk).expand(b, h, sk, sk)
    w = ad.attention(q, k, v, dropout_p=p, backend="math")
    zero = (w == 0).double().mean().item()
    n = w.numel()  # 65536 entries: the std of the fraction is <= 0.002
    assert abs(zero - p) < 5 * (p * (1 - p) / n) ** 0.5 + 1e-3, zero
    kept = w[w != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1.0 / (sk * (1 - p))))
    # each row's kept weights are rescaled, so a row sums to 1 on average
    assert abs(w.sum(-1).mean().item() - 1.0) < 0.02


def test_seeded_reproducibility():
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    torch.manual_seed(123)
    a = ad.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(123)
    b = ad.attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b)
    torch.manual_seed(124)
    c = ad.attention(q, k, v, dropout_p=0.3)
    assert not torch.equal(a, c)
    # without reseeding: fresh draws
    assert not torch.equal(ad.attention(q, k, v, dropout_p=0.3),
                           ad.attention(q, k, v, dropout_p=0.3))


def test_seeded_reproducibility_of_gradients():
    def run():
        torch.manual_seed(7)
        q, k, v = (torch.randn(2, 2, 6, 8, requires_grad=True) for _ in range(3))
        out = ad.attention(q, k, v, dropout_p=0.4, causal=True)
        out.sum().backward()
        return out.detach(), [t.grad for t in (q, k, v)]

    (o1, g1), (o2, g2) = run(), run()
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("backend", ["auto", "math", "sdpa-flash,math"])
@pytest.mark.parametrize("kw", [{}, {"causal": True}], ids=["plain", "causal"])
def test_dropout_is_never_silently_dropped(backend, kw):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    base = ad.attention(q, k, v, backend=backend, **kw)
    out = ad.attention(q, k, v, dropout_p=0.2, backend=backend, **kw)
    assert out.shape == base.shape
    assert not torch.allclose(out, base)
    assert (out - base).abs().amax() > 1e-3


def test_tiny_dropout_still_applies():
    torch.manual_seed(0)
    q = torch.zeros(8, 4, 32, 32)
    k = torch.randn(8, 4, 32, 32)
    v = torch.eye(32).expand(8, 4, 32, 32)
    w = ad.attention(q, k, v, dropout_p=1e-3)
    assert (w == 0).any()  # about 260 of 262144 weights dropped
    assert ad.explain(q, k, v, dropout_p=1e-3).spec.dropout


def test_forced_backend_without_dropout_refuses():
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    with pytest.raises(ad.BackendUnavailable) as ei:
        ad.attention(q, k, v, dropout_p=0.1, backend="sdpa-flash")
    assert any("dropout" in r for r in ei.value.reasons["sdpa-flash"])


def test_custom_backend_without_dropout_never_gets_dropout_calls(spy_backend):
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    d = ad.explain(q, k, v, dropout_p=0.1, backend="spy,math")
    assert d.backend == "math"
    assert "dropout_p > 0; this kernel cannot drop out" in d.reasons("spy")
    ad.attention(q, k, v, dropout_p=0.1, backend="spy,math")
    assert spy_backend.calls == []


def test_auto_with_dropout_on_cpu_picks_a_dropping_backend():
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    d = ad.explain(q, k, v, dropout_p=0.1)
    assert d.backend is not None
    assert ad.get_backend(d.backend).capabilities.dropout
    from attention_dispatch._core.registry import BUILTINS
    if set(ad.list_backends()) <= set(BUILTINS):
        assert d.backend == "math"
    flash = [x for x in d.verdicts if x.name == "sdpa-flash"][0]
    assert flash.status == "refused"
    assert any("dropout" in r for r in flash.reasons)
    assert d.spec.dropout
    # without dropout sdpa-flash takes the same call
    assert ad.explain(q, k, v).backend == "sdpa-flash"


def test_dropout_keeps_dead_rows_zero():
    q, k, v = (torch.randn(2, 2, 5, 8, requires_grad=True) for _ in range(3))
    kpm = torch.ones(2, 5, dtype=torch.bool)
    kpm[1] = False
    out, lse = ad.attention(q, k, v, key_padding_mask=kpm, dropout_p=0.5, return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))


def test_eval_style_zero_dropout_is_deterministic():
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    assert torch.equal(ad.attention(q, k, v, dropout_p=0.0), ad.attention(q, k, v))
