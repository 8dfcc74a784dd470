"""TRANSLATION tests of FA4's paged route, on CPU, against a FAKE
``flash_attn.cute`` whose ``flash_attn_varlen_func`` implements the documented
``page_table`` / ``seqused_k`` semantics in float64 (rows' keys gathered from
the page table, bottom-right causal per row).  What is checked: the arguments
the adapter passes (caches as k/v, block_table as page_table, cache_seqlens as
seqused_k, one split, the window and softcap), the result against the paged
float64 reference, and the refusals (sm80, a build without page_table)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attention_dispatch as ad
from _paged import make_case, max_err, paged_reference
from test_flash_attn_translation import (FakeFA2, FakeFA4, fake_attention_one,  # noqa: F401
                                         flash_env)

INF = float("inf")


class FakePagedFA4(FakeFA4):
    """FakeFA4 whose varlen function also takes page_table (paged k/v)."""

    def flash_attn_varlen_func(self, q, k, v, *args: Any, page_table=None, seqused_k=None,
                               softmax_scale=None, causal=False, window_size=(None, None),
                               softcap=0.0, num_splits=1, return_lse=False, **kw: Any) -> Any:
        if page_table is None:
            return super().flash_attn_varlen_func(
                q, k, v, *args, seqused_k=seqused_k, softmax_scale=softmax_scale,
                causal=causal, window_size=window_size, softcap=softcap,
                return_lse=return_lse, **kw)
        self.record("paged", (q, k, v), dict(page_table=page_table, seqused_k=seqused_k,
                                             softmax_scale=softmax_scale, causal=causal,
                                             window_size=window_size, softcap=softcap,
                                             num_splits=num_splits, return_lse=return_lse))
        assert page_table.dtype == torch.int32 and page_table.stride(-1) == 1
        bs, outs, lses = k.shape[1], [], []
        for b in range(q.shape[0]):
            n = int(seqused_k[b])
            blocks = page_table[b, :-(-n // bs)].long()
            kb, vb = k[blocks].flatten(0, 1)[:n], v[blocks].flatten(0, 1)[:n]
            o, lse = fake_attention_one(q[b], kb, vb, softmax_scale, causal, -INF,
                                        window=window_size, softcap=softcap)
            outs.append(o.to(q.dtype))
            lses.append(lse.float())
        return torch.stack(outs), (torch.stack(lses) if return_lse else None)


def _case(dtype=torch.bfloat16):
    return make_case([5, 130, 64, 1], 1, 8, 2, 64, 16, dtype=dtype, seed=2, tail=0.0)


@pytest.mark.parametrize("opts", [dict(), dict(window=(20, 0), softcap=5.0),
                                  dict(causal=False)], ids=str)
def test_fa4_paged_translation(flash_env, opts):  # noqa: F811
    fake = FakePagedFA4()
    flash_env(fake, cc=(9, 0))
    case = _case()
    kw = dict(block_table=case.block_table, cache_seqlens=case.cache_seqlens, **opts)
    dec = ad.explain_paged(case.q, case.k_cache, case.v_cache, backend="flash-attn", **kw)
    assert dec.backend == "flash-attn" and dec.verdicts[0].note.startswith("route: native")
    out, lse = ad.attention_paged(case.q, case.k_cache, case.v_cache, backend="flash-attn",
                                  return_lse=True, **kw)
    (name, (q, k, v), args), = [c for c in fake.calls if c[0] == "paged"]
    assert k is case.k_cache and v is case.v_cache and q.data_ptr() == case.q.data_ptr()
    assert torch.equal(args["page_table"], case.block_table)
    assert args["seqused_k"] is case.cache_seqlens and args["num_splits"] == 1
    assert args["causal"] is False  # Sq == 1: every key, dropped as for dense calls
    if "window" in opts:
        assert args["window_size"] == (20, 0) and args["softcap"] == 5.0
    ref, ref_lse = paged_reference(case, **opts)
    assert max_err(out, ref) <= 2e-2 and lse.shape == ref_lse.shape
    assert max_err(lse, ref_lse) <= 1e-4 * (1 + ref_lse.abs().max().item())


class NoPageFA4(FakeFA4):
    """An FA4 build whose varlen function takes no page_table."""

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q=None, cu_seqlens_k=None,
                               max_seqlen_q=None, max_seqlen_k=None, seqused_k=None,
                               softmax_scale=None, causal=False, return_lse=False) -> Any:
        return super().flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, seqused_k=seqused_k,
            softmax_scale=softmax_scale, causal=causal, return_lse=return_lse)


@pytest.mark.parametrize("fake,cc,why", [
    (NoPageFA4, (9, 0), "this FA4 build's flash_attn_varlen_func takes no page_table"),
    (FakeFA2, (8, 0), "the FA2, flash_attn path takes no page table (FA4 does)"),
])
def test_fa4_paged_refusals(flash_env, fake, cc, why):  # noqa: F811
    """No native route: the gathered one, and the note says why not native."""
    flash_env(fake(), cc=cc)
    case = _case()
    kw = dict(block_table=case.block_table, cache_seqlens=case.cache_seqlens)
    dec = ad.explain_paged(case.q, case.k_cache, case.v_cache, backend="flash-attn", **kw)
    note = dec.verdicts[0].note
    assert note.startswith("route: gathered") and why in note, note
    out = ad.attention_paged(case.q, case.k_cache, case.v_cache, backend="flash-attn", **kw)
    assert max_err(out, paged_reference(case)[0]) <= 2e-2
