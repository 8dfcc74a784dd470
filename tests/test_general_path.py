"""The general call path's host-side shortcuts, checked against the float64
reference:

* the remembered last signature (dispatch._general_hit): a call that differs
  in any keyed fact (which tensor options are given, their metadata, scalar
  values and types, grad mode) gets its own plan;
* the direct kernel call for bshd and return_lse;
* values of small bool CPU masks remembered by value (_core/maskvalues.py): a
  mask changed in place, a view, another dtype each give the right result;
* key padding that ends every row's real keys at one place runs as the call
  on the keys before it: NaN in padded slots changes nothing, their
  gradients are 0, rows with no key give 0.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch._core import maskvalues
from attention_dispatch._core.guards import tensor_check
from attention_dispatch.testing import reference_attention

from _helpers import assert_close, padding_mask

Tensor = torch.Tensor


def _qkv(b: int = 2, h: int = 2, sq: int = 8, sk: int = 8, d: int = 16, seed: int = 0,
         dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, s, d, generator=g, dtype=dtype)  # type: ignore[return-value]
                 for s in (sq, sk, sk))


def _check(q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> None:
    out = ad.attention(q, k, v, **kw)
    ref_kw = {n: x for n, x in kw.items() if n in ("mask", "key_padding_mask", "causal")}
    ref, lse = reference_attention(q, k, v, **ref_kw)
    assert_close(out, ref.to(out.dtype), 1e-4)


def test_tensor_check_takes_one_tensor_given_twice() -> None:
    q, k, v = _qkv()
    check = tensor_check(q, q, q)
    assert check is not None
    assert check(q, q, q) and check(k, k, k)
    assert not check(q, k, v)  # not aliased like the remembered call: no hit
    assert not check(q, q, q.double())
    pair = tensor_check(q, k, k)
    assert pair is not None and pair(v, q, q) and not pair(q, q, k)
    assert not check(q, q.transpose(2, 3).contiguous().transpose(2, 3), q)


@pytest.mark.parametrize("kw", [dict(return_lse=True), dict(layout="bshd"),
                                dict(layout="bshd", return_lse=True, causal=True)])
def test_direct_bshd_and_lse_match_the_reference(kw: dict) -> None:
    q, k, v = _qkv(sq=5)
    bshd = kw.get("layout") == "bshd"
    args = [t.transpose(1, 2) for t in (q, k, v)] if bshd else [q, k, v]
    for _ in range(3):  # miss, lookup, remembered signature
        res = ad.attention(*args, **kw)
        out, lse = res if kw.get("return_lse") else (res, None)
        ref, ref_lse = reference_attention(q, k, v, causal=kw.get("causal", False))
        assert_close(out.transpose(1, 2) if bshd else out, ref.float(), 1e-4)
        if lse is not None:
            assert lse.dtype == torch.float32 and not lse.requires_grad
            assert_close(lse, ref_lse.float(), 1e-4)


def test_a_call_differing_from_the_remembered_one_gets_its_own_plan() -> None:
    q, k, v = _qkv()
    mask = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.3
    kpm = padding_mask([8, 5], 8)
    calls = [dict(mask=mask), dict(key_padding_mask=kpm), dict(mask=mask),
             dict(mask=mask.float().masked_fill(~mask, float("-inf"))),
             dict(mask=mask[:1]), dict(mask=mask, return_lse=True),
             dict(mask=mask, causal=True), dict(mask=mask, scale=0.5),
             dict(mask=mask, key_padding_mask=kpm), dict(mask=mask)]
    for kw in calls:
        for _ in range(2):
            out = ad.attention(q, k, v, **kw)
            out = out[0] if isinstance(out, tuple) else out
            m = kw.get("mask")
            ref = reference_attention(q, k, v, mask=m, key_padding_mask=kw.get("key_padding_mask"),
                                      causal=kw.get("causal", False), scale=kw.get("scale"))[0]
            assert_close(out, ref.float(), 1e-4)


def test_grad_mode_and_requires_grad_are_keyed_on_the_general_path() -> None:
    q, k, v = _qkv()
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    ad.attention(q, k, v, mask=mask)
    qg = q.clone().requires_grad_()
    out = ad.attention(qg, k, v, mask=mask)
    out.sum().backward()
    qr = q.double().requires_grad_()
    reference_attention(qr, k.double(), v.double(), mask=mask)[0].sum().backward()
    assert_close(qg.grad, qr.grad.float(), 1e-4)  # type: ignore[arg-type]
    with torch.no_grad():
        assert not ad.attention(qg, k, v, mask=mask).requires_grad


def test_a_bool_mask_changed_in_place_gives_the_new_result() -> None:
    q, k, v = _qkv()
    mask = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.3
    for step in range(4):
        _check(q, k, v, mask=mask)
        mask[..., :, step] ^= True
    mask[..., :4, :] = False  # rows with no key: out 0
    _check(q, k, v, mask=mask)
    out = ad.attention(q, k, v, mask=mask)
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4]))


@pytest.mark.parametrize("view", ["transposed", "expanded", "strided"])
def test_bool_mask_views_and_dtypes(view: str) -> None:
    base = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(3)) > 0.4
    base[..., 3, :] = False
    mask = {"transposed": base[..., :8, :8].transpose(-1, -2),
            "expanded": base[:, :, :1, :8].expand(2, 2, 8, 8),
            "strided": base[..., ::2, ::2]}[view]
    for dtype in (torch.float32, torch.float64):
        q, k, v = _qkv(dtype=dtype)
        _check(q, k, v, mask=mask)


def _nan_padded(k: Tensor, v: Tensor, kpm: Tensor) -> tuple[Tensor, Tensor]:
    pad = ~kpm[:, None, :, None]
    return k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("inf"))


@pytest.mark.parametrize("lengths", [[7], [8], [3, 3], [6, 2], [0, 5], [0, 0], [1]])
@pytest.mark.parametrize("kw", [dict(), dict(layout="bshd"), dict(return_lse=True)])
def test_key_padding_with_nan_in_padded_slots(lengths: list[int], kw: dict) -> None:
    q, k, v = _qkv(b=len(lengths))
    kpm = padding_mask(lengths, 8)
    k, v = _nan_padded(k, v, kpm)
    ref, ref_lse = reference_attention(q, k, v, key_padding_mask=kpm)
    bshd = kw.get("layout") == "bshd"
    args = [t.transpose(1, 2) for t in (q, k, v)] if bshd else [q, k, v]
    for _ in range(3):
        res = ad.attention(*args, key_padding_mask=kpm, **kw)
        out, lse = res if kw.get("return_lse") else (res, None)
        assert_close(out.transpose(1, 2) if bshd else out, ref.float(), 1e-4)
        if lse is not None:
            assert torch.equal(lse.isneginf(), ref_lse.isneginf())
            if torch.isfinite(ref_lse).any():
                assert_close(lse, ref_lse.float(), 1e-4)
    for b, n in enumerate(lengths):
        if n == 0:  # a batch row with no key: 0
            assert torch.equal(ref[b], torch.zeros_like(ref[b]))


def test_key_padding_cut_gradients_and_padded_slots() -> None:
    q, k, v = _qkv(b=1)
    kpm = padding_mask([5], 8)
    spec = ad.explain(q, k, v, key_padding_mask=kpm).spec
    assert maskvalues.cut_padding(spec, kpm) is not None  # type: ignore[arg-type]
    ts = [t.clone().requires_grad_() for t in (q, k, v)]
    ad.attention(*ts, key_padding_mask=kpm).square().sum().backward()
    rs = [t.double().requires_grad_() for t in (q, k, v)]
    reference_attention(*rs, key_padding_mask=kpm)[0].square().sum().backward()
    for t, r in zip(ts, rs):
        assert_close(t.grad, r.grad.float(), 1e-4)  # type: ignore[arg-type]
    padded = ts[1].grad[:, :, 5:]  # type: ignore[index]
    assert torch.equal(padded, torch.zeros_like(padded))


def test_key_padding_with_a_mask_causal_and_views() -> None:
    q, k, v = _qkv(b=2, sq=4, sk=8)
    kpm = padding_mask([6, 6], 8)
    view = padding_mask([6, 6, 6, 6], 16).t().contiguous().t()[:2, :8]  # non-contiguous
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[1] = False
    k, v = _nan_padded(k, v, kpm)
    for kw in (dict(key_padding_mask=view), dict(key_padding_mask=kpm, mask=mask),
               dict(key_padding_mask=kpm, causal=True),
               dict(key_padding_mask=kpm, mask=mask[None, None].expand(2, 2, 4, 8))):
        for _ in range(2):
            _check(q, k, v, **kw)


def test_key_padding_changed_in_place_between_calls() -> None:
    q, k, v = _qkv(b=2)
    kpm = padding_mask([8, 8], 8)
    for lengths in ([8, 8], [5, 5], [5, 3], [0, 3], [2, 7]):
        kpm.copy_(padding_mask(lengths, 8))
        kn, vn = _nan_padded(k, v, kpm)
        _check(q, kn, vn, key_padding_mask=kpm)


def test_large_masks_are_derived_per_call() -> None:
    big = torch.ones(1, maskvalues.LIMIT + 1, dtype=torch.bool)
    assert maskvalues.value_key(big) is None
    assert maskvalues.value_key(torch.ones(4, 4)) is None  # float: per call
    assert maskvalues.value_key(None) == ()
    small = torch.ones(2, 3, dtype=torch.bool)
    assert maskvalues.value_key(small) == maskvalues.value_key(small.t().contiguous().t())
    changed = small.clone()
    changed[0, 0] = False
    assert maskvalues.value_key(small) != maskvalues.value_key(changed)


def test_explain_still_names_the_key_padding_copy() -> None:
    q, k, v = _qkv(b=1)
    d = ad.explain(q, k, v, key_padding_mask=padding_mask([7], 8))
    assert d.backend == "sdpa-flash"
    assert any("key_padding_mask" in c for c in d.copies)


def test_left_padding_with_causal_leaves_rows_without_a_key() -> None:
    """Rows before a row's first real key have no key under causal: 0, every call."""
    q, k, v = _qkv(b=2)
    kpm = torch.ones(2, 8, dtype=torch.bool)
    kpm[0, :3] = False
    kpm[1, :6] = False
    k, v = _nan_padded(k, v, kpm)
    for _ in range(3):
        _check(q, k, v, key_padding_mask=kpm, causal=True)
        out = ad.attention(q, k, v, key_padding_mask=kpm, causal=True)
        assert torch.equal(out[1, :, :6], torch.zeros_like(out[1, :, :6]))


