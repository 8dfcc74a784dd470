"""explain(): which backend would run, and every backend's verdict with reasons."""

from __future__ import annotations

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch._core import dispatch as _dispatch


def qkv(dtype=torch.float32, d=16, hkv=4, sq=5, sk=7):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, sq, d, generator=g).to(dtype),
            torch.randn(2, hkv, sk, d, generator=g).to(dtype),
            torch.randn(2, hkv, sk, d, generator=g).to(dtype))


def test_returns_a_decision():
    d = ad.explain(*qkv())
    assert isinstance(d, ad.Decision)
    assert d.backend == "sdpa-flash"
    assert isinstance(d.spec, ad.CallSpec)
    assert d.selection == ("auto",) and d.source == "default"
    assert all(isinstance(v, ad.BackendVerdict) for v in d.verdicts)


def test_a_verdict_for_every_registered_backend():
    d = ad.explain(*qkv())
    names = [v.name for v in d.verdicts]
    assert sorted(names) == sorted(ad.list_backends())
    assert len(names) == len(set(names))
    statuses = {v.name: v.status for v in d.verdicts}
    assert statuses["sdpa-flash"] == "chosen"
    assert statuses["math"] == "accepted"
    assert statuses["sdpa-mem-efficient"] == "refused"
    assert statuses["sdpa-cudnn"] == "refused"
    assert [v.name for v in d.verdicts if v.status == "chosen"] == ["sdpa-flash"]
    for v in d.verdicts:
        assert (v.status == "refused") == bool(v.reasons) or v.status == "not tried"
        assert v.status in ("chosen", "accepted", "refused", "not tried")


def test_reasons_state_actual_and_allowed_values():
    d = ad.explain(*qkv())
    assert d.reasons("sdpa-mem-efficient") == ("device cpu; allowed: cuda",)
    assert d.reasons("sdpa-cudnn") == ("device cpu; allowed: cuda",)
    assert d.reasons("sdpa-flash") == () and d.reasons("math") == ()
    with pytest.raises(KeyError):
        d.reasons("no-such-backend")
    q, k, _ = qkv()
    v = torch.randn(2, 4, 7, 24)
    r = ad.explain(q, k, v).reasons("sdpa-flash")
    assert r == ("head_dim_v=24 != head_dim=16; allowed: equal head dims for q/k and v",)
    r = ad.explain(*qkv(), dropout_p=0.5).reasons("sdpa-flash")
    assert any("dropout_p > 0" in x for x in r)


def test_reasons_from_capabilities_of_a_custom_backend(register_temp):
    class Narrow(ad.Backend):
        capabilities = ad.Capabilities(
            device_types=frozenset({"cpu"}), dtypes=frozenset({torch.float16}),
            max_head_dim=8, gqa=False, lse=False, causal=False,
            mask_kinds=frozenset({"bool"}), key_padding=False, backward=False)

        def forward(self, *a, **kw):  # pragma: no cover
            raise AssertionError

    register_temp("narrow", Narrow)
    q, k, v = (t.requires_grad_() for t in qkv(hkv=2))
    d = ad.explain(q, k, v, mask=torch.zeros(5, 7), causal=True, return_lse=True,
                   key_padding_mask=torch.ones(2, 7, dtype=torch.bool))
    r = d.reasons("narrow")
    assert "dtype float32; allowed: float16" in r
    assert "head_dim=16; allowed: <= 8" in r
    assert "mask kind float; allowed: bool" in r
    assert "GQA (Hq=4, Hkv=2); allowed: Hq == Hkv" in r
    assert any("key_padding_mask" in x for x in r)
    assert any("causal=True" in x for x in r)
    assert any("return_lse=True" in x for x in r)
    assert any("gradients needed" in x for x in r)


def test_non_selected_backends_are_marked_not_tried():
    d = ad.explain(*qkv(), backend="math")
    by = {v.name: v for v in d.verdicts}
    assert d.backend == "math" and by["math"].status == "chosen" and by["math"].rank == 0
    assert by["sdpa-flash"].status == "not tried" and by["sdpa-flash"].rank is None
    assert "not in the selection math" in by["sdpa-flash"].reasons
    assert by["sdpa-mem-efficient"].status == "refused"  # refused even if not selected


def test_ranks_follow_the_selection_order():
    d = ad.explain(*qkv(), backend=["math", "auto"])
    by = {v.name: v for v in d.verdicts}
    assert by["math"].rank == 0 and by["math"].status == "chosen"
    assert by["sdpa-flash"].rank is not None and by["sdpa-flash"].rank > 0
    assert by["sdpa-flash"].status == "accepted"
    assert d.selection == ("math", "auto") and d.source == "argument"


