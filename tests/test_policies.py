"""Policies: deterministic=True and max_extra_bytes as selection constraints,
their precedence (argument > use_policy > environment > torch's deterministic
mode), the decision cache, explain(), the extra-memory estimates and the
large-buffer warning."""

from __future__ import annotations

import dataclasses
import types
import warnings

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch._core import policy as _policy
from attention_dispatch._core.registry import REGISTRY
from attention_dispatch.adapters import _flash_api as api
from attention_dispatch.testing import reference_attention

ENV_DET = "ATTENTION_DISPATCH_DETERMINISTIC"
ENV_MAX = "ATTENTION_DISPATCH_MAX_EXTRA_BYTES"


@pytest.fixture(autouse=True)
def _no_policy_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ENV_DET, raising=False)
    monkeypatch.delenv(ENV_MAX, raising=False)
    ad.clear_cache()
    yield
    ad.clear_cache()


def qkv(b=2, hq=4, hkv=4, sq=5, sk=7, d=8, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, generator=g, dtype=dtype)
               for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


class NonDeterministic(ad.Backend):
    """Declares nothing about determinism (the default: not deterministic)."""

    capabilities = ad.Capabilities(device_types=frozenset({"cpu"}),
                                   dtypes=frozenset({torch.float32}), dropout=False,
                                   empty_rows_exact=True)
    ranking = {"cpu": "first"}
    calls = 0

    def forward(self, q, k, v, *, spec, mask, key_padding_mask, dropout_p, scale):
        type(self).calls += 1
        out, lse = reference_attention(q, k, v, mask=mask, key_padding_mask=key_padding_mask,
                                       causal=spec.causal, scale=scale)
        return out.to(q.dtype), None


def cuda_spec(**kw) -> ad.CallSpec:
    base = dict(device_type="cuda", device_index=0, dtype=torch.bfloat16, batch=2, heads_q=8,
                heads_kv=8, seq_q=256, seq_k=256, head_dim=64, head_dim_v=64)
    return ad.CallSpec(**{**base, **kw})


# ------------------------------------------------------------- determinism


def test_cpu_eligible_set_under_deterministic(register_temp):
    register_temp("nondet", NonDeterministic)
    q, k, v = qkv(grad=True)
    d = ad.explain(q, k, v, causal=True, deterministic=True)
    ok = {x.name for x in d.verdicts if x.rank is not None and not x.reasons}
    assert ok == {"sdpa-flash", "chunked", "math"}, str(d)
    assert d.reasons("nondet") == ("deterministic=True; this kernel's forward is not "
                                   "deterministic (not declared deterministic)",)
    assert ad.explain(q, k, v, causal=True).backend == "nondet"  # no policy: first in rank


def test_cuda_capability_data():
    """Declared per backend and device: forward everywhere; backward not for the
    kernels whose backward uses atomics."""
    expect_bwd = {"math": True, "flex": True, "flash-attn": True, "sdpa-flash": False,
                  "sdpa-mem-efficient": False, "sdpa-cudnn": False, "xformers": False,
                  "sdpa": False}
    for name, bwd in expect_bwd.items():
        inst, _ = REGISTRY.load(name)
        assert inst.determinism(cuda_spec()) == (True, bwd), name
        train = cuda_spec(deterministic=True, requires_grad=True)
        why = _policy.reasons(inst, train)
        assert bool(why) != bwd, (name, why)
        if not bwd:
            assert why[0].startswith("deterministic=True; this kernel's backward is not "
                                     "deterministic ("), why
        assert _policy.reasons(inst, cuda_spec(deterministic=True)) == [], name
    flash, _ = REGISTRY.load("sdpa-flash")
    assert "atomics" in _policy.reasons(flash, cuda_spec(deterministic=True,
                                                         requires_grad=True))[0]
    cpu = dataclasses.replace(cuda_spec(deterministic=True, requires_grad=True),
                              device_type="cpu", device_index=None, dtype=torch.float32)
    assert _policy.reasons(flash, cpu) == []


