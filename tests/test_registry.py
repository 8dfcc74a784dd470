"""register_backend / unregister_backend / list_backends / get_backend, and
broken backends that must never break the others."""

from __future__ import annotations

import warnings

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch._core.registry import BUILTINS
from attention_dispatch.testing import reference_attention


class MyKernel(ad.Backend):
    """Plain softmax(q k^T * scale) v: no masks, no causal, no dropout, fp32/fp64."""

    capabilities = ad.Capabilities(
        device_types=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32, torch.float64}),
        mask_kinds=frozenset(),
        key_padding=False,
        causal=False,
        dropout=False,
        max_head_dim=64,
    )

    def __init__(self):
        self.calls = 0

    def forward(self, q, k, v, *, spec, mask, key_padding_mask, dropout_p, scale):
        self.calls += 1
        group = spec.heads_q // spec.heads_kv
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        s = (q @ k.transpose(-1, -2)) * scale
        out = torch.softmax(s, -1) @ v
        return out, (torch.logsumexp(s, -1).float() if spec.return_lse else None)


def qkv(hq=4, hkv=4, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, hq, 5, d, generator=g, dtype=dtype),
            torch.randn(2, hkv, 7, d, generator=g, dtype=dtype),
            torch.randn(2, hkv, 7, d, generator=g, dtype=dtype))


def plugin_warnings(record):
    return [w for w in record if issubclass(w.category, ad.PluginWarning)]


# ---------------------------------------------------------------- register


def test_register_backend_decorator_roundtrip():
    try:
        @ad.register_backend("my-kernel")
        class Registered(MyKernel):
            pass

        assert Registered.__name__ == "Registered"  # the decorator returns the class
        assert "my-kernel" in ad.list_backends()
        inst = ad.get_backend("my-kernel")
        assert isinstance(inst, Registered)
        assert inst.name == "my-kernel"
        assert ad.get_backend("my-kernel") is inst  # one instance
        q, k, v = qkv(hq=4, hkv=2)
        out, lse = ad.attention(q, k, v, backend="my-kernel", return_lse=True)
        assert inst.calls == 1
        ref, ref_lse = reference_attention(q, k, v)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
        d = ad.explain(q, k, v, backend="my-kernel")
        assert d.backend == "my-kernel"
        assert any(v_.name == "my-kernel" for v_ in d.verdicts)
    finally:
        if "my-kernel" in ad.list_backends():
            ad.unregister_backend("my-kernel")
    assert "my-kernel" not in ad.list_backends()
    with pytest.raises(ad.UnknownBackendError):
        ad.attention(*qkv(), backend="my-kernel")


def test_capabilities_turn_into_reasons(register_temp):
    register_temp("my-kernel", MyKernel)
    q, k, v = qkv()
    mask = torch.ones(5, 7, dtype=torch.bool)
    d = ad.explain(q, k, v, mask=mask, causal=True, dropout_p=0.1, backend="my-kernel")
    reasons = d.reasons("my-kernel")
    assert d.backend is None
    assert "mask kind bool; allowed: none" in reasons
    assert any("causal=True" in r for r in reasons)
    assert any("dropout_p > 0" in r for r in reasons)
    with pytest.raises(ad.BackendUnavailable) as ei:
        ad.attention(q, k, v, mask=mask, backend="my-kernel")
    assert ei.value.reasons["my-kernel"] == ["mask kind bool; allowed: none"]
    q16, k16, v16 = qkv(dtype=torch.float16)
    r16 = ad.explain(q16, k16, v16, backend="my-kernel").reasons("my-kernel")
    assert r16 == ("dtype float16; allowed: float32/float64",)
    qd, kd, vd = qkv(d=72)
    assert "head_dim=72; allowed: <= 64" in ad.explain(qd, kd, vd, backend="my-kernel").reasons(
        "my-kernel")
    # the fallback list takes the call to the next backend
    assert ad.explain(q, k, v, mask=mask, backend="my-kernel,math").backend == "math"


