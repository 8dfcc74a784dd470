"""attention_varlen: packed ragged batches (lengths 0 and 1 included), causal
bottom-right per sequence, GQA, windows, softcap, ALiBi, lse and gradients
against a per-sequence float64 reference, on every CPU backend (natively or
padded); the pad/unpad helpers; key-padding calls routed to varlen backends;
errors before any kernel."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch._core import packing
from attention_dispatch._core import varlen as _varlen
from attention_dispatch import testing
from attention_dispatch.testing import VarlenCase

CASES = testing.varlen_cases()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_varlen_conformance(cpu_backend, case):
    try:
        assert testing.check_backend_varlen(cpu_backend, case, "cpu").ok
    except ad.BackendUnavailable as exc:
        assert cpu_backend != "math", f"math must take every varlen case:\n{exc}"
        assert exc.reasons.get(cpu_backend), exc
        pytest.skip(f"{cpu_backend} refuses {case}: {exc.reasons[cpu_backend]}")


def test_cases_cover_ragged_lengths():
    cases = testing.varlen_cases(dtypes=(torch.float32,))
    lengths = {n for c in cases for n in c.seqlens_q + c.lengths_k}
    assert {0, 1} <= lengths
    assert any(c.causal and any(a > b for a, b in zip(c.seqlens_q, c.lengths_k)) for c in cases)
    assert any(c.heads_kv == 1 for c in cases) and any(c.extra_max for c in cases)
    assert any(c.window for c in cases) and any(c.softcap for c in cases)
    assert {c.alibi for c in cases} == {"none", "heads", "batch"}
    assert any(c.grad for c in cases) and any(c.lse for c in cases)


def _packed(lq=(4, 0, 1, 6), lk=(5, 2, 0, 6), hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = [torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32) for n in (lq, lk)]
    q = torch.randn(sum(lq), hq, d, generator=g)
    k, v = (torch.randn(sum(lk), hkv, d, generator=g) for _ in range(2))
    return q, k, v, cu[0], cu[1], max(lq), max(lk)


@pytest.mark.parametrize("causal", [False, True])
def test_equals_one_dense_call_per_sequence(causal):
    q, k, v, cq, ck, mq, mk = _packed()
    out = ad.attention_varlen(q, k, v, cq, ck, mq, mk, causal=causal, window=(2, 1))
    for b in range(len(cq) - 1):
        qs, ks, vs = q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        want = ad.attention(qs[None], ks[None], vs[None], layout="bshd", causal=causal,
                            window=(2, 1), backend="math")[0]
        torch.testing.assert_close(out[cq[b]:cq[b + 1]], want)


def test_check_values_false_skips_the_host_read(monkeypatch):
    """check_values=False: the same answer on valid values, cu_seqlens never
    read on the host (no synchronisation per layer); shapes still checked."""
    q, k, v, cq, ck, mq, mk = _packed()
    checked = ad.attention_varlen(q, k, v, cq, ck, mq, mk, causal=True)

    def read(*a, **kw):
        raise AssertionError("the values were read")

    monkeypatch.setattr(_varlen, "_check_cu_values", read)
    got = ad.attention_varlen(q, k, v, cq, ck, mq, mk, causal=True, check_values=False)
    assert torch.equal(got, checked)
    with pytest.raises(AssertionError, match="values were read"):
        ad.attention_varlen(q, k, v, cq, ck, mq, mk, causal=True)
    with pytest.raises(ad.AttentionInputError, match="cu_seqlens_k"):
        ad.attention_varlen(q, k, v, cq, ck[:-1], mq, mk, check_values=False)


def test_routes_native_and_padded(register_temp):
    """A varlen backend gets forward_varlen; any other the padded dense call."""
    seen: dict[str, list] = {"varlen": [], "dense": []}

    class Native(ad.Backend):
        capabilities = ad.Capabilities(device_types=frozenset({"cpu"}),
                                       dtypes=frozenset({torch.float32}), varlen=True,
                                       empty_rows_exact=True)

        def forward(self, q, k, v, **kw):
            raise AssertionError("the dense path must not run")

        def forward_varlen(self, q, k, v, *, spec, cu_seqlens_q, cu_seqlens_k, **kw):
            seen["varlen"].append(spec)
            out, lse = testing.reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                scale=kw["scale"])
            return out.float(), lse.float() if spec.return_lse else None

    class Dense(ad.Backend):
        capabilities = ad.Capabilities(device_types=frozenset({"cpu"}),
                                       dtypes=frozenset({torch.float32}))

        def forward(self, q, k, v, *, spec, mask, key_padding_mask, dropout_p, scale):
            seen["dense"].append(spec)
            out, lse = testing.reference_attention(q, k, v, key_padding_mask=key_padding_mask,
                                                   scale=scale)
            return out.float(), lse.float()

    register_temp("native", Native)
    register_temp("dense", Dense)
    q, k, v, cq, ck, mq, mk = _packed()
    want = testing.reference_varlen(q, k, v, cq, ck)[0].float()
    torch.testing.assert_close(ad.attention_varlen(q, k, v, cq, ck, mq, mk, backend="native"),
                               want)
    torch.testing.assert_close(ad.attention_varlen(q, k, v, cq, ck, mq, mk, backend="dense"),
                               want)
    (vspec,), (dspec,) = seen["varlen"], seen["dense"]
    assert vspec.varlen and vspec.batch == 4 and (vspec.seq_q, vspec.seq_k) == (mq, mk)
    assert not dspec.varlen and dspec.key_padding and (dspec.seq_q, dspec.seq_k) == (mq, mk)


def test_key_padding_routes_to_a_varlen_backend(register_temp):
    """Dense key-padding calls run on a varlen backend that lacks key_padding
    (keys unpacked), when nothing depends on key positions; otherwise it refuses."""
    calls: list[Any] = []

    class VarlenOnly(ad.Backend):
        capabilities = ad.Capabilities(device_types=frozenset({"cpu"}),
                                       dtypes=frozenset({torch.float32}), key_padding=False,
                                       varlen=True)

        def forward(self, q, k, v, *, spec, mask, key_padding_mask, dropout_p, scale):
            assert key_padding_mask is None
            return testing.reference_attention(q, k, v, scale=scale)[0].float(), None

        def forward_varlen(self, q, k, v, *, spec, cu_seqlens_q, cu_seqlens_k, **kw):
            calls.append((tuple(q.shape), tuple(k.shape), cu_seqlens_k.tolist()))
            out, lse = testing.reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                scale=kw["scale"])
            return out.float(), lse.float() if spec.return_lse else None

    register_temp("varlen-only", VarlenOnly)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, s, 8, generator=g) for s in (5, 7, 7))
    kpm = torch.rand(3, 7, generator=g) > 0.4
    kpm[1] = False  # a batch row without keys: zeros, lse -inf
    out, lse = ad.attention(q, k, v, key_padding_mask=kpm, backend="varlen-only",
                            return_lse=True)
    ref_out, ref_lse = testing.reference_attention(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref_out.float())
    torch.testing.assert_close(lse, ref_lse.float())
    assert calls and calls[0][0] == (15, 4, 8) and calls[0][1][0] == int(kpm.sum())
    d = ad.explain(q, k, v, key_padding_mask=kpm, causal=True, backend="varlen-only")
    assert any("key_padding_mask" in r for r in d.reasons("varlen-only"))
    q1 = q[:, :, :1]
    out1 = ad.attention(q1, k, v, key_padding_mask=kpm, causal=True, backend="varlen-only")
    torch.testing.assert_close(out1, testing.reference_attention(
        q1, k, v, key_padding_mask=kpm, causal=True)[0].float())


@pytest.mark.parametrize("lq,lk", [((0, 0), (3, 2)), ((2, 3), (0, 0)), ((), ())])
def test_empty_totals(lq, lk):
    q, k, v, cq, ck, mq, mk = _packed(lq, lk) if lq else (
        torch.randn(0, 4, 16), torch.randn(0, 2, 16), torch.randn(0, 2, 16),
        torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), 0, 0)
    q.requires_grad_()
    out, lse = ad.attention_varlen(q, k, v, cq, ck, mq, mk, causal=True, return_lse=True)
    assert out.shape == (q.shape[0], 4, 16) and lse.shape == (4, q.shape[0])
    assert (out == 0).all() and torch.isneginf(lse).all()
    out.sum().backward()
    assert q.grad is not None and (q.grad == 0).all()


def test_pad_unpad_roundtrip_and_alignment():
    q, _, _, cq, _, mq, _ = _packed(lq=(3, 0, 1, 5))
    dense, real = packing.pad_varlen(q, cq, mq + 2)
    assert dense.shape == (4, mq + 2, 4, 16)
    assert real.tolist()[0] == [False] * 4 + [True] * 3  # right-aligned: padding first
    assert not real[1].any() and real[3].sum() == 5
    assert (dense[~real] == 0).all()
    torch.testing.assert_close(packing.unpad_varlen(dense, cq, q.shape[0]), q)
    seq, pos = packing.token_positions(cq, q.shape[0])
    assert seq.tolist() == [0, 0, 0, 2, 3, 3, 3, 3, 3] and pos.tolist()[3:5] == [0, 0]


def test_alive_tokens():
    cq = torch.tensor([0, 3, 5, 6], dtype=torch.int32)
    ck = torch.tensor([0, 1, 1, 4], dtype=torch.int32)
    alive = packing.varlen_alive(cq, ck, 6, causal=True, window=None)
    # seq 0: Lq 3, Lk 1: query i sees j <= i - 2 -> only i = 2; seq 1: no keys
    assert alive.tolist() == [False, False, True, False, False, True]


def test_decisions_are_cached_and_cleared(spy_class, register_temp):
    q, k, v, cq, ck, mq, mk = _packed()
    ad.attention_varlen(q, k, v, cq, ck, mq, mk)
    assert _varlen._plans
    q2, k2, v2, cq2, ck2, _, _ = _packed(lq=(2, 2, 2, 2), lk=(1, 1, 1, 1))
    n = len(_varlen._plans)
    ad.attention_varlen(q2, k2, v2, cq2, ck2, mq, mk)  # other totals, same signature
    assert len(_varlen._plans) == n
    ad.clear_cache()
    assert not _varlen._plans


def _bad(**change: Any) -> dict[str, Any]:
    q, k, v, cq, ck, mq, mk = _packed()
    kw = dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq, max_seqlen_k=mk)
    kw.update(change)
    return kw


BAD = [
    (dict(q=torch.randn(2, 4, 4, 16)), ad.AttentionInputError, "q"),
    (dict(k=torch.randn(13, 3, 16), v=torch.randn(13, 3, 16)), ad.AttentionInputError, "k"),
    (dict(v=torch.randn(12, 2, 16)), ad.AttentionInputError, "v"),
    (dict(v=torch.randn(13, 2, 16, dtype=torch.float64)), ad.AttentionTypeError, "v"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 4, 5, 11])), ad.AttentionTypeError, "cu_seqlens_q"),
    (dict(cu_seqlens_q=[0, 4, 4, 5, 11]), ad.AttentionTypeError, "cu_seqlens_q"),
    (dict(cu_seqlens_k=torch.tensor([[0, 5]], dtype=torch.int32)), ad.AttentionInputError,
     "cu_seqlens_k"),
    (dict(cu_seqlens_k=torch.tensor([0, 5, 13], dtype=torch.int32)), ad.AttentionInputError,
     "cu_seqlens_k"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 3, 5, 11], dtype=torch.int32)),
     ad.AttentionInputError, "cu_seqlens_q"),
    (dict(cu_seqlens_q=torch.tensor([1, 4, 4, 5, 11], dtype=torch.int32)),
     ad.AttentionInputError, "cu_seqlens_q"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 4, 5, 10], dtype=torch.int32)),
     ad.AttentionInputError, "cu_seqlens_q"),
    (dict(max_seqlen_q=5), ad.AttentionInputError, "max_seqlen_q"),
    (dict(max_seqlen_k=-1), ad.AttentionTypeError, "max_seqlen_k"),
    (dict(max_seqlen_k=6.0), ad.AttentionTypeError, "max_seqlen_k"),
    (dict(alibi_slopes=torch.ones(3, 4)), ad.AttentionInputError, "alibi_slopes"),
    (dict(window=(0, -3)), ad.AttentionInputError, "window"),
    (dict(softcap=-2.0), ad.AttentionInputError, "softcap"),
    (dict(causal=1), ad.AttentionTypeError, "causal"),
]


@pytest.mark.parametrize("change,exc,argument", BAD,
                         ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_varlen_arguments_fail_before_any_kernel(spy_backend, change, exc, argument):
    with pytest.raises(exc) as info:
        ad.attention_varlen(**_bad(**change), backend="spy")
    assert info.value.argument == argument and "expected" in str(info.value)
    assert spy_backend.calls == []


def test_batch_alibi_slopes_index_the_sequences():
    q, k, v, cq, ck, mq, mk = _packed()
    slopes = torch.tensor([[0.5, 0.1, 0.2, 0.3]] * 4) * torch.arange(1, 5)[:, None]
    out = ad.attention_varlen(q, k, v, cq, ck, mq, mk, alibi_slopes=slopes.float())
    want = testing.reference_varlen(q, k, v, cq, ck, alibi_slopes=slopes)[0].float()
    torch.testing.assert_close(out, want)


def test_varlen_case_str_is_informative():
    case = VarlenCase(seqlens_k=(1, 2, 3, 4, 5), causal=True, window=(2, 0), softcap=1.0,
                      alibi="batch", extra_max=2)
    s = str(case)
    for part in ("q5,0,1,9,3", "k1,2,3,4,5", "causal", "window2,0", "softcap1.0", "alibi-batch",
                 "max+2"):
        assert part in s
