"""The ``flex`` backend on the CPU (torch.nn.attention.flex_attention compiled
by inductor).  Compiling costs seconds per signature on the CPU, so this file
uses five signatures and checks the caches with repeated calls; refusals are
checked with explain() (nothing compiles)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch import testing

pytestmark = pytest.mark.skipif(
    bool(ad.get_backend("flex").probe(torch.device("cpu"))),
    reason=f"flex unavailable on the CPU: {ad.get_backend('flex').probe(torch.device('cpu'))}")

BASE = testing.Case(batch=2, heads_q=4, heads_kv=2, seq_q=72, seq_k=72, head_dim=16)
STRUCTURED = replace(BASE, causal=True, window=(8, 0), softcap=2.0, alibi="batch")
CASES = [
    BASE,
    STRUCTURED,
    replace(BASE, mask="padding", causal=True, empty_rows=True),
    replace(BASE, dtype=torch.bfloat16, heads_q=6, seq_q=40, seq_k=130, layout="bshd",
            window=(-1, 3), alibi="heads"),  # 3 query heads per kv head: K/V expanded
]
VARLEN = testing.VarlenCase(seqlens_q=(0, 1, 37, 90, 5), seqlens_k=(3, 0, 40, 90, 9),
                            heads_q=4, heads_kv=2, head_dim=16, causal=True, window=(12, 2),
                            softcap=3.0, alibi="heads")


def _flex_module():
    from attention_dispatch.adapters import flex

    return flex


@pytest.mark.parametrize("case", CASES, ids=str)
def test_flex_matches_the_reference(case):
    result = testing.check_backend("flex", case, "cpu")
    assert result.ok


def test_flex_varlen_matches_the_reference():
    assert testing.check_backend_varlen("flex", VARLEN, "cpu").ok


def test_steady_state_reuses_kernels_and_block_masks():
    flex = _flex_module()
    inputs = testing.make_inputs(STRUCTURED)
    kw = {n: inputs[n] for n in ("causal", "window", "softcap", "alibi_slopes")}
    spec = ad.explain(inputs["q"], inputs["k"], inputs["v"], backend="flex", **kw).spec
    ad.attention(inputs["q"], inputs["k"], inputs["v"], backend="flex", **kw)
    backend = ad.get_backend("flex")
    assert backend.compiles_per_shape and backend.compiled(spec)  # auto may promote it
    assert not backend.compiled(replace(spec, batch=spec.batch + 7))  # asks, compiles nothing
    compiled, masks = dict(flex._compiled), dict(flex._block_masks)
    for _ in range(3):
        ad.attention(inputs["q"], inputs["k"], inputs["v"], backend="flex", **kw)
    assert flex._compiled.keys() == compiled.keys()
    assert all(flex._block_masks[k_] is m for k_, m in masks.items())
    # new key padding values: no compile, no static mask rebuild
    pad = replace(BASE, mask="padding", causal=True)
    testing.check_backend("flex", pad, "cpu", seed=1)
    n = len(flex._compiled)
    testing.check_backend("flex", pad, "cpu", seed=2)
    assert len(flex._compiled) == n


def test_varlen_totals_share_a_kernel():
    """Packed totals round up to a power of two: another batch with other
    lengths (and another number of sequences) in the same bucket (256)
    compiles nothing."""
    flex = _flex_module()
    testing.check_backend_varlen("flex", VARLEN, "cpu")
    n = len(flex._compiled)
    other = replace(VARLEN, seqlens_q=(20, 64, 1, 60), seqlens_k=(33, 70, 0, 50))
    assert testing.check_backend_varlen("flex", other, "cpu").ok
    assert len(flex._compiled) == n


def test_auto_picks_flex_for_softcap_on_the_cpu():
    inputs = testing.make_inputs(STRUCTURED)
    args = (inputs["q"], inputs["k"], inputs["v"])
    kw = {n: inputs[n] for n in ("causal", "window", "softcap", "alibi_slopes")}
    d = ad.explain(*args, **kw)
    assert d.backend == "flex", str(d)
    assert any("softcap" in r for r in d.reasons("sdpa-flash"))
    ref = testing.reference_attention(*args, **kw)[0]
    assert (ad.attention(*args, **kw).double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize("kw,reason", [
    (dict(return_lse=True), "returns no LSE"),
    (dict(grad=True), "inference-only"),
    (dict(dropout_p=0.1), "dropout"),
    (dict(mask=True), "mask kind bool"),
    (dict(small=True), "Sq*Sk=64 on the CPU"),
    (dict(dtype=torch.float64), "dtype float64"),
])
def test_cpu_refusals_have_reasons(kw, reason):
    sq = 8 if kw.pop("small", False) else 72
    dtype = kw.pop("dtype", torch.float32)
    q, k, v = (torch.randn(1, 2, sq, 16, dtype=dtype).requires_grad_(kw.pop("grad", False))
               for _ in range(3))
    if kw.pop("mask", False):
        kw["mask"] = torch.ones(sq, sq, dtype=torch.bool)
    d = ad.explain(q, k, v, backend="flex", **kw)
    assert d.backend is None
    assert any(reason in r for r in d.reasons("flex")), d.reasons("flex")


def test_fresh_code_object_per_signature():
    flex = _flex_module()
    a, b = flex._fresh_copy(flex._call_flex), flex._fresh_copy(flex._call_flex)
    assert a.__code__ is not b.__code__ and a.__code__.co_name != b.__code__.co_name


def test_key_padding_block_mask_classes():
    """Block classes from the static mask and per-block padding counts equal
    create_block_mask's on the combined mask_mod."""
    flex = _flex_module()
    fa = flex._flex()
    sq, sk = 200, 300
    kpm = torch.ones(2, sk, dtype=torch.bool)
    kpm[0, 250:] = False  # the last block partly, nothing else
    kpm[1, :128] = False  # the first block entirely
    static = fa.create_block_mask(flex.dense_mask_mod(sq, sk, True, None, None), None, None,
                                  sq, sk)
    mm = flex.dense_mask_mod(sq, sk, True, None, kpm)
    ours = flex.key_padding_block_mask(static, mm, kpm, sq, sk)
    theirs = fa.create_block_mask(mm, 2, None, sq, sk)
    dense = flex._dense_blocks
    for num, idx in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        a = dense(getattr(ours, num), getattr(ours, idx), (2, 1, 2, 3), kpm.device)
        b = dense(getattr(theirs, num), getattr(theirs, idx), (2, 1, 2, 3), kpm.device)
        assert torch.equal(a, b), (num, a, b)


def test_cuda_refusals_found_by_gpu_fuzzing() -> None:
    """Gradients flex got wrong on an H100 are refused on CUDA, with reasons."""
    import dataclasses

    from attention_dispatch._core.spec import CallSpec

    flex = ad.get_backend("flex")
    base = CallSpec(device_type="cuda", device_index=0, dtype=torch.bfloat16, batch=2,
                    heads_q=12, heads_kv=4, seq_q=100, seq_k=257, head_dim=64, head_dim_v=64,
                    causal=True)
    assert flex.check(base) == []  # forward: fine
    why = flex.check(dataclasses.replace(base, requires_grad=True))
    assert any("GQA group of 3" in w for w in why)
    assert flex.check(dataclasses.replace(base, heads_q=8, requires_grad=True)) == []
    empty = dataclasses.replace(base, heads_q=8, requires_grad=True, key_padding=True)
    assert any("without keys" in w for w in flex.check(empty))