def test_plugin_ranked_before_math_in_auto(register_temp):
    class DropKernel(MyKernel):
        capabilities = ad.Capabilities(device_types=frozenset({"cpu"}),
                                       dtypes=frozenset({torch.float32}))

    register_temp("drop-kernel", DropKernel)
    q, k, v = qkv()
    d = ad.explain(q, k, v, dropout_p=0.1)
    ranks = {v_.name: v_.rank for v_ in d.verdicts}
    assert ranks["sdpa-flash"] < ranks["drop-kernel"] < ranks["math"]
    assert ad.explain(q, k, v).backend == "sdpa-flash"


def test_duplicate_name_raises_unless_replace(register_temp):
    register_temp("my-kernel", MyKernel)
    with pytest.raises(ad.BackendRegistrationError, match="already registered"):
        ad.register_backend("my-kernel")(MyKernel)
    with pytest.raises(ad.BackendRegistrationError, match="replace=True"):
        @ad.register_backend("math")
        class Other(MyKernel):
            pass
    assert type(ad.get_backend("math")).__name__ == "MathBackend"

    class Second(MyKernel):
        pass

    ad.register_backend("my-kernel", replace=True)(Second)
    assert isinstance(ad.get_backend("my-kernel"), Second)
    assert ad.list_backends().count("my-kernel") == 1


def test_replace_builtin_then_restore(register_temp, spy_class):
    register_temp("math", spy_class, replace=True)
    spy = ad.get_backend("math")
    q, k, v = qkv()
    ad.attention(q, k, v, backend="math")
    assert len(spy.calls) == 1


def test_unregister_backend(register_temp):
    register_temp("my-kernel", MyKernel)
    q, k, v = qkv()
    ad.attention(q, k, v, backend="my-kernel")  # cached decision
    ad.unregister_backend("my-kernel")
    assert "my-kernel" not in ad.list_backends()
    with pytest.raises(ad.UnknownBackendError):
        ad.attention(q, k, v, backend="my-kernel")
    with pytest.raises(ad.UnknownBackendError):
        ad.get_backend("my-kernel")
    with pytest.raises(ad.UnknownBackendError) as ei:
        ad.unregister_backend("my-kernel")
    assert "math" in ei.value.known


class NotABackend:
    capabilities = MyKernel.capabilities


class NoCapabilities(ad.Backend):
    def forward(self, *a, **kw):  # pragma: no cover
        raise AssertionError


@pytest.mark.parametrize("target", [NotABackend, MyKernel(), lambda: None, 42, NoCapabilities],
                         ids=["plain-class", "instance", "function", "int", "no-capabilities"])
def test_registering_a_non_backend_raises(target):
    with pytest.raises(ad.BackendRegistrationError):
        ad.register_backend("bad-kernel")(target)
    assert "bad-kernel" not in ad.list_backends()


@pytest.mark.parametrize("name", ["", "auto", "a,b", None, 3])
def test_bad_names_raise(name):
    before = ad.list_backends()
    with pytest.raises(ad.BackendRegistrationError):
        ad.register_backend(name)(MyKernel)
    assert ad.list_backends() == before


def test_registration_error_is_a_value_error():
    assert issubclass(ad.BackendRegistrationError, ValueError)
    assert issubclass(ad.BackendRegistrationError, ad.AttentionDispatchError)


# ---------------------------------------------------------- broken backends


class ProbeRaises(MyKernel):
    def probe(self, device):
        raise RuntimeError("driver exploded")


class SupportsRaises(MyKernel):
    def check(self, spec):
        raise KeyError("oops")