def test_nothing_accepts():
    d = ad.explain(*qkv(), backend="sdpa-cudnn")
    assert d.backend is None
    assert "chosen: none" in str(d)


def test_str_is_a_table_of_every_backend():
    d = ad.explain(*qkv(), causal=True, dropout_p=0.1)
    text = str(d)
    lines = text.splitlines()
    assert lines[0].startswith("call: cpu float32 B=2 Hq=4 Hkv=4 Sq=5 Sk=7 D=16")
    assert "causal=True" in lines[0] and "dropout=True" in lines[0]
    assert "selection: auto (from default)" in text
    assert "chosen: math" in text
    header = [i for i, ln in enumerate(lines)
              if "backend" in ln and "status" in ln and "reasons" in ln]
    assert len(header) == 1
    table = lines[header[0] + 1:]
    assert len(table) == len(ad.list_backends())
    for name in ad.list_backends():
        rows = [ln for ln in table if ln.split()[1:2] == [name]]
        assert len(rows) == 1, (name, text)
    flash = [ln for ln in table if ln.split()[1:2] == ["sdpa-flash"]][0]
    assert "refused" in flash and "dropout" in flash
    mathrow = [ln for ln in table if ln.split()[1:2] == ["math"]][0]
    assert "chosen" in mathrow
    mem = [ln for ln in table if ln.split()[1:2] == ["sdpa-mem-efficient"]][0]
    assert "device cpu; allowed: cuda" in mem


def test_explain_does_not_populate_the_decision_cache():
    q, k, v = qkv()
    assert len(_dispatch._plans) == 0
    ad.explain(q, k, v)
    ad.explain(q, k, v, causal=True, backend="math")
    assert len(_dispatch._plans) == 0
    ad.attention(q, k, v)
    assert len(_dispatch._plans) == 1
    ad.explain(q, k, v, dropout_p=0.3)
    assert len(_dispatch._plans) == 1


def test_explain_runs_no_kernel(spy_backend):
    q, k, v = qkv()
    d = ad.explain(q, k, v, backend="spy")
    assert d.backend == "spy" and spy_backend.calls == []


def test_explain_agrees_with_attention(spy_backend):
    q, k, v = qkv()
    for sel in ("spy", "math,spy", "spy,math"):
        before = len(spy_backend.calls)
        ad.attention(q, k, v, backend=sel)
        ran_spy = len(spy_backend.calls) > before
        assert (ad.explain(q, k, v, backend=sel).backend == "spy") == ran_spy


def test_explain_sources(monkeypatch):
    q, k, v = qkv()
    with ad.use_backend("math"):
        assert ad.explain(q, k, v).source == "use_backend"
    monkeypatch.setenv("ATTENTION_DISPATCH_BACKEND", "math")
    ad.clear_cache()
    assert ad.explain(q, k, v).source == "ATTENTION_DISPATCH_BACKEND"
    assert ad.explain(q, k, v, backend="sdpa-flash").source == "argument"


def test_explain_spec_without_tensors():
    q, k, v = qkv()
    spec = ad.explain(q, k, v, causal=True).spec
    d = ad.explain_spec(spec)
    assert d.backend == "sdpa-flash" and d.spec == spec and d.source == "argument"
    cuda = ad.CallSpec(device_type="cuda", device_index=0, dtype=torch.bfloat16, batch=1,
                       heads_q=8, heads_kv=8, seq_q=128, seq_k=128, head_dim=64, head_dim_v=64)
    d = ad.explain_spec(cuda, ("math",))
    if not torch.cuda.is_available():
        assert any("CUDA is not available" in r for r in d.reasons("math"))
        assert d.backend is None


def test_spec_fields():
    q, k, v = qkv(hkv=2)
    kpm = torch.ones(2, 7, dtype=torch.bool)
    spec = ad.explain(q, k, v, mask=torch.zeros(5, 7), key_padding_mask=kpm, causal=True,
                      return_lse=True).spec
    assert (spec.batch, spec.heads_q, spec.heads_kv, spec.seq_q, spec.seq_k) == (2, 4, 2, 5, 7)
    assert spec.mask_kind == "float" and spec.key_padding and spec.causal and spec.return_lse
    assert spec.gqa and spec.may_have_empty_rows and spec.causal_offset == 2
    assert not spec.requires_grad and not spec.dropout
    bshd = ad.explain(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                      layout="bshd").spec
    assert (bshd.heads_q, bshd.seq_q, bshd.layout) == (4, 5, "bshd")
