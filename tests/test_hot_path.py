"""The plain call's hot path (dispatch._plain, Plan.plain, the remembered
signature of _core/guards.py): the same results as the general path, every
check kept.

* the plain kernel call gives bit-for-bit the output (and gradients) of the
  backend's ``forward``, and matches the float64 reference;
* a call that differs from the remembered one in any keyed fact (shape,
  strides, dtype, requires_grad, grad mode, causal, scale, selection) gets
  its own plan: right results, the right backend;
* verify mode, bad input and the memory plan's copies still apply.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch._core import dispatch as _dispatch
from attention_dispatch._core.guards import tensor_check
from attention_dispatch.testing import reference_attention

from _helpers import assert_close

Tensor = torch.Tensor


def _qkv(hq: int = 2, hkv: int = 2, sq: int = 8, sk: int = 8, d: int = 16,
         dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, hq, sq, d, generator=g, dtype=dtype),
            torch.randn(2, hkv, sk, d, generator=g, dtype=dtype),
            torch.randn(2, hkv, sk, d, generator=g, dtype=dtype))


def _generic(q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Tensor:
    """The same call through the general path (return_lse forces it)."""
    return ad.attention(q, k, v, return_lse=True, **kw)[0]


def _ref(q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Tensor:
    return reference_attention(q.detach(), k.detach(), v.detach(), **kw)[0]


CASES = [
    dict(),
    dict(kw=dict(causal=True)),
    dict(sq=3, sk=11, kw=dict(causal=True)),  # bottom-right, through the bias
    dict(sq=1, sk=9, kw=dict(causal=True)),
    dict(hq=4, hkv=2),  # GQA
    dict(kw=dict(scale=0.3)),
    dict(kw=dict(scale=0.3, causal=True)),
    dict(d=8, sq=5, sk=7),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_plain_path_equals_the_general_path_bit_for_bit(case: dict) -> None:
    kw = case.get("kw", {})
    shape = {n: case[n] for n in ("hq", "hkv", "sq", "sk", "d") if n in case}
    q, k, v = _qkv(**shape)
    first = ad.attention(q, k, v, **kw)
    again = ad.attention(q, k, v, **kw)  # the remembered signature
    general = _generic(q, k, v, **kw)
    assert torch.equal(first, general) and torch.equal(again, general)
    ref_kw = {"causal": kw.get("causal", False), "scale": kw.get("scale")}
    assert_close(again, _ref(q, k, v, **ref_kw), tol=1e-5)


def _bshd(t: Tensor) -> Tensor:
    """``t`` (B, H, S, D) stored as (B, S, H, D), given in layout "bshd"."""
    return t.transpose(1, 2).contiguous()


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_bshd_plain_path_equals_the_general_path_bit_for_bit(case: dict) -> None:
    # layout="bshd" plain calls take the bhsd plain path on transposed views
    kw = case.get("kw", {})
    shape = {n: case[n] for n in ("hq", "hkv", "sq", "sk", "d") if n in case}
    q, k, v = (_bshd(t) for t in _qkv(**shape))
    first = ad.attention(q, k, v, layout="bshd", **kw)
    again = ad.attention(q, k, v, layout="bshd", **kw)  # the remembered signature
    general = _generic(q, k, v, layout="bshd", **kw)
    assert torch.equal(first, general) and torch.equal(again, general)
    assert again.shape == q.shape[:3] + v.shape[3:]
    ref_kw = {"causal": kw.get("causal", False), "scale": kw.get("scale")}
    views = [t.transpose(1, 2) for t in (q, k, v)]
    assert_close(again.transpose(1, 2), _ref(*views, **ref_kw), tol=1e-5)


def test_bshd_plain_calls_use_the_remembered_signature(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    q, k, v = (_bshd(t) for t in _qkv(seed=3))
    ad.attention(q, k, v, layout="bshd")
    ad.attention(q, k, v, layout="bshd")
    assert _dispatch._memo[0] is not None
    lookups: list[int] = []
    lookup = _dispatch._plain_lookup

    def counted(*a: Any) -> Any:
        lookups.append(1)
        return lookup(*a)

    monkeypatch.setattr(_dispatch, "_plain_lookup", counted)
    out = ad.attention(q, k, v, layout="bshd")
    assert lookups == []  # the remembered signature, no cache key built
    ad.attention(q, k, v[:, :, :, :8].contiguous(), layout="bshd")  # another Dv
    assert lookups == [1]
    views = [t.transpose(1, 2) for t in (q, k, v)]
    assert_close(out.transpose(1, 2), _ref(*views), tol=1e-5)


def test_bshd_plain_calls_yield_to_a_policy(spy_backend: Any) -> None:
    q, k, v = (_bshd(t) for t in _qkv(seed=4))
    ad.attention(q, k, v, layout="bshd")
    ad.attention(q, k, v, layout="bshd")
    with ad.use_backend(spy_backend.name):
        out = ad.attention(q, k, v, layout="bshd")
    assert spy_backend.calls, "use_backend must reach a remembered bshd signature"
    views = [t.transpose(1, 2) for t in (q, k, v)]
    assert_close(out.transpose(1, 2), _ref(*views), tol=1e-5)


def test_bshd_bad_input_is_worded_in_the_callers_layout() -> None:
    q, k, v = (_bshd(t) for t in _qkv(hq=2, hkv=2))
    ad.attention(q, k, v, layout="bshd")
    with pytest.raises(ad.AttentionInputError, match="got 2 heads"):
        ad.attention(q[:, :, :1], k, v, layout="bshd")  # 1 query head, 2 kv heads
    with pytest.raises(ad.AttentionInputError, match="q"):
        ad.attention(q[0], k, v, layout="bshd")  # 3-d
    with pytest.raises(ad.AttentionTypeError, match="q"):
        ad.attention([1.0], k, v, layout="bshd")  # type: ignore[arg-type]


def test_gradients_equal_the_general_path() -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(sq=6, sk=10))
    grads = []
    for fn in (lambda: ad.attention(q, k, v, causal=True),
               lambda: _generic(q, k, v, causal=True)):
        out = fn()
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_plain_kernel_is_torchs_own_call_when_scale_is_default() -> None:
    q, k, v = _qkv()
    out = ad.attention(q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert ad.explain(q, k, v).backend != "sdpa-flash" or torch.equal(out, want)
    assert_close(out, _ref(q, k, v), tol=1e-5)


VARIANTS = {
    "shape": lambda q, k, v: (q[:, :, :5], k, v),
    "strides": lambda q, k, v: (q.transpose(2, 3).contiguous().transpose(2, 3), k, v),
    "last-dim stride": lambda q, k, v: (q, torch.cat([k, k], -1)[..., ::2], v),
    "dtype": lambda q, k, v: (q.double(), k.double(), v.double()),
    "expanded": lambda q, k, v: (q, k[:, :1].expand_as(k), v),
    "offset": lambda q, k, v: (torch.cat([q.flatten(), q.flatten()])[3:3 + q.numel()]
                               .view_as(q), k, v),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_call_that_differs_from_the_remembered_one_gets_its_own_plan(name: str) -> None:
    q, k, v = _qkv(seed=1)
    ad.attention(q, k, v)  # remembered
    q2, k2, v2 = VARIANTS[name](q, k, v)
    out = ad.attention(q2, k2, v2)
    assert out.dtype == q2.dtype
    assert_close(out, _ref(q2, k2, v2), tol=1e-5)
    assert torch.equal(out, _generic(q2, k2, v2))
    back = ad.attention(q, k, v)  # and back again
    assert_close(back, _ref(q, k, v), tol=1e-5)


def test_grad_mode_requires_grad_causal_scale_are_keyed() -> None:
    q, k, v = _qkv(sq=4, sk=8)
    with torch.no_grad():
        ad.attention(q, k, v)
    out = ad.attention(q, k, v, causal=True)
    assert_close(out, _ref(q, k, v, causal=True), tol=1e-5)
    out = ad.attention(q, k, v, scale=0.1)
    assert_close(out, _ref(q, k, v, scale=0.1), tol=1e-5)
    qg = q.clone().requires_grad_()
    with torch.no_grad():
        assert ad.attention(qg, k, v).grad_fn is None
    assert ad.attention(qg, k, v).grad_fn is not None
    with torch.no_grad():
        assert ad.attention(qg, k, v).grad_fn is None


def test_selection_context_is_keyed(spy_backend: Any) -> None:
    q, k, v = _qkv()
    ad.attention(q, k, v)
    ad.attention(q, k, v)
    with ad.use_backend("spy"):
        out = ad.attention(q, k, v)
    assert len(spy_backend.calls) == 1
    assert_close(out, _ref(q, k, v), tol=1e-5)
    ad.attention(q, k, v)
    assert len(spy_backend.calls) == 1


def test_the_remembered_call_yields_to_every_ambient_setting() -> None:
    # attention() checks the remembered plain signature inline: each context
    # or flag that changes a decision must send the call past it
    q, k, v = _qkv()
    ad.attention(q, k, v)
    ad.attention(q, k, v)
    m = _dispatch._memo[0]
    assert m is not None
    ran: list[int] = []

    def spy(*a: Tensor) -> Tensor:
        ran.append(1)
        return m[8](*a)

    def install() -> None:
        _dispatch._memo[0] = m[:8] + (spy,) + m[9:]

    install()
    ad.attention(q, k, v)
    assert ran == [1]  # unchanged ambient state: the remembered call

    @contextlib.contextmanager
    def torch_deterministic() -> Any:
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(False)

    settings = {"use_backend": lambda: ad.use_backend("math"),
                "deterministic": lambda: ad.use_policy(deterministic=True),
                "max_extra_bytes": lambda: ad.use_policy(max_extra_bytes=1 << 40),
                "verify": lambda: ad.verify(1), "torch flag": torch_deterministic}
    for name, setting in settings.items():
        install()
        with setting():
            out = ad.attention(q, k, v)
        assert ran == [1], name
        assert_close(out, _ref(q, k, v), tol=1e-5)
    install()
    ad.attention(q, k, v, deterministic=False)  # set per call: the slower path
    assert ran == [1]


@pytest.mark.parametrize("env, remembered", [
    ({}, True), ({"ATTENTION_DISPATCH_DETERMINISTIC": "0"}, True),
    ({"ATTENTION_DISPATCH_DETERMINISTIC": "1"}, False),
    ({"ATTENTION_DISPATCH_MAX_EXTRA_BYTES": "1GiB"}, False),
    ({"ATTENTION_DISPATCH_VERIFY": "2"}, False)])
def test_signature_is_remembered_only_under_a_neutral_environment(
        monkeypatch: pytest.MonkeyPatch, env: dict, remembered: bool) -> None:
    # the inline check reads no environment: a policy or verify count set
    # there keeps every call on the path that applies it
    for name in ("ATTENTION_DISPATCH_DETERMINISTIC", "ATTENTION_DISPATCH_MAX_EXTRA_BYTES",
                 "ATTENTION_DISPATCH_VERIFY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ad.clear_cache()
    try:
        q, k, v = _qkv()
        for _ in range(3):
            out = ad.attention(q, k, v)
        assert (_dispatch._memo[0] is not None) is remembered
        assert_close(out, _ref(q, k, v), tol=1e-5)
    finally:
        monkeypatch.undo()
        ad.clear_cache()


def test_clear_cache_forgets_the_remembered_signature() -> None:
    q, k, v = _qkv()
    ad.attention(q, k, v)
    ad.attention(q, k, v)  # a hit: remembered
    assert _dispatch._memo[0] is not None
    ad.clear_cache()
    assert _dispatch._memo[0] is None


def test_bad_input_still_raises_typed_errors_after_a_remembered_call() -> None:
    q, k, v = _qkv()
    ad.attention(q, k, v)
    with pytest.raises(ad.AttentionTypeError, match="k"):
        ad.attention(q, k.double(), v)
    with pytest.raises(ad.AttentionTypeError, match="q"):
        ad.attention([1.0], k, v)  # type: ignore[arg-type]
    with pytest.raises(ad.AttentionInputError):
        ad.attention(q, k[:, :, :, :8], v)


def test_verify_mode_checks_plain_calls(register_temp: Any, tmp_path: Any,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import _wrong_backend

    monkeypatch.setenv("ATTENTION_DISPATCH_CACHE_DIR", str(tmp_path))
    register_temp(_wrong_backend.NAME, _wrong_backend.WrongOn16)
    q, k, v = _qkv(sq=4, sk=16)
    with ad.use_backend([_wrong_backend.NAME, "auto"]):
        wrong = ad.attention(q, k, v)  # not verified: wrong, as the backend is
        assert not torch.allclose(wrong, _ref(q, k, v).float(), atol=1e-3)
        with ad.verify(1):
            out = ad.attention(q, k, v)
    assert_close(out, _ref(q, k, v), tol=1e-5)


def test_tensor_check_refuses_each_keyed_difference() -> None:
    q, k, v = _qkv()
    check = tensor_check(q, k, v)
    assert check is not None  # this torch provides it: the fast path is exercised
    assert check(*_qkv(seed=5))
    for name, fn in VARIANTS.items():
        if name != "offset":  # not keyed: pointer alignment is checked per call
            assert not check(*fn(q, k, v)), name
    assert not check(q, k.clone().requires_grad_(), v)


def test_default_scale_is_the_kernels_default() -> None:
    # the plain call leaves scale out when it equals torch's default, 1/sqrt(D)
    for d in (8, 16, 24, 40, 64, 80, 96, 128, 160, 256):
        q, k, v = _qkv(d=d)
        want = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, scale=1.0 / math.sqrt(d))[0]
        assert torch.equal(torch._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0], want)


def test_a_forward_wrapped_on_the_instance_sees_every_call(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    q, k, v = _qkv()
    name = ad.explain(q, k, v).backend
    inst = ad.get_backend(name)
    seen: list[int] = []
    fwd = inst.forward

    def wrapped(*a: Any, **kw: Any) -> Any:
        seen.append(1)
        return fwd(*a, **kw)

    monkeypatch.setattr(inst, "forward", wrapped)
    ad.clear_cache()
    for _ in range(3):
        ad.attention(q, k, v)
    assert len(seen) == 3


def test_prefix_kv_gathers_only_up_to_the_longest_row() -> None:
    from attention_dispatch._core.packing import prefix_kv

    g = torch.Generator().manual_seed(3)
    k = torch.randn(3, 12, 2, 4, generator=g, requires_grad=True)
    v = torch.randn(3, 12, 2, 4, generator=g)
    kpm = torch.rand(3, 12, generator=g) < 0.5
    kpm[:, 5] = True
    kpm[2] = False  # a row with no key
    k2, v2, lengths = prefix_kv(k, v, kpm)
    assert lengths.tolist() == kpm.sum(-1).tolist()
    assert k2.shape == (3, int(lengths.max()), 2, 4)
    for b in range(3):
        n = int(lengths[b])
        assert torch.equal(k2[b, :n], k[b][kpm[b]]) and torch.equal(v2[b, :n], v[b][kpm[b]])
    (gk,) = torch.autograd.grad(k2.sum(), k)
    assert torch.equal(gk, kpm[:, :, None, None].expand_as(k).to(gk.dtype))
    right = torch.arange(12)[None, :] < torch.tensor([[12], [7], [3]])
    k3, _, _ = prefix_kv(k, v, right)
    assert k3.shape == k.shape and k3.data_ptr() == k.data_ptr()  # right padding: no copy


def test_prefix_kv_zero_tail_leaves_nothing_but_zeros_past_each_row() -> None:
    """zero_tail (FA4 loads a row's last key tile whole): past each row's
    length only zeros, whatever the padded slots held (NaN); the real keys and
    their gradients unchanged, zero gradient for padded slots; no copy when no
    key is padding, only the gathered copy when the real keys are scattered."""
    from attention_dispatch._core.packing import prefix_kv

    g = torch.Generator().manual_seed(4)
    k = torch.randn(3, 12, 2, 4, generator=g)
    v = torch.randn(3, 12, 2, 4, generator=g)
    right = torch.arange(12)[None, :] < torch.tensor([[12], [7], [3]])
    scattered = torch.rand(3, 12, generator=g) < 0.5
    scattered[:, 5] = True
    def stored_transposed(t: Tensor) -> Tensor:  # the same values, heads-major storage
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    for kpm, view in ((right, False), (scattered, False), (right, True), (scattered, True)):
        kn, vn = (t.masked_fill(~kpm[:, :, None, None], float("nan")) for t in (k, v))
        if view:  # K transposed in storage, V one head expanded (stride 0)
            kn, vn = stored_transposed(kn), vn[:, :, :1].expand(-1, -1, 2, -1)
        kn, vn = kn.requires_grad_(), vn.detach().requires_grad_()
        vv = vn.detach()
        k2, v2, lengths = prefix_kv(kn, vn, kpm, zero_tail=True)
        for b in range(3):
            n = int(lengths[b])
            assert torch.equal(k2[b, :n], k[b][kpm[b]]) and torch.equal(v2[b, :n], vv[b][kpm[b]])
            assert not k2[b, n:].any() and not v2[b, n:].any()  # zeros, no NaN
        gk, gv = torch.autograd.grad((k2 + v2).sum(), (kn, vn))
        want = kpm[:, :, None, None].expand_as(k).to(gk.dtype)
        assert torch.equal(gk, want) and torch.equal(gv, want)
    full = torch.ones(3, 12, dtype=torch.bool)
    k4, _, _ = prefix_kv(k, v, full, zero_tail=True)
    assert k4.data_ptr() == k.data_ptr()  # nothing padded: no copy


def _recorded(monkeypatch: pytest.MonkeyPatch, op_name: str) -> list:
    """torch.<op_name> replaced by a recorder: each call's arguments, bound to
    the operator's schema (positional and keyword spellings compare equal)."""
    calls: list = []
    names = {"_scaled_dot_product_flash_attention": (
                 "query", "key", "value", "dropout_p", "is_causal", "return_debug_mask"),
             "_scaled_dot_product_cudnn_attention": (
                 "query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p",
                 "is_causal", "return_debug_mask")}[op_name]
    defaults = dict(dropout_p=0.0, is_causal=False, return_debug_mask=False, scale=None)

    def op(*args: Any, **kw: Any) -> tuple:
        bound = dict(defaults, **dict(zip(names, args)), **kw)
        calls.append({n: (id(a) if isinstance(a, Tensor) else a) for n, a in bound.items()})
        return (args[0], None)

    monkeypatch.setattr(torch, op_name, op)
    return calls


@pytest.mark.parametrize("name, op_name", [
    ("sdpa-flash", "_scaled_dot_product_flash_attention"),
    ("sdpa-cudnn", "_scaled_dot_product_cudnn_attention")])
@pytest.mark.parametrize("case", [dict(), dict(causal=True), dict(scale=0.3),
                                  dict(requires_grad=True), dict(heads_kv=1),
                                  dict(causal=True, seq_q=4)], ids=str)
def test_cuda_plain_calls_pass_what_forward_passes(monkeypatch: pytest.MonkeyPatch, name: str,
                                                   op_name: str, case: dict) -> None:
    """The CUDA plain calls of torch's flash and cuDNN adapters hand the operator
    exactly the arguments their forward does (the operators recorded on the CPU:
    a CUDA spec, CPU tensors); where forward needs more (a bias, folded GQA) the
    plain call is None."""
    import dataclasses

    from attention_dispatch._core.spec import CallSpec

    from attention_dispatch.adapters import _torch_common

    monkeypatch.setattr(_torch_common, "_torch_version", lambda: (2, 11))
    scale = case.pop("scale", 0.25)
    spec = dataclasses.replace(
        CallSpec(device_type="cuda", device_index=0, dtype=torch.float16, batch=2, heads_q=2,
                 heads_kv=2, seq_q=8, seq_k=8, head_dim=16, head_dim_v=16), **case)
    q, k, v = _qkv(hq=spec.heads_q, hkv=spec.heads_kv, sq=spec.seq_q)
    backend = ad.get_backend(name)
    calls = _recorded(monkeypatch, op_name)
    plain = backend.plain_call(spec, scale, 0.0, q, k, v)
    if spec.causal and spec.seq_q != spec.seq_k and name == "sdpa-cudnn":
        assert plain is None  # causal goes into a bias there
        return
    assert plain is not None
    plain(q, k, v)
    backend.forward(q, k, v, spec=spec, mask=None, key_padding_mask=None, dropout_p=0.0,
                    scale=scale)
    assert len(calls) == 2
    if calls[1]["scale"] == 1.0 / math.sqrt(16):  # the kernel's default, left out
        calls[1]["scale"] = None
    assert calls[0] == calls[1]