def test_flash_attn_deterministic_per_api():
    def with_det(q, k, v, deterministic=False, **kw):
        return q

    def without(q, k, v, **kw):
        return q

    new = types.SimpleNamespace(flash_attn_func=with_det, flash_attn_varlen_func=with_det)
    old = types.SimpleNamespace(flash_attn_func=without, flash_attn_varlen_func=without)
    train = cuda_spec(deterministic=True, requires_grad=True)
    assert api.deterministic_reasons(api.FA4, new, train, (10, 0)) == []
    assert "sm100/sm110" in api.deterministic_reasons(api.FA4, new, train, (9, 0))[0]
    assert api.deterministic_reasons(api.FA2, new, train, (9, 0)) == []
    assert "deterministic=" in api.deterministic_reasons(api.FA2, old, train, (8, 0))[0]
    assert api.deterministic_reasons(api.FA4, new, cuda_spec(deterministic=True), (9, 0)) == []
    seen = {}

    def spy(q, k, v, **kw):
        seen.update(kw)
        return q

    mod = types.SimpleNamespace(flash_attn_func=spy)
    t = torch.zeros(1, 2, 1, 8)
    api.call_dense(api.FA2, mod, t, t, t, causal=False, dropout_p=0.0, scale=1.0,
                   need_lse=False, deterministic=True)
    assert seen["deterministic"] is True
    seen.clear()
    api.call_dense(api.FA4, mod, t, t, t, causal=False, dropout_p=0.0, scale=1.0,
                   need_lse=False)
    assert "deterministic" not in seen  # older releases lack the keyword


def test_deterministic_results_and_gradients_cpu():
    q, k, v = qkv(b=2, hq=4, hkv=2, sq=33, sk=40, d=16, grad=True)
    grads = []
    for _ in range(2):
        out = ad.attention(q, k, v, causal=True, deterministic=True)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    ref, _ = reference_attention(q.detach().double(), k.detach().double(),
                                 v.detach().double(), causal=True)
    assert (out.double() - ref).abs().max() < 1e-5
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# -------------------------------------------------------------- precedence


def test_precedence_env_context_argument(monkeypatch):
    q, k, v = qkv()
    spec = lambda **kw: ad.explain(q, k, v, **kw).spec  # noqa: E731
    assert (spec().deterministic, spec().max_extra_bytes) == (False, None)
    monkeypatch.setenv(ENV_DET, "1")
    monkeypatch.setenv(ENV_MAX, "2GiB")
    assert (spec().deterministic, spec().max_extra_bytes) == (False, None)  # read once
    ad.clear_cache()
    assert (spec().deterministic, spec().max_extra_bytes) == (True, 2 * 2**30)
    with ad.use_policy(deterministic=False):
        assert (spec().deterministic, spec().max_extra_bytes) == (False, 2 * 2**30)
        with ad.use_policy(max_extra_bytes=10):  # inherits deterministic=False
            assert (spec().deterministic, spec().max_extra_bytes) == (False, 10)
            assert spec(deterministic=True, max_extra_bytes=5).max_extra_bytes == 5
            assert spec(deterministic=True).deterministic is True
        assert spec().max_extra_bytes == 2 * 2**30
    with pytest.raises(RuntimeError):
        with ad.use_policy(max_extra_bytes=1):
            raise RuntimeError("boom")
    assert spec().max_extra_bytes == 2 * 2**30  # restored on error


def test_torch_deterministic_mode_is_the_default():
    q, k, v = qkv()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert ad.explain(q, k, v).spec.deterministic is True
        assert ad.explain(q, k, v, deterministic=False).spec.deterministic is False
        with ad.use_policy(deterministic=False):
            assert ad.explain(q, k, v).spec.deterministic is False
    finally:
        torch.use_deterministic_algorithms(was)
    assert ad.explain(q, k, v).spec.deterministic is False