def test_probe_raising_is_a_refusal_not_fatal(register_temp):
    register_temp("probe-raises", ProbeRaises)
    q, k, v = qkv()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        d = ad.explain(q, k, v)
        ad.attention(q, k, v)
        ad.attention(q, k, v, dropout_p=0.1)  # passes the broken one in the ranking
    assert d.backend == "sdpa-flash"
    reasons = d.reasons("probe-raises")
    assert any("probe raised RuntimeError: driver exploded" in r for r in reasons)
    assert any(v_.name == "probe-raises" and v_.status == "refused" for v_ in d.verdicts)
    assert len(plugin_warnings(rec)) == 1
    with pytest.raises(ad.BackendUnavailable, match="driver exploded"):
        ad.attention(q, k, v, backend="probe-raises")
    ad.attention(q, k, v, backend="probe-raises,math")


def test_supports_raising_is_a_refusal(register_temp):
    register_temp("supports-raises", SupportsRaises)
    q, k, v = qkv()
    d = ad.explain(q, k, v)
    assert any("supports() raised KeyError" in r for r in d.reasons("supports-raises"))
    with pytest.raises(ad.BackendUnavailable, match="supports-raises"):
        ad.attention(q, k, v, backend="supports-raises")
    assert ad.attention(q, k, v, backend=["supports-raises", "auto"]).shape == q.shape


def test_unimportable_module_path(register_temp):
    register_temp("ghost", "attention_dispatch_no_such_module_xyz:Kernel")
    assert "ghost" in ad.list_backends()  # registering a path imports nothing
    q, k, v = qkv()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        d = ad.explain(q, k, v)
        d2 = ad.explain(q, k, v, dropout_p=0.1)
        out = ad.attention(q, k, v)
        out_drop = ad.attention(q, k, v, dropout_p=0.1)
        ad.clear_cache()
        ad.explain(q, k, v)
    msgs = [str(w.message) for w in plugin_warnings(rec)]
    assert len(msgs) == 1, msgs  # warned once
    assert "ghost" in msgs[0] and "ModuleNotFoundError" in msgs[0]
    reason = " ".join(d.reasons("ghost"))
    assert "failed to load" in reason and "attention_dispatch_no_such_module_xyz" in reason
    assert "ghost" in str(d)
    assert d.backend == "sdpa-flash" and d2.backend == "math"
    assert out.shape == q.shape and out_drop.shape == q.shape
    with pytest.raises(ad.BackendUnavailable, match="ghost"):
        ad.attention(q, k, v, backend="ghost")
    with pytest.raises(ad.BackendRegistrationError, match="failed to load"):
        ad.get_backend("ghost")


def test_missing_attribute_and_non_backend_paths(register_temp):
    register_temp("no-attr", "attention_dispatch.testing:NoSuchKernel")
    register_temp("not-a-backend", "attention_dispatch.testing:Case")
    q, k, v = qkv()
    with pytest.warns(ad.PluginWarning):
        d = ad.explain(q, k, v)
    assert any("AttributeError" in r for r in d.reasons("no-attr"))
    assert any("subclass of attention_dispatch.Backend" in r for r in d.reasons("not-a-backend"))
    assert ad.attention(q, k, v, backend="no-attr,not-a-backend,math").shape == q.shape


def test_module_path_that_imports_works(register_temp):
    register_temp("math-by-path", "attention_dispatch.adapters.math:MathBackend")
    q, k, v = qkv()
    out = ad.attention(q, k, v, backend="math-by-path", causal=True)
    torch.testing.assert_close(out, ad.attention(q, k, v, backend="math", causal=True))
    assert ad.get_backend("math-by-path").name == "math-by-path"


def test_get_backend_unknown_suggests():
    with pytest.raises(ad.UnknownBackendError, match="did you mean 'math'"):
        ad.get_backend("mathh")


def test_list_backends_builtins_first():
    names = ad.list_backends()
    assert {"math", "sdpa-flash", "sdpa-mem-efficient", "sdpa-cudnn"} <= set(BUILTINS)
    assert names[:len(BUILTINS)] == list(BUILTINS)
    assert len(set(names)) == len(names)


def test_describe_and_capabilities_summary():
    for name in ("math", "sdpa-flash"):
        b = ad.get_backend(name)
        assert isinstance(b.describe(), str) and b.describe()
        assert "float32" in b.capabilities.summary()
