"""merge_attention: partial results over disjoint key chunks (2 to 8, empty and
fully masked chunks included) merge to the one-call result, in every layout;
gradients through the merge; errors."""

from __future__ import annotations

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch import testing


def _inputs(b=2, hq=4, hkv=2, sq=9, sk=40, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, s, d, generator=g).to(dtype)
                 for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))


def _bounds(sk: int, n: int, seed: int) -> list[int]:
    """n chunk boundaries over [0, sk], one chunk empty when n > 2."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randint(0, sk + 1, (n - 1,), generator=g).tolist())
    if n > 2:
        cuts[1] = cuts[0]  # an empty chunk
    return [0, *cuts, sk]


def _keep(sq: int, sk: int, causal: bool, window) -> torch.Tensor:
    """The full (Sq, Sk) structure, to slice per chunk (chunks shift Sk - Sq)."""
    i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
    d = j - (i + sk - sq)
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        keep &= d <= 0
    if window is not None:
        keep &= (d >= -window[0]) & (d <= window[1])
    return keep


@pytest.mark.parametrize("n", [2, 3, 5, 8])
@pytest.mark.parametrize("backend", ["math", "sdpa-flash"])
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, (6, 0)),
                                           (False, (3, 3))])
def test_merge_of_chunks_equals_one_call(n, backend, causal, window):
    q, k, v = _inputs()
    sq, sk = q.shape[2], k.shape[2]
    keep = _keep(sq, sk, causal, window)
    full, full_lse = ad.attention(q, k, v, mask=keep, backend="math", return_lse=True)
    outs, lses = [], []
    bounds = _bounds(sk, n, seed=n)
    scale = 1 / 16 ** 0.5
    for a, e in zip(bounds, bounds[1:]):
        o, s = ad.attention(q, k[:, :, a:e], v[:, :, a:e], mask=keep[:, a:e], scale=scale,
                            backend=backend, return_lse=True)
        outs.append(o)
        lses.append(s)
    assert any(torch.isneginf(s).any() for s in lses) or not (causal or window)
    out, lse = ad.merge_attention(outs, lses)
    torch.testing.assert_close(out, full, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=2e-6, rtol=1e-5)
    dead = torch.isneginf(full_lse)
    assert torch.equal(torch.isneginf(lse), dead) and (out[dead] == 0).all()


def test_merge_matches_the_float64_reference_with_softcap_and_alibi():
    q, k, v = _inputs(dtype=torch.float64, sq=12, sk=30)
    slopes = torch.tensor([0.3, 0.2, 0.1, 0.05])
    kw = dict(softcap=2.0, causal=True)
    # ALiBi distances depend on Sk - Sq: give each chunk the full-call bias as a float mask
    dist = (torch.arange(12)[:, None] + 30 - 12 - torch.arange(30)[None, :]).abs().double()
    bias = -slopes.double()[:, None, None] * dist
    keep = _keep(12, 30, True, None)
    bias = bias.masked_fill(~keep, float("-inf"))
    ref, ref_lse = testing.reference_attention(q, k, v, softcap=2.0, alibi_slopes=slopes,
                                               causal=True)
    outs, lses = zip(*(ad.attention(q, k[:, :, a:e], v[:, :, a:e], mask=bias[..., a:e],
                                    softcap=kw["softcap"], backend="math", return_lse=True)
                       for a, e in ((0, 7), (7, 7), (7, 22), (22, 30))))
    out, lse = ad.merge_attention(list(outs), list(lses))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_in_half_precision(dtype):
    q, k, v = _inputs(dtype=dtype, sq=16, sk=64, d=32)
    full = ad.attention(q, k, v, backend="math")
    parts = [ad.attention(q, k[:, :, a:a + 16], v[:, :, a:a + 16], return_lse=True,
                          backend="math") for a in range(0, 64, 16)]
    out, lse = ad.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), full.float(), atol=testing.atol(dtype) * 4,
                               rtol=0.0)


def test_bshd_and_varlen_layouts():
    q, k, v = _inputs(sq=6, sk=20)
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    full = ad.attention(qs, ks, vs, layout="bshd")
    parts = [ad.attention(qs, ks[:, a:e], vs[:, a:e], layout="bshd", return_lse=True)
             for a, e in ((0, 5), (5, 20))]
    out, _ = ad.merge_attention([p[0] for p in parts], [p[1] for p in parts], layout="bshd")
    torch.testing.assert_close(out, full)
    # packed: two chunks of each sequence's keys
    cq = torch.tensor([0, 3, 6], dtype=torch.int32)
    tq = torch.randn(6, 4, 16)
    tk, tv = torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    whole = ad.attention_varlen(tq, tk, tv, cq, torch.tensor([0, 4, 10], dtype=torch.int32),
                                3, 6)
    halves = []
    for idx, ck in (([0, 1, 4, 5, 6], [0, 2, 5]), ([2, 3, 7, 8, 9], [0, 2, 5])):
        halves.append(ad.attention_varlen(tq, tk[idx], tv[idx], cq,
                                          torch.tensor(ck, dtype=torch.int32), 3, 3,
                                          return_lse=True))
    out, lse = ad.merge_attention([h[0] for h in halves], [h[1] for h in halves],
                                  layout="thd")
    torch.testing.assert_close(out, whole)
    assert lse.shape == (4, 6)


def test_all_partials_masked_give_zero_and_minus_inf_without_nan():
    outs = [torch.zeros(1, 2, 3, 4) for _ in range(3)]
    lses = [torch.full((1, 2, 3), float("-inf")) for _ in range(3)]
    lses[1][0, 0, 1] = 0.5
    outs[1][0, 0, 1] = 7.0
    out, lse = ad.merge_attention(outs, lses)
    assert torch.isfinite(out).all()
    assert out[0, 0, 1].eq(7.0).all() and lse[0, 0, 1] == 0.5
    assert torch.isneginf(lse).sum() == 5 and out.abs().sum() == 7.0 * 4


def test_single_partial_is_returned_unchanged():
    q, k, v = _inputs()
    o, s = ad.attention(q, k, v, return_lse=True)
    out, lse = ad.merge_attention([o], [s])
    torch.testing.assert_close(out, o)
    torch.testing.assert_close(lse, s)


def test_gradients_flow_through_outputs_and_lses():
    """With lses that carry gradients (here the float64 reference's) the
    merged result differentiates like the one-call result."""
    q, k, v = (t.double().requires_grad_() for t in _inputs(sq=5, sk=12))
    go = torch.randn(2, 4, 5, 16, dtype=torch.float64)
    full, _ = testing.reference_attention(q, k, v)
    want = torch.autograd.grad(full, (q, k, v), go)
    parts = [testing.reference_attention(q, k[:, :, a:e], v[:, :, a:e], scale=0.25)
             for a, e in ((0, 4), (4, 12))]
    out, _ = ad.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    got = torch.autograd.grad(out, (q, k, v), go)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("outs,lses,layout,exc,argument", [
    ([torch.zeros(1, 2, 3, 4)], [], "bhsd", ad.AttentionInputError, "lses"),
    ([], [], "bhsd", ad.AttentionInputError, "lses"),
    ([torch.zeros(1, 2, 3, 4)], [torch.zeros(1, 2, 4)], "bhsd", ad.AttentionInputError,
     "lses[0]"),
    ([torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 5)], [torch.zeros(1, 2, 3)] * 2, "bhsd",
     ad.AttentionInputError, "outs[1]"),
    ([torch.zeros(1, 3, 2, 4)], [torch.zeros(1, 3, 2)], "bshd", ad.AttentionInputError,
     "lses[0]"),
    ([torch.zeros(5, 2, 4)], [torch.zeros(5, 2)], "thd", ad.AttentionInputError, "lses[0]"),
    ([torch.zeros(1, 2, 3, 4)], [torch.zeros(1, 2, 3)], "hsd", ad.AttentionInputError,
     "layout"),
    (torch.zeros(1, 2, 3, 4), [torch.zeros(1, 2, 3)], "bhsd", ad.AttentionTypeError, "outs"),
    ([torch.zeros(1, 2, 3, 4)], [None], "bhsd", ad.AttentionTypeError, "outs[0]"),
])
def test_bad_arguments(outs, lses, layout, exc, argument):
    with pytest.raises(exc) as info:
        ad.merge_attention(outs, lses, layout=layout)
    assert info.value.argument == argument
