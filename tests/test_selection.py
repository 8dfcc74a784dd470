"""Backend selection: call argument > use_backend > ATTENTION_DISPATCH_BACKEND > auto,
lists, fallbacks, context locality and the decision cache."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch._core import dispatch as _dispatch
from attention_dispatch._core.registry import BUILTINS, REGISTRY


def small(dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, 4, 8, generator=g, dtype=dtype).requires_grad_(requires_grad)
                 for _ in range(3))


def set_env(monkeypatch, value):
    monkeypatch.setenv("ATTENTION_DISPATCH_BACKEND", value)
    ad.clear_cache()  # the variable is read once; clear_cache re-reads it


# -------------------------------------------------------------- precedence


def test_default_is_auto():
    d = ad.explain(*small())
    assert d.selection == ("auto",) and d.source == "default"


def test_env_var_is_used(monkeypatch):
    set_env(monkeypatch, "math")
    d = ad.explain(*small())
    assert d.backend == "math" and d.source == "ATTENTION_DISPATCH_BACKEND"
    assert d.selection == ("math",)


def test_env_var_read_once_until_clear_cache(monkeypatch, spy_backend):
    q, k, v = small()
    set_env(monkeypatch, "spy")
    ad.attention(q, k, v)
    assert len(spy_backend.calls) == 1
    monkeypatch.setenv("ATTENTION_DISPATCH_BACKEND", "math")
    ad.attention(q, k, v)  # not re-read yet
    assert len(spy_backend.calls) == 2
    ad.clear_cache()
    ad.attention(q, k, v)
    assert len(spy_backend.calls) == 2
    assert ad.explain(q, k, v).backend == "math"


def test_use_backend_beats_env(monkeypatch):
    set_env(monkeypatch, "math")
    with ad.use_backend("sdpa-flash") as sel:
        assert sel == ("sdpa-flash",)
        d = ad.explain(*small())
        assert d.backend == "sdpa-flash" and d.source == "use_backend"
    assert ad.explain(*small()).backend == "math"


def test_argument_beats_use_backend_and_env(monkeypatch, spy_backend):
    set_env(monkeypatch, "sdpa-flash")
    q, k, v = small()
    with ad.use_backend("math"):
        d = ad.explain(q, k, v, backend="spy")
        assert d.backend == "spy" and d.source == "argument"
        ad.attention(q, k, v, backend="spy")
        assert len(spy_backend.calls) == 1
        ad.attention(q, k, v)  # use_backend -> math
        assert len(spy_backend.calls) == 1


def test_backend_auto_defers_to_use_backend_and_env(monkeypatch, spy_backend):
    q, k, v = small()
    with ad.use_backend("spy"):
        ad.attention(q, k, v, backend="auto")
        assert ad.explain(q, k, v, backend="auto").backend == "spy"
    assert len(spy_backend.calls) == 1
    set_env(monkeypatch, "spy")
    ad.attention(q, k, v, backend="auto")
    assert len(spy_backend.calls) == 2


def test_use_backend_auto_overrides_env(monkeypatch):
    set_env(monkeypatch, "math")
    with ad.use_backend("auto"):
        d = ad.explain(*small())
    assert d.selection == ("auto",) and d.source == "use_backend" and d.backend == "sdpa-flash"


def test_nested_use_backend_restores_outer():
    with ad.use_backend("math"):
        with ad.use_backend("sdpa-flash"):
            assert ad.explain(*small()).backend == "sdpa-flash"
        assert ad.explain(*small()).backend == "math"
    assert ad.explain(*small()).source == "default"


def test_use_backend_restores_on_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with ad.use_backend("math"):
            assert ad.explain(*small()).backend == "math"
            raise RuntimeError("boom")
    d = ad.explain(*small())
    assert d.source == "default" and d.backend == "sdpa-flash"


def test_use_backend_validates_names_eagerly():
    with pytest.raises(ad.UnknownBackendError) as ei:
        with ad.use_backend("no-such-kernel"):
            pass  # pragma: no cover
    assert ei.value.argument == "backend"
    assert ad.explain(*small()).source == "default"


# ----------------------------------------------------------------- lists


@pytest.mark.parametrize("sel", [["sdpa-flash", "math"], ("sdpa-flash", "math"),
                                 "sdpa-flash,math", " sdpa-flash , math "])
def test_list_selection_first_accepting(sel):
    q, k, v = small()
    assert ad.explain(q, k, v, backend=sel).backend == "sdpa-flash"
    # with dropout sdpa-flash (CPU) refuses: the next one takes it
    d = ad.explain(q, k, v, backend=sel, dropout_p=0.1)
    assert d.backend == "math"
    assert d.selection == ("sdpa-flash", "math")
    assert ad.attention(q, k, v, backend=sel, dropout_p=0.1).shape == q.shape


def test_list_ending_in_auto_falls_back():
    q, k, v = small()
    d = ad.explain(q, k, v, backend=["sdpa-mem-efficient", "auto"])
    assert d.backend == "sdpa-flash"
    assert "device cpu; allowed: cuda" in d.reasons("sdpa-mem-efficient")
    out = ad.attention(q, k, v, backend="sdpa-mem-efficient,auto")
    torch.testing.assert_close(out, ad.attention(q, k, v, backend="math"))


def test_forced_backend_refusing_raises_with_reasons():
    q, k, v = small()
    with pytest.raises(ad.BackendUnavailable) as ei:
        ad.attention(q, k, v, backend="sdpa-mem-efficient")
    err = ei.value
    assert "sdpa-mem-efficient" in str(err)
    assert err.reasons["sdpa-mem-efficient"] == ["device cpu; allowed: cuda"]
    assert err.selection == ("sdpa-mem-efficient",)
    assert "device cpu; allowed: cuda" in str(err)


def test_forced_sdpa_flash_with_dropout_on_cpu_raises():
    q, k, v = small()
    with pytest.raises(ad.BackendUnavailable) as ei:
        ad.attention(q, k, v, backend="sdpa-flash", dropout_p=0.2)
    assert "sdpa-flash" in str(ei.value)
    assert any("dropout" in r for r in ei.value.reasons["sdpa-flash"])
    assert isinstance(ei.value, RuntimeError)


def test_forced_list_all_refusing_names_every_backend():
    q, k, v = small()
    with pytest.raises(ad.BackendUnavailable) as ei:
        ad.attention(q, k, v, backend=["sdpa-cudnn", "sdpa-flash"], dropout_p=0.2)
    assert set(ei.value.reasons) == {"sdpa-cudnn", "sdpa-flash"}
    assert "sdpa-cudnn" in str(ei.value) and "sdpa-flash" in str(ei.value)


# ----------------------------------------------------------- environment


def test_env_list_with_auto(monkeypatch):
    set_env(monkeypatch, "math,auto")
    q, k, v = small()
    d = ad.explain(q, k, v)
    assert d.selection == ("math", "auto") and d.backend == "math"
    set_env(monkeypatch, "sdpa-mem-efficient,auto")
    assert ad.explain(q, k, v).backend == "sdpa-flash"
    ad.attention(q, k, v)


def test_env_unknown_name_raises_listing_known(monkeypatch):
    set_env(monkeypatch, "sdpa-flsh")
    q, k, v = small()
    with pytest.raises(ad.UnknownBackendError) as ei:
        ad.attention(q, k, v)
    err = ei.value
    assert err.argument == "ATTENTION_DISPATCH_BACKEND"
    assert err.name == "sdpa-flsh"
    for name in ("math", "sdpa-flash", "sdpa-mem-efficient", "sdpa-cudnn"):
        assert name in err.known and repr(name) in str(err)
    assert "did you mean 'sdpa-flash'" in str(err)
    # an explicit argument does not read the broken variable
    ad.attention(q, k, v, backend="math")


def test_env_empty_means_auto(monkeypatch):
    set_env(monkeypatch, "   ")
    assert ad.explain(*small()).source == "default"


# ---------------------------------------------------- context locality


def test_threads_keep_their_own_choice(register_temp, spy_class):
    n_threads, n_calls = 8, 40
    names = [f"spy-{i}" for i in range(n_threads)]
    for name in names:
        register_temp(name, spy_class)
    spies = [ad.get_backend(n) for n in names]
    q, k, v = small()
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []
    idents: dict[int, int] = {}

    def work(i):
        try:
            idents[i] = threading.get_ident()
            with ad.use_backend(names[i]):
                barrier.wait()
                for j in range(n_calls):
                    ad.attention(q, k, v)
                    if j % 10 == 0:
                        assert ad.explain(q, k, v).backend == names[i]
            # outside the block the thread is back to the default
            assert ad.explain(q, k, v).source == "default"
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    with ad.use_backend("math"):  # the main thread's choice leaks nowhere
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert ad.explain(q, k, v).backend == "math"
    assert not errors, errors
    for i, spy in enumerate(spies):
        assert len(spy.calls) == n_calls
        assert {ident for ident, _ in spy.calls} == {idents[i]}


def test_asyncio_tasks_keep_their_own_choice(register_temp, spy_class):
    names = ["spy-a", "spy-b", "spy-c", "spy-d"]
    for name in names:
        register_temp(name, spy_class)
    q, k, v = small()
    seen: dict[str, list[str]] = {}

    async def task(name):
        with ad.use_backend(name):
            for _ in range(10):
                await asyncio.sleep(0)  # interleave with the other tasks
                ad.attention(q, k, v)
                seen.setdefault(name, []).append(ad.explain(q, k, v).backend)

    async def main():
        await asyncio.gather(*(task(n) for n in names))
        return ad.explain(q, k, v).source

    assert asyncio.run(main()) == "default"
    for name in names:
        assert seen[name] == [name] * 10
        assert len(ad.get_backend(name).calls) == 10


# ---------------------------------------------------------- decision cache


def test_second_call_hits_the_cache(monkeypatch):
    calls = []
    real_probe = REGISTRY.probe

    def counting_probe(name, device):
        calls.append(name)
        return real_probe(name, device)

    monkeypatch.setattr(REGISTRY, "probe", counting_probe)
    q, k, v = small()
    assert len(_dispatch._plans) == 0
    ad.attention(q, k, v)
    first = len(calls)
    assert first >= 1 and len(_dispatch._plans) == 1
    for _ in range(3):
        ad.attention(q, k, v)
    assert len(calls) == first and len(_dispatch._plans) == 1
    # another signature is another entry
    ad.attention(q, k, v, causal=True)
    assert len(_dispatch._plans) == 2 and len(calls) > first
    ad.clear_cache()
    assert len(_dispatch._plans) == 0


def test_cache_respects_selection_changes(spy_backend):
    q, k, v = small()
    ad.attention(q, k, v)
    with ad.use_backend("spy"):
        ad.attention(q, k, v)
    ad.attention(q, k, v)
    assert len(spy_backend.calls) == 1


def test_cache_does_not_skip_validation_of_types():
    """A cached call must not let an equal-but-wrong-typed argument through
    (True == 1, 0.0 == 0 == False)."""
    q, k, v = small()
    ad.attention(q, k, v, return_lse=True, causal=False, dropout_p=0.0)
    with pytest.raises(ad.AttentionTypeError) as ei:
        ad.attention(q, k, v, return_lse=1, causal=False, dropout_p=0.0)
    assert ei.value.argument == "return_lse"
    with pytest.raises(ad.AttentionTypeError) as ei:
        ad.attention(q, k, v, return_lse=True, causal=0, dropout_p=0.0)
    assert ei.value.argument == "causal"
    with pytest.raises(ad.AttentionTypeError) as ei:
        ad.attention(q, k, v, return_lse=True, causal=False, dropout_p=False)
    assert ei.value.argument == "dropout_p"


def test_cache_keyed_on_grad_mode():
    """A call needing gradients is planned apart from a no-grad one."""
    q, k, v = small(requires_grad=True)
    with torch.no_grad():
        d0 = ad.explain(q, k, v)
        ad.attention(q, k, v)
    d1 = ad.explain(q, k, v)
    assert not d0.spec.requires_grad and d1.spec.requires_grad
    out = ad.attention(q, k, v)
    assert out.requires_grad
    out.sum().backward()
    assert q.grad is not None


def test_registry_change_clears_cache(register_temp, spy_class):
    q, k, v = small()
    ad.attention(q, k, v)
    assert len(_dispatch._plans) == 1
    register_temp("late-spy", spy_class)
    assert len(_dispatch._plans) == 0


# ------------------------------------------------------------ auto on CPU


def test_cpu_auto_picks_sdpa_flash_for_plain_fp32():
    q, k, v = small()
    assert ad.explain(q, k, v).backend == "sdpa-flash"


def _only_builtins() -> bool:
    return set(ad.list_backends()) <= set(BUILTINS)


def test_cpu_auto_picks_math_with_dropout():
    q, k, v = small()
    d = ad.explain(q, k, v, dropout_p=0.1)
    assert any("dropout" in r for r in d.reasons("sdpa-flash"))
    assert d.backend is not None and ad.get_backend(d.backend).capabilities.dropout
    if _only_builtins():
        assert d.backend == "math"
    assert ad.explain(q, k, v, dropout_p=0.1, backend="sdpa-flash,math").backend == "math"


def test_cpu_auto_falls_back_for_different_v_head_dim():
    q, k, _ = small()
    v = torch.randn(1, 2, 4, 16)
    d = ad.explain(q, k, v)
    assert any("head_dim_v=16 != head_dim=8" in r for r in d.reasons("sdpa-flash"))
    if _only_builtins():
        assert d.backend == "math"
    assert d.backend not in (None, "sdpa-flash")
    assert ad.attention(q, k, v).shape == (1, 2, 4, 16)


def test_shape_classes_of_the_ranking() -> None:
    """Measured shape classes: decode and short calls put cuDNN first on sm90."""
    import dataclasses

    from attention_dispatch._core.ranking import SHAPE_RANKINGS, shape_class
    from attention_dispatch._core.spec import CallSpec

    base = CallSpec(device_type="cuda", device_index=0, dtype=torch.bfloat16, batch=1,
                    heads_q=16, heads_kv=16, seq_q=16384, seq_k=16384, head_dim=128,
                    head_dim_v=128)
    assert shape_class(base) == "long"
    assert shape_class(dataclasses.replace(base, seq_q=1)) == "decode"
    tiny = dataclasses.replace(base, seq_q=8, seq_k=8, head_dim=16, head_dim_v=16, heads_q=2,
                               heads_kv=2)
    assert shape_class(tiny) == "tiny"  # host-bound: torch's flash operator first on sm90
    assert SHAPE_RANKINGS[("sm90", "tiny")][:2] == ("sdpa-flash", "sdpa-cudnn")
    assert shape_class(dataclasses.replace(tiny, device_type="cpu")) == "short"
    assert shape_class(dataclasses.replace(base, seq_q=1, seq_k=8192, heads_q=32,
                                           heads_kv=8)) == "decode"
    assert shape_class(dataclasses.replace(base, seq_q=1024, seq_k=1024)) == "short"
    assert shape_class(dataclasses.replace(base, seq_q=4096, seq_k=4096)) == "short"
    assert shape_class(dataclasses.replace(base, seq_q=4096, seq_k=4096,
                                           requires_grad=True)) == "long"
    # host-bound with gradients (B=1, H=16, causal 4096, D=128): cuDNN's host cost wins
    assert shape_class(dataclasses.replace(base, seq_q=4096, seq_k=4096, causal=True,
                                           requires_grad=True)) == "short"
    assert shape_class(dataclasses.replace(base, seq_q=8192, seq_k=8192, causal=True,
                                           requires_grad=True)) == "long"
    assert shape_class(dataclasses.replace(base, seq_q=1024, seq_k=1024,
                                           key_padding=True)) == "long"
    # paged: FA4 first once (row, kv head) tiles fill the device, triton's split-KV below
    paged = dataclasses.replace(base, paged=True, block_size=128, seq_q=1, seq_k=8192,
                                heads_q=32, heads_kv=8, batch=32)
    assert shape_class(paged) == "paged-wide"
    assert SHAPE_RANKINGS[("sm90", "paged-wide")][:2] == ("flash-attn", "triton-decode")
    assert shape_class(dataclasses.replace(paged, batch=8)) == "paged"
    assert SHAPE_RANKINGS[("sm90", "paged")][0] == "triton-decode"
    h128 = dataclasses.replace(base, head_dim=128, head_dim_v=128, seq_q=8192, seq_k=8192)
    assert shape_class(h128) == "short"  # forward at 8k, head dim 128: cuDNN
    assert shape_class(dataclasses.replace(h128, head_dim=64, head_dim_v=64)) == "long"
    assert shape_class(dataclasses.replace(h128, seq_q=16384, seq_k=16384)) == "long"
    gqa = dataclasses.replace(base, seq_q=4096, seq_k=4096, heads_q=32, heads_kv=8)
    assert shape_class(gqa) == "short"
    # causal GQA forward at 4096: cuDNN with native GQA (H200 grid, 2026-12-03)
    assert shape_class(dataclasses.replace(gqa, causal=True)) == "short"
    d64 = dataclasses.replace(base, seq_q=2048, seq_k=2048, head_dim=64, head_dim_v=64,
                              requires_grad=True, batch=8, heads_q=32, heads_kv=32)
    assert shape_class(d64) == "long"  # FA4's backward at head dim 64 (as measured)
    assert shape_class(dataclasses.replace(d64, batch=1, heads_q=16, heads_kv=16)) == "short"
    assert shape_class(dataclasses.replace(d64, seq_q=1024, seq_k=1024)) == "short"
    assert SHAPE_RANKINGS[("sm90", "decode")][0] == "sdpa-cudnn"


def test_a_shape_class_promotes_a_compiling_backend_only_once_compiled(register_temp,
                                                                        spy_class) -> None:
    """A backend that compiles per shape, put first by a shape-class ranking,
    runs only the signatures it has compiled; elsewhere it keeps the place the
    family's table gives it (here: before math, behind sdpa-flash)."""
    from attention_dispatch._core import ranking

    class Compiling(spy_class):
        compiles_per_shape = True

        def compiled(self, spec):  # compiled once a call of ``spec`` ran
            return any(s == spec for _, s in self.calls)

    register_temp("compiling", Compiling)
    names = ad.list_backends()
    family = ranking.ranked(torch.device("cpu"), names)
    assert family.index("sdpa-flash") < family.index("compiling") < family.index("math")
    q, q2 = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 32, 16)
    ad.register_ranking("cpu", ("compiling", "sdpa-flash", "math"), shape_class="short")
    try:
        spec = ad.explain(q, q, q).spec
        assert ad.explain(q, q, q).backend == "sdpa-flash"  # not compiled yet
        order = ranking.ranked(torch.device("cpu"), names, spec)
        assert order.index("sdpa-flash") < order.index("compiling") < order.index("math")
        ad.attention(q, q, q, backend="compiling")  # compiles this signature
        assert ad.explain(q, q, q).backend == "compiling"
        assert ranking.ranked(torch.device("cpu"), names, spec)[0] == "compiling"
        assert ad.explain(q2, q2, q2).backend == "sdpa-flash"  # another signature
    finally:
        ad.register_ranking("cpu", (), shape_class="short")
    assert ad.explain(q, q, q).backend == "sdpa-flash"