def test_bad_values_are_typed_errors(monkeypatch):
    q, k, v = qkv()
    with pytest.raises(ad.AttentionTypeError, match="deterministic"):
        ad.attention(q, k, v, deterministic="yes")
    with pytest.raises(ad.AttentionInputError, match="max_extra_bytes"):
        ad.attention(q, k, v, max_extra_bytes=-1)
    with pytest.raises(ad.AttentionTypeError, match="max_extra_bytes"):
        ad.use_policy(max_extra_bytes=1.5).__enter__()
    monkeypatch.setenv(ENV_DET, "maybe")
    ad.clear_cache()
    with pytest.raises(ad.AttentionInputError, match=ENV_DET):
        ad.attention(q, k, v)
    monkeypatch.setenv(ENV_DET, "off")
    monkeypatch.setenv(ENV_MAX, "lots")
    ad.clear_cache()
    with pytest.raises(ad.AttentionInputError, match=ENV_MAX):
        ad.attention(q, k, v)


def test_policy_is_part_of_the_decision_key(register_temp):
    register_temp("nondet", NonDeterministic)
    NonDeterministic.calls = 0
    q, k, v = qkv()
    ad.attention(q, k, v)
    assert NonDeterministic.calls == 1
    out = ad.attention(q, k, v, deterministic=True)
    assert NonDeterministic.calls == 1  # decided again: another backend ran
    ref, _ = reference_attention(q.double(), k.double(), v.double())
    assert (out.double() - ref).abs().max() < 1e-5
    with ad.use_policy(deterministic=True):
        ad.attention(q, k, v)
    assert NonDeterministic.calls == 1
    ad.attention(q, k, v)
    assert NonDeterministic.calls == 2


# ------------------------------------------------------------------ memory


@pytest.mark.parametrize("dtype,per", [(torch.float32, 8), (torch.float64, 16),
                                       (torch.bfloat16, 10)])
def test_math_estimate_formula(dtype, per):
    """math: B*Hq*Sq*Sk * (2a + e[a != e]) bytes (a = 4 for half inputs, else e)."""
    q, k, v = qkv(b=3, hq=2, hkv=2, sq=5, sk=9, dtype=dtype)
    d = ad.explain(q, k, v, backend="math")
    assert d.extra_bytes == 3 * 2 * 5 * 9 * per
    assert "score matrix" in str(d) and "extra memory: ~" in str(d)


def test_estimates_of_masks_gqa_and_copies():
    q, k, v = qkv(b=2, hq=4, hkv=2, sq=5, sk=7, d=8)
    math = ad.explain(q, k, v, causal=True, backend="math").extra_bytes
    scores, bias, gqa = 2 * 4 * 5 * 7 * 8, 5 * 7 * 4, 2 * 4 * 7 * 16 * 4
    assert math == scores + bias + gqa
    flash = ad.explain(q, k, v, causal=True)  # sdpa-flash: bias for Sq != Sk causal
    assert flash.backend == "sdpa-flash" and flash.extra_bytes == bias
    q2, k2, v2 = qkv(sq=7, sk=7)
    assert ad.explain(q2, k2, v2, causal=True).extra_bytes == 0  # the kernel's flag
    kt = k2.transpose(-1, -2).contiguous().transpose(-1, -2)  # head dim not contiguous
    d = ad.explain(q2, kt, v2, causal=True)
    assert d.backend == "sdpa-flash" and d.copies and d.extra_bytes == k2.numel() * 4


def test_max_extra_bytes_refusal_and_cache():
    q, k, v = qkv(sq=5, sk=7)
    ad.attention(q, k, v, causal=True)
    d = ad.explain(q, k, v, causal=True, max_extra_bytes=100)
    assert d.backend is None
    assert d.reasons("sdpa-flash")[0].startswith("max_extra_bytes=100 (100 B); this path "
                                                 "allocates ~140 B extra")
    with ad.use_policy(max_extra_bytes=100):
        with pytest.raises(ad.BackendUnavailable, match="max_extra_bytes=100"):
            ad.attention(q, k, v, causal=True)
    out = ad.attention(q, k, v, causal=True, max_extra_bytes=140)
    ref, _ = reference_attention(q.double(), k.double(), v.double(), causal=True)
    assert (out.double() - ref).abs().max() < 1e-5


