"""Interleaved kv-head grouping (query head h reads kv head h % Hkv, as in
x-transformers) on top of the contract's grouped convention (h // (Hq // Hkv))."""

from __future__ import annotations

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch.integrations import (grouped_to_interleaved, interleaved_attention,
    interleaved_to_grouped)
from attention_dispatch.testing import reference_attention

F64 = torch.float64


def qkv(hq=6, hkv=2, layout="bhsd"):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, s, 8, dtype=F64, generator=g)
               for h, s in ((hq, 5), (hkv, 7), (hkv, 7)))
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return q, k, v


def interleaved_reference(q, k, v, **kw):
    """Expand K/V so that query head h sees kv head h % Hkv, then plain MHA."""
    heads = torch.arange(q.shape[1]) % k.shape[1]
    return reference_attention(q, k[:, heads], v[:, heads], **kw)


def test_reorder_helpers_are_inverse_and_put_groups_together():
    x = torch.arange(6).view(1, 6, 1, 1).float()  # head h holds h
    g = interleaved_to_grouped(x, heads_kv=2)
    # interleaved heads 0, 2, 4 read kv head 0; grouped positions 0..2 read it
    assert g.flatten().tolist() == [0, 2, 4, 1, 3, 5]
    assert torch.equal(grouped_to_interleaved(g, heads_kv=2), x)
    assert torch.equal(interleaved_to_grouped(x.transpose(1, 2), 2, layout="bshd"),
                       g.transpose(1, 2))


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_interleaved_attention_matches_expanded_reference(layout):
    q, k, v = qkv(layout=layout)
    mask = torch.rand(2, 6, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., -1] = True
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.03, 0.01])
    b = (lambda t: t.transpose(1, 2)) if layout == "bshd" else (lambda t: t)
    out, lse = interleaved_attention(q, k, v, layout=layout, causal=True, mask=mask,
                                     alibi_slopes=slopes, return_lse=True)
    want, want_lse = interleaved_reference(b(q), b(k), b(v), causal=True, mask=mask,
                                           alibi_slopes=slopes)
    torch.testing.assert_close(b(out), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want_lse.float(), rtol=0, atol=1e-5)


def test_grouped_and_interleaved_differ_and_agree_when_they_must():
    q, k, v = qkv()
    assert (ad.attention(q, k, v) - interleaved_attention(q, k, v)).abs().max() > 0.1
    q1, k1, v1 = qkv(hkv=1)
    assert torch.equal(ad.attention(q1, k1, v1), interleaved_attention(q1, k1, v1))


def test_gradients_flow_through_the_reordering():
    q, k, v = (t.requires_grad_() for t in qkv())
    want = interleaved_reference(q, k, v)[0]
    got = interleaved_attention(q, k, v)
    go = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (q, k, v), go)
    for a, b in zip(got_grads, torch.autograd.grad(want, (q, k, v), go)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_bad_heads_raise_typed_errors():
    q, k, v = qkv()
    with pytest.raises(ad.AttentionInputError):
        interleaved_to_grouped(q, heads_kv=4)
    with pytest.raises(ad.AttentionTypeError):
        interleaved_to_grouped(q, heads_kv=0)
    with pytest.raises(ad.AttentionInputError):
        interleaved_attention(q, k, v, layout="sbhd")