def test_facts_remembered_in_inference_mode_serve_calls_with_gradients() -> None:
    """A bias or padded-slot index remembered during torch.inference_mode() must
    not be an inference tensor: a later call's backward saves it."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 2, 4, 8, generator=g)
    k, v = (torch.randn(2, 2, 8, 8, generator=g) for _ in range(2))
    kpm = torch.ones(2, 8, dtype=torch.bool)
    kpm[0, 3] = False
    mask = torch.rand(4, 8, generator=g) > 0.3
    maskvalues._derived.clear()
    with torch.inference_mode():
        ad.attention(q, k, v, key_padding_mask=kpm)
        ad.attention(q, k, v, mask=mask)
    for kw in (dict(key_padding_mask=kpm), dict(mask=mask)):
        for name in ("auto", "math", "sdpa-flash"):
            qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
            out = ad.attention(qg, kg, v, backend=name, **kw)
            out.sum().backward()
            ref, _ = reference_attention(qg.double(), kg.double(), v.double(), **kw)
            assert_close(out, ref, tol=1e-5)


def test_large_derived_tensors_are_not_remembered() -> None:
    """A bias with causal folded in grows as (B, 1, Sq, Sk): past MAX_TENSOR
    elements it is made per call, so the cache stays small."""
    maskvalues._derived.clear()
    big = maskvalues.derived(("test", 1), lambda: torch.zeros(maskvalues.MAX_TENSOR + 1))
    small = maskvalues.derived(("test", 2), lambda: (torch.zeros(4), 3))
    assert big.numel() == maskvalues.MAX_TENSOR + 1
    assert ("test", 1) not in maskvalues._derived and ("test", 2) in maskvalues._derived
    assert maskvalues.derived(("test", 2), lambda: None) is small


class _LongKeysOnly(ad.Backend):
    """math's answer; refuses calls with fewer than 16 keys, records what it got."""

    name = "long-keys-only"
    capabilities = ad.Capabilities(device_types=frozenset({"cpu"}),
                                   dtypes=frozenset({torch.float32}), dropout=True)
    seen: list[int] = []

    def check(self, spec: Any) -> list[str]:
        return [f"seq_k={spec.seq_k}; allowed: >= 16"] if spec.seq_k < 16 else []

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> Any:
        self.seen.append(k.shape[2])
        return ad.get_backend("math").forward(q, k, v, **kw)


def test_key_padding_cut_only_where_the_backend_takes_the_shorter_call() -> None:
    """The cut (right padding of one length run on the real keys only) is a call
    the backend was not asked about: it must accept that shorter call too."""
    ad.register_backend(_LongKeysOnly.name)(_LongKeysOnly)
    try:
        g = torch.Generator().manual_seed(6)
        q, k, v = (torch.randn(2, 2, n, 8, generator=g) for n in (4, 32, 32))
        for n, expect in ((20, 20), (5, 32)):  # 5 keys: refused, so no cut
            kpm = torch.arange(32)[None, :].expand(2, 32) < n
            _LongKeysOnly.seen.clear()
            out = ad.attention(q, k, v, key_padding_mask=kpm, backend=_LongKeysOnly.name)
            assert _LongKeysOnly.seen == [expect]
            ref, _ = reference_attention(q.double(), k.double(), v.double(),
                                         key_padding_mask=kpm)
            assert_close(out, ref, tol=1e-5)
    finally:
        ad.unregister_backend(_LongKeysOnly.name)