def test_max_extra_bytes_counts_memory_plan_copies():
    q, k, v = qkv(sq=7, sk=7)
    kt = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    d = ad.explain(q, kt, v, max_extra_bytes=k.numel() * 4 - 1)
    assert "copies for the memory layout" in d.reasons("sdpa-flash")[0]
    assert ad.explain(q, k, v, max_extra_bytes=0).backend == "sdpa-flash"


def test_varlen_takes_the_policies():
    q, k, v = (torch.randn(12, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(ad.BackendUnavailable, match="max_extra_bytes"):
        ad.attention_varlen(q, k, v, cu, cu, 7, 7, max_extra_bytes=1)
    out = ad.attention_varlen(q, k, v, cu, cu, 7, 7, deterministic=True)
    ref, _ = reference_attention(q[5:].transpose(0, 1)[None].double(),
                                 k[5:].transpose(0, 1)[None].double(),
                                 v[5:].transpose(0, 1)[None].double())
    assert (out[5:].double() - ref[0].transpose(0, 1)).abs().max() < 1e-5


# ----------------------------------------------------------------- warning


def test_warning_once_for_a_large_math_path(monkeypatch):
    monkeypatch.setattr(_policy, "WARN_QUADRATIC_BYTES", 1000)
    ad.clear_events()
    q, k, v = qkv(sq=16, sk=16)
    with pytest.warns(ad.MemoryWarning, match="math materialises"):
        ad.attention(q, k, v, dropout_p=0.1)  # only math drops out on the CPU
    with warnings.catch_warnings():
        warnings.simplefilter("error", ad.MemoryWarning)
        ad.attention(q, k, v, dropout_p=0.1)
        ad.attention(q.clone(), k, v, dropout_p=0.1)  # same signature
        ad.attention(q, k, v)  # sdpa-flash: fused, nothing O(Sq*Sk)
        ad.attention(q, k, v, causal=True)  # Sq == Sk: the kernel's causal flag
        q2, k2, v2 = qkv(sq=16, sk=20)
        ad.attention(q2, k2, v2, dropout_p=0.1, max_extra_bytes=10**9)  # a stated budget
        ad.attention(q2, k2, v2, dropout_p=0.1, backend="math")  # forced: no warning
    assert len([e for e in ad.events() if e.kind == "memory"]) == 1
    assert issubclass(ad.MemoryWarning, UserWarning)


def test_paged_calls_take_the_policies():
    """attention_paged / explain_paged resolve the policies as attention() does."""
    q = torch.randn(2, 1, 4, 16)
    kc, vc = torch.randn(4, 16, 2, 16), torch.randn(4, 16, 2, 16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lengths = torch.tensor([20, 7], dtype=torch.int32)
    kw = dict(block_table=table, cache_seqlens=lengths)
    assert ad.explain_paged(q, kc, vc, **kw).spec.max_extra_bytes is None
    with ad.use_policy(deterministic=True, max_extra_bytes=1 << 40):
        spec = ad.explain_paged(q, kc, vc, **kw).spec
    assert spec.deterministic and spec.max_extra_bytes == 1 << 40
    spec = ad.explain_paged(q, kc, vc, max_extra_bytes=123, **kw).spec
    assert spec.max_extra_bytes == 123


def test_a_trace_under_another_selection_or_policy_is_decided_again():
    """torch.compile: the decision made at trace time follows use_backend and the
    policies in force when the function is traced (after torch._dynamo.reset())."""
    from attention_dispatch._core import compile as _compile

    q = torch.randn(1, 2, 8, 16)

    def f(q):
        return ad.attention(q, q, q)

    torch._dynamo.reset()
    torch.compile(f, backend="eager", fullgraph=True)(q)
    first = _compile._plans[-1].backend.name
    torch._dynamo.reset()
    with ad.use_backend("math"):
        torch.compile(f, backend="eager", fullgraph=True)(q)
    assert first != "math" and _compile._plans[-1].backend.name == "math"
    torch._dynamo.reset()
    with ad.use_policy(max_extra_bytes=1 << 30):
        torch.compile(f, backend="eager", fullgraph=True)(q)
    assert _compile._plans[-1].spec.max_extra_bytes == 1 << 30
    torch._dynamo.reset()
