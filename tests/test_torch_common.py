"""GQA folding for torch's CUDA kernels (with_gqa), checked with a CPU kernel."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attention_dispatch._core.spec import validate
from attention_dispatch.adapters import _torch_common
from attention_dispatch.adapters._torch_common import _folded_spec, gqa_buffers, with_gqa
from attention_dispatch.testing import reference_attention

seen: list[tuple] = []


def plain_kernel(q, k, v, spec, *, kpm=None, scale=None):  # type: ignore[no-untyped-def]
    """A kernel without GQA: requires Hq == Hkv, records the shapes it got."""
    if q.shape[1] != k.shape[1]:
        raise AssertionError("kernel got GQA")
    seen.append((tuple(q.shape), tuple(k.shape), k.data_ptr()))
    out, lse = reference_attention(q, k, v, key_padding_mask=kpm, causal=spec.causal,
                                   scale=scale)
    return out.to(q.dtype), lse.float()


@pytest.mark.parametrize("sq,causal,padded", [(1, True, False), (1, False, True),
                                               (5, False, False), (5, True, False)])
def test_with_gqa_matches_reference(sq: int, causal: bool, padded: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, sq, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 11, 16, generator=g, dtype=torch.float64) for _ in range(2))
    kpm = torch.ones(2, 11, dtype=torch.bool)
    kpm[1, 6:] = False
    kpm = kpm if padded else None
    spec = validate(q, k, v, key_padding_mask=kpm, causal=causal)
    seen.clear()
    out, lse = with_gqa(plain_kernel, q, k, v, spec, kpm=kpm, scale=0.25)
    ref, ref_lse = reference_attention(q, k, v, key_padding_mask=kpm, causal=causal, scale=0.25)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse.float())
    folded = _folded_spec(spec) is not None
    assert folded == (sq == 1 or not causal)
    if folded:  # K/V reach the kernel as they are: no copy
        assert seen[0][1] == (2, 2, 11, 16) and seen[0][2] == k.data_ptr()
        assert seen[0][0] == (2, 2, 4 * sq, 16)


@pytest.mark.parametrize("version, native", [("2.11.0+cu130", True), ("2.13.0", True),
                                             ("2.10.1", False), ("2.4.0", False)])
def test_native_gqa_on_cuda_from_torch_2_11(monkeypatch: pytest.MonkeyPatch,
                                           request: pytest.FixtureRequest, version: str,
                                           native: bool) -> None:
    """On CUDA with torch >= 2.11 the kernel gets K/V unexpanded (no copy, no fold,
    no buffer estimate); on older torch or the CPU the fold / expansion stays."""
    monkeypatch.setattr(torch, "__version__", version)
    _torch_common._torch_version.cache_clear()
    request.addfinalizer(_torch_common._torch_version.cache_clear)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 5, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 11, 16, generator=g, dtype=torch.float64) for _ in range(2))
    cpu_spec = validate(q, k, v, causal=True)
    spec = dataclasses.replace(cpu_spec, device_type="cuda", device_index=0)
    assert _torch_common.native_gqa_cuda(spec) is native
    assert not _torch_common.native_gqa_cuda(cpu_spec)
    native_here = _torch_common.native_gqa_cuda(spec)
    assert (gqa_buffers(spec, native_here) == []) is native
    grad_spec = dataclasses.replace(spec, requires_grad=True)  # the backward's dK/dV
    assert gqa_buffers(grad_spec, native_here)[0].nbytes == 2 * 2 * 8 * 11 * 16 * 8
    assert gqa_buffers(cpu_spec, False) != []
    got: list[tuple] = []

    def gqa_kernel(q, k, v, spec, *, scale):  # type: ignore[no-untyped-def]
        got.append((tuple(k.shape), k.data_ptr()))
        kk, vv = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
        return reference_attention(q, kk, vv, causal=spec.causal, scale=scale)

    out, _ = with_gqa(gqa_kernel, q, k, v, spec, native=native_here, scale=0.25)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=True, scale=0.25)[0])
    assert (got[0] == ((2, 2, 11, 16), k.data_ptr())) is native


def test_no_fold_for_masks_or_equal_heads() -> None:
    q = torch.randn(1, 4, 3, 8)
    k = torch.randn(1, 2, 5, 8)
    spec = validate(q, k, k)
    assert _folded_spec(dataclasses.replace(spec, mask_kind="bool")) is None
    assert _folded_spec(dataclasses.replace(spec, alibi=True)) is None
    assert _folded_spec(validate(q, q, q)) is None


def test_cudnn_refusals_found_on_the_gpu() -> None:
    """Calls cuDNN gets wrong (measured on an H100) are refused with a reason."""
    import attention_dispatch as ad
    from attention_dispatch._core.spec import CallSpec

    backend = ad.get_backend("sdpa-cudnn")
    base = CallSpec(device_type="cuda", device_index=0, dtype=torch.float16, batch=1,
                    heads_q=2, heads_kv=2, seq_q=1, seq_k=3, head_dim=64, head_dim_v=64)
    assert backend.check(base) == []
    masked = dataclasses.replace(base, mask_kind="bool")
    assert backend.check(masked) == []  # forward only: the dispatcher zeroes dead rows
    why = backend.check(dataclasses.replace(masked, requires_grad=True))
    assert why and "non-finite gradients" in why[0]
    assert backend.check(dataclasses.replace(base, seq_k=1))[0].startswith("Sq = Sk = 1")
    # torch's own call (the "sdpa" backend) picks cuDNN there: the same refusal
    # (found by bench/gpu_fuzz.py on an H200: dq/dk/dv inf for a dead row)
    sdpa = ad.get_backend("sdpa")
    assert sdpa.check(masked) == []
    why = sdpa.check(dataclasses.replace(masked, requires_grad=True))
    assert why and "non-finite gradients" in why[0]
    assert sdpa.check(dataclasses.replace(masked, requires_grad=True, seq_q=2)) == []
