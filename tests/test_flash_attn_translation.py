"""TRANSLATION tests of the ``flash-attn`` adapter, on CPU, against FAKE modules.

No flash-attn kernel runs here.  ``FakeFA2`` / ``FakeFA3`` / ``FakeFA4`` below
implement the documented signatures of

* FA2 ``flash_attn.flash_attn_func`` / ``flash_attn_varlen_func``,
* FA3 ``flash_attn_interface.flash_attn_func`` / ``flash_attn_varlen_func``,
* FA4 ``flash_attn.cute.flash_attn_func`` / ``flash_attn_varlen_func``

with a float64 computation written plainly in this file (bottom-right causal,
GQA, per-sequence varlen semantics, each API's LSE layout and empty-row
convention), record every call, and are injected into ``sys.modules``.  The
adapter's device gate (``_flash_api.cuda_capability`` and the class
capabilities' device types) is relaxed so the CPU passes for CUDA.  What these
tests check is the argument translation: views without copies, flags, scale,
GQA, key padding -> seqused_k / varlen, LSE layout, refusals.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import subprocess
import sys
import types
import warnings
from typing import Any, Callable, Optional

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch import testing
from attention_dispatch._core import validate
from attention_dispatch.adapters import _flash_api
from attention_dispatch.adapters.flash_attn import FlashAttnBackend

from _helpers import assert_close, bhsd, bshd, make_qkv, padding_mask, reference

Tensor = torch.Tensor
INF = float("inf")


# ----------------------------------------------------------------- float64 fake kernel


def fake_attention_one(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
                       empty_lse: float, dropout_p: float = 0.0,
                       window: tuple = (None, None), softcap: float = 0.0
                       ) -> tuple[Tensor, Tensor]:
    """One sequence, kernel layout: q (Sq, Hq, D), k (Sk, Hkv, D), v (Sk, Hkv, Dv).

    Returns out (Sq, Hq, Dv) float64 and lse (Hq, Sq) float64.  Causal is
    bottom-right (query i sees key j iff j <= i + Sk - Sq); query head h reads kv
    head h // (Hq // Hkv); rows with no key give out 0 and lse ``empty_lse``.
    FA4's window_size (left, right), None = unbounded: key j is allowed iff
    i + Sk - Sq - left <= j <= i + Sk - Sq + right; causal sets right to 0.
    softcap > 0: scores -> softcap * tanh(scores / softcap) (after the scale).
    """
    sq, hq, sk = q.shape[0], q.shape[1], k.shape[0]
    if sk == 0:
        return (q.new_zeros(sq, hq, v.shape[-1], dtype=torch.float64),
                torch.full((hq, sq), empty_lse, dtype=torch.float64))
    heads = torch.arange(hq) // (hq // k.shape[1])
    kd, vd = k.double()[:, heads], v.double()[:, heads]
    s = torch.einsum("ihd,jhd->hij", q.double(), kd) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    left, right = window
    right = 0 if causal else right
    rel = torch.arange(sk)[None, :] - (torch.arange(sq)[:, None] + (sk - sq))
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if right is not None:
        allowed &= rel <= right
    if left is not None:
        allowed &= rel >= -left
    s = s.masked_fill(~allowed, -INF)
    alive = allowed.any(-1)[None, :].expand(hq, sq)
    m = torch.where(alive, s.amax(-1), torch.zeros(())).detach()
    e = torch.exp(s - m[..., None])
    denom = e.sum(-1)
    p = e / torch.where(alive, denom, torch.ones(()))[..., None]
    if dropout_p > 0:
        p = torch.nn.functional.dropout(p, dropout_p)
    out = torch.einsum("hij,jhd->ihd", p, vd)
    lse = torch.where(alive, torch.log(denom) + m, torch.full_like(m, empty_lse))
    return out, lse


class Recorder:
    """Holds the calls a fake received: (function name, args, kwargs)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def record(self, name: str, args: tuple, kwargs: dict) -> None:
        for t in args:
            if isinstance(t, Tensor) and t.dim() >= 3 and t.stride(-1) != 1:
                raise RuntimeError("fake kernel: last dim must be contiguous")
        self.calls.append((name, args, kwargs))

    @property
    def last(self) -> tuple[str, tuple, dict]:
        return self.calls[-1]


def _dense(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], causal: bool,
           empty_lse: float, dropout_p: float = 0.0, **structured: Any
           ) -> tuple[Tensor, Tensor]:
    """Batched bshd: q (B, Sq, Hq, D) -> out (B, Sq, Hq, Dv) in q.dtype, lse (B, Hq, Sq) f32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    res = [fake_attention_one(q[b], k[b], v[b], scale, causal, empty_lse, dropout_p,
                              **structured)
           for b in range(q.shape[0])]
    return (torch.stack([o for o, _ in res]).to(q.dtype),
            torch.stack([lse for _, lse in res]).float())


def _segments(cu: Optional[Tensor], used: Optional[Tensor], n: int, b: int,
              dense_len: int) -> list[tuple[int, int]]:
    """(start, end) of each batch row's entries: from cu_seqlens and/or seqused."""
    out = []
    for i in range(b):
        start = int(cu[i]) if cu is not None else i * dense_len
        end = int(cu[i + 1]) if cu is not None else start + dense_len
        if used is not None:
            end = start + int(used[i])
        out.append((start, end))
    return out


def _varlen(q: Tensor, k: Tensor, v: Tensor, cu_q: Optional[Tensor], cu_k: Optional[Tensor],
            used_k: Optional[Tensor], scale: Optional[float], causal: bool, empty_lse: float,
            dropout_p: float = 0.0, **structured: Any) -> tuple[Tensor, Tensor]:
    """Per-sequence attention: every row's causal aligned to its own lengths.

    q is packed (total_q, H, D) when cu_q is given, else dense (B, Sq, H, D);
    k/v packed when cu_k is given, else dense (B, Sk, H, D) with seqused_k.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    b = (cu_q.numel() - 1) if cu_q is not None else q.shape[0]
    qf = q if cu_q is not None else q.reshape(-1, *q.shape[2:])
    kf = k if cu_k is not None else k.reshape(-1, *k.shape[2:])
    vf = v if cu_k is not None else v.reshape(-1, *v.shape[2:])
    segq = _segments(cu_q, None, qf.shape[0], b, q.shape[1] if cu_q is None else 0)
    segk = _segments(cu_k, used_k, kf.shape[0], b, k.shape[1] if cu_k is None else 0)
    outs, lses = [], []
    for (qs, qe), (ks, ke) in zip(segq, segk):
        o, lse = fake_attention_one(qf[qs:qe], kf[ks:ke], vf[ks:ke], scale, causal, empty_lse,
                                    dropout_p, **structured)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs).to(q.dtype)
    lse = torch.cat(lses, dim=1).float()  # (H, total_q)
    if cu_q is None:
        return out.reshape(q.shape[0], q.shape[1], *out.shape[1:]), \
            lse.reshape(lse.shape[0], b, -1).permute(1, 0, 2)
    return out, lse


# ----------------------------------------------------------------- fake modules


class FakeFA2(Recorder):
    """``flash_attn`` 2.x: documented signatures; lse (B, H, Sq) dense, (H, total_q)
    varlen; +inf for rows with no key; the backward ignores the lse."""

    def __init__(self, version: str = "2.6.3") -> None:
        super().__init__()
        self.version = version

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                        deterministic=False, return_attn_probs=False) -> Any:
        self.record("flash_attn_func", (q, k, v),
                    dict(dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                         window_size=window_size, return_attn_probs=return_attn_probs))
        out, lse = _dense(q, k, v, softmax_scale, causal, INF, dropout_p)
        return (out, lse.detach(), None) if return_attn_probs else out

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False,
                               window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False,
                               block_table=None) -> Any:
        self.record("flash_attn_varlen_func", (q, k, v, cu_seqlens_q, cu_seqlens_k),
                    dict(max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dropout_p=dropout_p,
                         softmax_scale=softmax_scale, causal=causal,
                         return_attn_probs=return_attn_probs))
        out, lse = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, None, softmax_scale, causal, INF,
                           dropout_p)
        return (out, lse.detach(), None) if return_attn_probs else out

    def modules(self) -> dict[str, types.ModuleType]:
        pkg = types.ModuleType("flash_attn")
        iface = types.ModuleType("flash_attn.flash_attn_interface")
        pkg.__version__ = self.version
        pkg.flash_attn_func = self.flash_attn_func
        pkg.flash_attn_varlen_func = self.flash_attn_varlen_func
        pkg.flash_attn_interface = iface
        return {"flash_attn": pkg, "flash_attn.flash_attn_interface": iface}


class FakeFA3(Recorder):
    """``flash_attn_interface`` (FA3): returns out, or (out, lse) with
    return_attn_probs=True; ``old=True``: a beta that always returns (out, lse)."""

    def __init__(self, old: bool = False) -> None:
        super().__init__()
        self.old = old

    def _ret(self, out: Tensor, lse: Tensor, probs: bool) -> Any:
        return (out, lse.detach()) if probs or self.old else out

    def flash_attn_func(self, q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None,
                        k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0,
                        softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False,
                        sm_margin=0, return_attn_probs=False) -> Any:
        self.record("flash_attn_func", (q, k, v), dict(softmax_scale=softmax_scale, causal=causal,
                                                       return_attn_probs=return_attn_probs))
        return self._ret(*_dense(q, k, v, softmax_scale, causal, INF), return_attn_probs)

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, seqused_q=None, seqused_k=None, softmax_scale=None,
                               causal=False, qv=None, q_descale=None, k_descale=None,
                               v_descale=None, window_size=(-1, -1), attention_chunk=0,
                               softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False,
                               sm_margin=0, return_attn_probs=False) -> Any:
        self.record("flash_attn_varlen_func", (q, k, v, cu_seqlens_q, cu_seqlens_k),
                    dict(max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                         softmax_scale=softmax_scale, causal=causal))
        res = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, softmax_scale, causal, INF)
        return self._ret(*res, return_attn_probs)

    def modules(self) -> dict[str, types.ModuleType]:
        mod = types.ModuleType("flash_attn_interface")
        if self.old:  # no return_attn_probs parameter at all
            def func(q, k, v, softmax_scale=None, causal=False, deterministic=False) -> Any:
                return self.flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal)
            mod.flash_attn_func = func
        else:
            mod.flash_attn_func = self.flash_attn_func
        mod.flash_attn_varlen_func = self.flash_attn_varlen_func
        return {"flash_attn_interface": mod}


def _sink(out: Tensor, lse: Tensor, sink: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """FA4's learnable_sink on a dense bshd result (lse (B, H, Sq)): out scaled by
    sigmoid(lse - sink[h]), lse = logaddexp(lse, sink[h]) (rows with no key: out
    0, lse sink)."""
    if sink is None:
        return out, lse
    s = sink.float().view(1, -1, 1)
    alpha = torch.sigmoid(lse - s)
    return (out.float() * alpha.transpose(1, 2)[..., None]).to(out.dtype), torch.logaddexp(lse, s)


class FakeFA4(Recorder):
    """``flash_attn.cute`` (FA4): both functions return (out, lse), lse (B, H, Sq)
    for dense queries, -inf for rows with no key, differentiable."""

    def flash_attn_func(self, q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None,
                        causal=False, window_size=(None, None), learnable_sink=None, softcap=0.0,
                        num_splits=1, pack_gqa=None, deterministic=False, score_mod=None,
                        score_mod_bwd=None, mask_mod=None, aux_tensors=None, aux_scalars=None,
                        block_sparse_tensors=None, block_sparse_tensors_bwd=None,
                        return_lse=False, gather_bwd_recompute_p=False,
                        gather_bwd_token_chunk=None) -> Any:
        self.record("flash_attn_func", (q, k, v), dict(softmax_scale=softmax_scale, causal=causal,
                                                       return_lse=return_lse,
                                                       window_size=window_size, softcap=softcap,
                                                       learnable_sink=learnable_sink))
        out, lse = _sink(*_dense(q, k, v, softmax_scale, causal, -INF, window=window_size,
                                 softcap=softcap), learnable_sink)
        return out, (lse if return_lse else None)

    def flash_attn_varlen_func(self, q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None,
                               max_seqlen_q=None, max_seqlen_k=None, min_seqlen_k=None,
                               seqused_q=None, seqused_k=None, gather_kv_indices=None,
                               page_table=None, softmax_scale=None, causal=False,
                               window_size=(None, None), learnable_sink=None, softcap=0.0,
                               num_splits=1, pack_gqa=None, deterministic=False, score_mod=None,
                               score_mod_bwd=None, mask_mod=None, block_sparse_tensors=None,
                               aux_tensors=None, aux_scalars=None, return_lse=False,
                               scheduler_metadata=None, seqlen_k_per_split=None,
                               disable_scheduler_metadata=False, gather_bwd_recompute_p=False,
                               gather_bwd_token_chunk=None) -> Any:
        self.record("flash_attn_varlen_func", (q, k, v),
                    dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                         seqused_k=seqused_k, softmax_scale=softmax_scale, causal=causal,
                         return_lse=return_lse, window_size=window_size, softcap=softcap,
                         learnable_sink=learnable_sink))
        out, lse = _sink(*_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, softmax_scale,
                                  causal, -INF, window=window_size, softcap=softcap),
                         learnable_sink)
        return out, (lse if return_lse else None)

    def modules(self) -> dict[str, types.ModuleType]:
        ns = types.ModuleType("flash_attn")  # flash-attn-4 ships a namespace package
        ns.__path__ = []
        cute = types.ModuleType("flash_attn.cute")
        cute.flash_attn_func = self.flash_attn_func
        cute.flash_attn_varlen_func = self.flash_attn_varlen_func
        ns.cute = cute
        return {"flash_attn": ns, "flash_attn.cute": cute}


# ----------------------------------------------------------------- fixtures and helpers


def _clean_flash_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name in ("flash_attn", "flash_attn_interface") or name.startswith("flash_attn."):
            monkeypatch.delitem(sys.modules, name)


@pytest.fixture
def flash_env(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FlashAttnBackend]:
    """``install(*fakes, cc=(9, 0))``: fake modules in sys.modules, CPU treated as a
    CUDA device of compute capability ``cc``; returns the (reset) backend."""
    backend = ad.get_backend("flash-attn")
    _clean_flash_modules(monkeypatch)

    def install(*fakes: Recorder, cc: Optional[tuple[int, int]] = (9, 0)) -> FlashAttnBackend:
        for name in ("flash_attn", "flash_attn_interface"):  # hide real installations
            monkeypatch.setitem(sys.modules, name, None)
        for fake in fakes:
            for name, mod in fake.modules().items():  # type: ignore[attr-defined]
                old = sys.modules.get(name)  # None: a hidden real installation
                for attr in ("cute", "flash_attn_interface"):  # FA2 + FA4 in one package
                    if old is not None and hasattr(old, attr) and not hasattr(mod, attr):
                        setattr(mod, attr, getattr(old, attr))
                monkeypatch.setitem(sys.modules, name, mod)
        if cc is not None:
            monkeypatch.setattr(_flash_api, "cuda_capability", lambda device: cc)
            caps = dataclasses.replace(FlashAttnBackend.capabilities,
                                       device_types=frozenset({"cpu", "cuda"}))
            monkeypatch.setattr(FlashAttnBackend, "capabilities", caps)
        backend.forget()
        ad.clear_cache()
        return backend  # type: ignore[return-value]

    yield install
    backend.forget()
    ad.clear_cache()


API_FAKES = {"fa4": FakeFA4, "fa3": FakeFA3, "fa2": FakeFA2}


# ----------------------------------------------------------------- tests: probe and import


def test_import_attention_dispatch_imports_no_flash_attn() -> None:
    code = ("import sys, torch, attention_dispatch as ad\n"
            "d = ad.explain(*[torch.randn(1, 2, 4, 8)] * 3)\n"
            "print(' | '.join(d.reasons('flash-attn')))\n"
            "assert 'flash_attn' not in sys.modules and 'flash_attn.cute' not in sys.modules\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "device cpu; allowed: cuda" in res.stdout


def test_probe_reports_missing_package(flash_env: Callable) -> None:
    backend = flash_env(cc=None)
    reasons = backend.probe(torch.device("cpu"))
    assert reasons[0] == "device cpu; allowed: cuda"
    assert reasons[1].startswith(
        "flash-attn not installed: pip install 'attention-dispatch[flash-attn]'")
    backend = flash_env(cc=(9, 0))  # a CUDA device, nothing installed
    assert backend.probe(torch.device("cpu")) == [_flash_api.INSTALL_HINT]
    assert backend.describe() == "flash-attn (not installed)"


def test_probe_reports_import_failure(flash_env: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = flash_env(FakeFA4())
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # import fails
    backend.forget()
    (reason,) = backend.probe(torch.device("cpu"))
    assert reason.startswith(
        "FA4, flash_attn.cute: import flash_attn.cute failed: ModuleNotFoundError")


@pytest.mark.parametrize("cc, expect", [
    ((7, 5), ["FA4, flash_attn.cute: compute capability sm75; FA4 is used on sm90/sm100/sm110",
              "FA2, flash_attn: compute capability sm75; FA2 allowed: >= sm80"]),
    ((8, 0), []),
])
def test_probe_compute_capability(flash_env: Callable, cc: tuple, expect: list[str]) -> None:
    backend = flash_env(FakeFA4(), FakeFA2(), cc=cc)
    reasons = backend.probe(torch.device("cpu"))
    assert len(reasons) == len(expect)
    for r, e in zip(reasons, expect):
        assert r.startswith(e)


def test_probe_old_fa2_refused(flash_env: Callable) -> None:
    backend = flash_env(FakeFA2(version="2.0.9"))
    (reason,) = backend.probe(torch.device("cpu"))
    assert "flash-attn 2.0.9 aligns causal to the top-left; allowed: >= 2.1" in reason


def test_describe_names_api_and_version(flash_env: Callable) -> None:
    backend = flash_env(FakeFA4(), FakeFA2(version="2.8.3"))
    text = backend.describe()
    assert "(FA4, flash_attn.cute)" in text and "flash-attn 2.8.3 (FA2, flash_attn)" in text


# ----------------------------------------------------------------- tests: dense translation


@pytest.mark.parametrize("api", ["fa4", "fa3", "fa2"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_dense_call_passes_views_flags_scale_gqa(flash_env: Callable, api: str,
                                                 layout: str) -> None:
    fake = API_FAKES[api]()
    flash_env(fake)
    q, k, v = make_qkv(hq=4, hkv=2, sq=6, sk=10, layout=layout)
    out = ad.attention(q, k, v, causal=True, scale=0.25, layout=layout, backend="flash-attn")
    name, args, kw = fake.last
    assert name == "flash_attn_func"
    for got, t in zip(args, (q, k, v)):  # the caller's storage, bshd view, no copy
        view = bshd(t, layout)
        assert got.data_ptr() == t.data_ptr()
        assert got.shape == view.shape and got.stride() == view.stride()
    assert args[1].shape[2] == 2  # GQA: kv heads passed as they are
    assert kw["causal"] is True and kw["softmax_scale"] == 0.25
    ref, _ = reference(q, k, v, layout, causal=True, scale=0.25)
    assert_close(bhsd(out, layout), ref)


@pytest.mark.parametrize("sq, sk, flag", [(1, 9, False), (9, 9, True), (12, 5, True)])
def test_causal_flag_bottom_right(flash_env: Callable, sq: int, sk: int, flag: bool) -> None:
    fake = FakeFA4()
    flash_env(fake)
    q, k, v = make_qkv(sq=sq, sk=sk)
    out = ad.attention(q, k, v, causal=True, layout="bshd", backend="flash-attn")
    assert fake.last[2]["causal"] is flag  # Sq == 1: bottom-right causal admits every key
    assert fake.last[2]["softmax_scale"] == pytest.approx(1 / math.sqrt(16))
    assert_close(out.transpose(1, 2), reference(q, k, v, "bshd", causal=True)[0])


@pytest.mark.parametrize("api, old", [("fa4", False), ("fa3", False), ("fa3", True),
                                      ("fa2", False)])
def test_lse_layout_and_dtype(flash_env: Callable, api: str, old: bool) -> None:
    fake = FakeFA3(old=old) if api == "fa3" else API_FAKES[api]()
    flash_env(fake)
    q, k, v = make_qkv(hq=4, hkv=1, sq=7, sk=5)
    out, lse = ad.attention(q, k, v, causal=True, layout="bshd", backend="flash-attn",
                            return_lse=True)
    ref, ref_lse = reference(q, k, v, "bshd", causal=True)
    assert lse.shape == (2, 4, 7) and lse.dtype == torch.float32
    assert_close(lse, ref_lse)  # rows with no key: -inf whatever the kernel wrote
    assert_close(out.transpose(1, 2), ref)
    if api in ("fa3", "fa2") and not old:
        assert fake.last[2]["return_attn_probs"] is True


@pytest.mark.parametrize("api", ["fa4", "fa3", "fa2"])
def test_gradients_dense(flash_env: Callable, api: str) -> None:
    flash_env(API_FAKES[api]())
    q, k, v = make_qkv(hq=4, hkv=2, sq=5, sk=8, grad=True, layout="bhsd")
    out = ad.attention(q, k, v, causal=True, backend="flash-attn")
    out.float().square().sum().backward()
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref, _ = testing.reference_attention(*leaves, causal=True)
    ref.square().sum().backward()
    for got, want in zip((q, k, v), leaves):
        assert_close(got.grad, want.grad, tol=5e-3)


@pytest.mark.parametrize("api", ["fa4", "fa3", "fa2"])
def test_lse_with_gradients_is_accepted_and_detached(flash_env: Callable, api: str) -> None:
    flash_env(API_FAKES[api]())
    q, k, v = make_qkv(sq=5, sk=8, grad=True)
    out, lse = ad.attention(q, k, v, causal=True, layout="bshd", backend="flash-attn",
                            return_lse=True)
    assert not lse.requires_grad  # the contract's lse carries no gradient
    assert_close(lse, reference(q, k, v, "bshd", causal=True)[1])
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


# ----------------------------------------------------------------- tests: key padding


def test_fa4_key_padding_uses_seqused_k(flash_env: Callable) -> None:
    """Right padding goes in as seqused_k: q as it is, K and V as one masked copy
    each (FA4 reads the padded slots of the last key tile)."""
    fake = FakeFA4()
    flash_env(fake)
    q, k, v = make_qkv(b=3, sq=4, sk=9)
    kpm = padding_mask([9, 5, 0], 9)  # right padding; one row with no key at all
    out, lse = ad.attention(q, k, v, key_padding_mask=kpm, layout="bshd", backend="flash-attn",
                            return_lse=True)
    name, args, kw = fake.last
    assert name == "flash_attn_varlen_func"
    assert kw["cu_seqlens_q"] is None and kw["cu_seqlens_k"] is None
    assert kw["seqused_k"].dtype == torch.int32 and kw["seqused_k"].tolist() == [9, 5, 0]
    assert args[0].data_ptr() == q.data_ptr()  # q: no copy
    assert args[1].shape == k.shape and args[2].shape == v.shape
    for got, t in zip(args[1:], (k, v)):  # K, V: padded slots zeroed in a copy
        assert got.data_ptr() != t.data_ptr()
        assert not got[~kpm].any() and torch.equal(got[kpm], t[kpm])
    assert kw["causal"] is False
    ref, ref_lse = reference(q, k, v, "bshd", key_padding_mask=kpm)
    assert_close(out.transpose(1, 2), ref)
    assert_close(lse, ref_lse)


def test_fa4_key_padding_not_prefix_gathers_real_keys(flash_env: Callable) -> None:
    fake = FakeFA4()
    flash_env(fake)
    q, k, v = make_qkv(b=2, sq=3, sk=8, grad=True)
    kpm = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    out = ad.attention(q, k, v, key_padding_mask=kpm, layout="bshd", backend="flash-attn")
    _, args, kw = fake.last
    assert kw["seqused_k"].tolist() == [4, 7]
    assert torch.equal(args[1][0, :4], k[0, kpm[0]].detach())  # real keys moved to the front
    # FA4 loads a row's last key tile whole: what follows row 0's 4 keys in the
    # gathered copy (7 positions, the longest row) is zero, not a padded key
    assert args[1].shape[1] == 7 and not args[1][0, 4:].any() and not args[2][0, 4:].any()
    # ... zeroed in that copy: no second, full-size cleaning copy of K and V
    dec = ad.explain(q, k, v, key_padding_mask=kpm, layout="bshd", backend="flash-attn")
    assert not any("zeroed" in c for c in dec.copies), dec.copies
    out.float().sum().backward()
    leaves = [t.detach().double().transpose(1, 2).requires_grad_(True) for t in (q, k, v)]
    ref, _ = testing.reference_attention(*leaves, key_padding_mask=kpm)
    ref.sum().backward()
    assert_close(out.transpose(1, 2), ref)
    for got, want in zip((q, k, v), leaves):
        assert_close(got.grad.transpose(1, 2), want.grad, tol=5e-3)
    assert torch.all(k.grad[~kpm] == 0)


@pytest.mark.parametrize("api", ["fa3", "fa2"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_varlen_key_padding_cu_seqlens_and_repadding(flash_env: Callable, api: str,
                                                     layout: str) -> None:
    fake = API_FAKES[api]()
    flash_env(fake)
    q, k, v = make_qkv(b=3, hq=4, hkv=2, sq=5, sk=7, layout=layout, grad=True)
    kpm = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0]],
                       dtype=torch.bool)
    out = ad.attention(q, k, v, key_padding_mask=kpm, scale=0.5, layout=layout,
                       backend="flash-attn")
    name, args, kw = fake.last
    assert name == "flash_attn_varlen_func"
    qp, kp, vp, cu_q, cu_k = args
    assert cu_q.dtype == cu_k.dtype == torch.int32
    assert cu_q.tolist() == [0, 5, 10, 15] and cu_k.tolist() == [0, 7, 10, 12]
    assert kw["max_seqlen_q"] == 5 and kw["max_seqlen_k"] == 7
    assert qp.shape == (15, 4, 16) and kp.shape == (12, 2, 16)
    assert torch.equal(kp, bshd(k, layout)[kpm].detach())
    assert kw["softmax_scale"] == 0.5 and kw["causal"] is False
    ref, _ = reference(q, k, v, layout, key_padding_mask=kpm, scale=0.5)
    assert_close(bhsd(out, layout), ref)
    out.float().sum().backward()
    assert torch.all(bshd(k.grad, layout)[~kpm] == 0)


def test_key_padding_decode_with_causal_drops_causal(flash_env: Callable) -> None:
    fake = FakeFA2()
    flash_env(fake)
    q, k, v = make_qkv(b=2, sq=1, sk=6)
    kpm = padding_mask([6, 3], 6)
    out = ad.attention(q, k, v, key_padding_mask=kpm, causal=True, layout="bshd",
                       backend="flash-attn")
    assert fake.last[2]["causal"] is False
    assert_close(out.transpose(1, 2), reference(q, k, v, "bshd", key_padding_mask=kpm,
                                                causal=True)[0])


# ----------------------------------------------------------------- tests: refusals and choice


def _reasons(**kw: Any) -> list[str]:
    args = dict(sq=6, sk=10)
    args.update(kw.pop("shape", {}))
    q, k, v = make_qkv(**args)
    decision = ad.explain(q, k, v, layout="bshd", backend="flash-attn", **kw)
    return list(decision.reasons("flash-attn"))


@pytest.mark.parametrize("api, kw, expect", [
    ("fa4", dict(dropout_p=0.1), "FA4, flash_attn.cute: dropout_p > 0; FA4 has no dropout"),
    ("fa3", dict(dropout_p=0.1), "FA3, flash_attn_interface: dropout_p > 0; FA3 has no dropout"),
    ("fa4", dict(mask=torch.ones(6, 10, dtype=torch.bool)), "mask kind bool; allowed: none"),
    ("fa2", dict(mask=torch.zeros(6, 10)), "mask kind float; allowed: none"),
    ("fa4", dict(shape=dict(dtype=torch.float32)), "dtype float32; allowed: bfloat16/float16"),
    ("fa2", dict(shape=dict(d=12)), "head_dim=12; allowed: multiples of 8"),
    ("fa4", dict(causal=True, key_padding_mask=padding_mask([10, 4], 10)),
     "causal=True with key_padding_mask and Sq > 1"),
    ("fa2", dict(dropout_p=0.1, return_lse=True), "FA2 returns the LSE only through"),
    ("fa3", dict(shape=dict(dv=32)), "head_dim_v=32 != head_dim=16; FA3 path allowed"),
    ("fa2", dict(shape=dict(dv=32)), "head_dim_v=32 != head_dim=16; FA2 allowed"),
    ("fa3", dict(window=(2, 2)), "window=(2, 2); the FA3 path takes no window (FA4 does)"),
    ("fa2", dict(softcap=5.0), "softcap=5.0; the FA2 path takes no softcap (FA4 does)"),
    ("fa4", dict(window=(2, 0), key_padding_mask=padding_mask([10, 4], 10)),
     "window with key_padding_mask: the kernel aligns the window"),
    ("fa4", dict(alibi_slopes=torch.ones(4)), "alibi_slopes given; allowed: no ALiBi"),
])
def test_refusal_reasons(flash_env: Callable, api: str, kw: dict, expect: str) -> None:
    flash_env(API_FAKES[api]())
    reasons = _reasons(**kw)
    assert any(expect in r for r in reasons), reasons


def test_refusal_head_dims_per_architecture(flash_env: Callable) -> None:
    flash_env(FakeFA4(), cc=(10, 0))
    reasons = _reasons(shape=dict(d=192))
    assert any("head dims (D=192, Dv=192) on sm100; FA4 allowed" in r for r in reasons)
    flash_env(FakeFA4(), cc=(9, 0))
    assert _reasons(shape=dict(d=192)) == []


def test_newest_api_that_accepts_is_chosen(flash_env: Callable) -> None:
    fa4, fa3, fa2 = FakeFA4(), FakeFA3(), FakeFA2()
    backend = flash_env(fa4, fa3, fa2)
    q, k, v = make_qkv()
    ad.attention(q, k, v, layout="bshd", backend="flash-attn")
    assert fa4.calls and not fa3.calls and not fa2.calls
    ad.attention(q, k, v, layout="bshd", backend="flash-attn", dropout_p=0.2)
    assert fa2.calls and fa2.last[2]["dropout_p"] == 0.2 and not fa3.calls
    spec = ad.explain(q, k, v, layout="bshd", dropout_p=0.2).spec
    assert backend.chosen_api(spec) == "FA2, flash_attn"
    backend = flash_env(fa4, fa3, fa2, cc=(8, 0))  # FA4 and FA3 unusable on sm80
    assert backend.chosen_api(ad.explain(q, k, v, layout="bshd").spec) == "FA2, flash_attn"


# ----------------------------------------------------------------- window and softcap


@pytest.mark.parametrize("window, causal, fa4", [
    ((3, 2), False, (3, 2)), ((4, -1), True, (4, None)), ((-1, 2), False, (None, 2)),
    ((0, 0), False, (0, 0)),
])
def test_fa4_window_translation(flash_env: Callable, window: tuple, causal: bool,
                                fa4: tuple) -> None:
    fake = FakeFA4()
    flash_env(fake)
    q, k, v = make_qkv(sq=7, sk=19)
    out = ad.attention(q, k, v, layout="bshd", backend="flash-attn", window=window,
                       causal=causal, softcap=2.5)
    assert fake.last[2]["window_size"] == fa4 and fake.last[2]["softcap"] == 2.5
    assert fake.last[2]["causal"] is causal
    want = reference(q, k, v, "bshd", window=window, causal=causal, softcap=2.5)[0]
    assert_close(out.transpose(1, 2), want)


def test_fa4_softcap_with_key_padding_uses_seqused(flash_env: Callable) -> None:
    fake = FakeFA4()
    flash_env(fake)
    q, k, v = make_qkv()
    kpm = padding_mask([10, 4], 10)
    out = ad.attention(q, k, v, layout="bshd", backend="flash-attn", softcap=3.0,
                       key_padding_mask=kpm)
    name, _, kw = fake.last
    assert name == "flash_attn_varlen_func" and kw["softcap"] == 3.0
    want = reference(q, k, v, "bshd", key_padding_mask=kpm, softcap=3.0)[0]
    assert_close(out.transpose(1, 2), want)


def test_structured_cases_through_fake_fa4(flash_env: Callable) -> None:
    """Every structured case FA4 accepts (window, softcap, with GQA, causal,
    empty rows, lse, gradients) meets the accuracy rule through the fake."""
    flash_env(FakeFA4())
    passed = 0
    for case in testing.structured_cases(dtypes=(torch.float16,)):
        try:
            testing.check_backend("flash-attn", case, device="cpu")
            passed += 1
        except ad.BackendUnavailable:
            pass
    assert passed >= 15, passed


# ----------------------------------------------------------------- the conformance matrix


@pytest.mark.parametrize("api", ["fa4", "fa3", "fa2"])
def test_conformance_cases_through_fake(flash_env: Callable, api: str) -> None:
    """Every default case the adapter accepts meets the contract's accuracy rule
    (the fake is exact, so this checks the translation end to end)."""
    flash_env(API_FAKES[api]())
    passed, refused = 0, 0
    for case in testing.default_cases(dtypes=(torch.float16,), head_dims=(32,)):
        try:
            testing.check_backend("flash-attn", case, device="cpu")
            passed += 1
        except ad.BackendUnavailable:
            refused += 1
    assert passed >= 20, (passed, refused)


# ----------------------------------------------------------------- FA4 compile warnings

JIT_WARNING = ("Argument aux_data (position 17) cannot be converted to a JitArgument.\n"
               "  It is treated as a constant at compile time.\n  (CuTe DSL)")


class NoisyFakeFA4(FakeFA4):
    """FakeFA4 that warns like the CuTe DSL when it "compiles" (the first call of
    each shape and flag set) and emits an unrelated UserWarning on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.compiled: set = set()

    def _noise(self, fname: str, q: Tensor, k: Tensor, kw: dict) -> None:
        key = (fname, q.shape, k.shape, q.dtype, kw.get("causal"), kw.get("return_lse"))
        if key not in self.compiled:
            self.compiled.add(key)
            warnings.warn(JIT_WARNING, UserWarning)
        warnings.warn("an unrelated warning", UserWarning)

    def modules(self) -> dict[str, types.ModuleType]:
        mods = super().modules()
        cute = mods["flash_attn.cute"]
        for fname in ("flash_attn_func", "flash_attn_varlen_func"):
            real = getattr(self, fname)

            @functools.wraps(real)  # keeps the signature the adapter inspects
            def noisy(q, k, v, *args, _real=real, _name=fname, **kw):
                self._noise(_name, q, k, kw)
                return _real(q, k, v, *args, **kw)

            setattr(cute, fname, noisy)
        return mods


def test_fa4_compile_warning_is_hidden_only_around_first_calls(
        flash_env: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = NoisyFakeFA4()
    flash_env(fake)
    q, k, v = make_qkv(sq=6, sk=10)
    pad = padding_mask([10, 7], 10)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(2):
            ad.attention(q, k, v, layout="bshd", backend="flash-attn")
            ad.attention(q, k, v, layout="bshd", backend="flash-attn", key_padding_mask=pad)
    messages = [str(w.message) for w in rec]
    assert len(fake.compiled) == 2  # the fake "compiled" twice and warned twice
    assert not any("JitArgument" in m for m in messages)
    assert messages.count("an unrelated warning") == 4  # other warnings pass through
    # the filter is entered on a signature's first call only, not per call
    entered: list = []
    quiet = _flash_api.quiet_fa4_compile

    def counting() -> Any:
        entered.append(1)
        return quiet()

    monkeypatch.setattr(_flash_api, "quiet_fa4_compile", counting)
    with warnings.catch_warnings(record=True):
        ad.attention(q, k, v, layout="bshd", backend="flash-attn")
        assert entered == []
        q2, k2, v2 = make_qkv(sq=7, sk=10)
        ad.attention(q2, k2, v2, layout="bshd", backend="flash-attn")
        assert entered == [1]
    # and it is not process-wide: afterwards the same warning reaches the user
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        warnings.warn(JIT_WARNING, UserWarning)
    assert len(rec) == 1


# ----------------------------------------------------------------- attention sinks


@pytest.mark.parametrize("padded", [False, True])
def test_fa4_sinks_pass_learnable_sink(flash_env: Callable, padded: bool) -> None:
    """FA4 gets sinks as learnable_sink (the caller's tensor), dense and with key
    padding (a row with no key: out 0, lse the sink); out, lse and the sinks'
    gradient match the reference."""
    fake = FakeFA4()
    flash_env(fake)
    q, k, v = make_qkv(b=3, hq=4, hkv=2, sq=5, sk=9, dtype=torch.bfloat16)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], requires_grad=True)
    kpm = padding_mask([9, 4, 0], 9) if padded else None
    out, lse = ad.attention(q, k, v, key_padding_mask=kpm, layout="bshd", backend="flash-attn",
                            return_lse=True, sinks=sinks)
    name, _, kw = fake.last
    assert name == ("flash_attn_varlen_func" if padded else "flash_attn_func")
    assert kw["learnable_sink"] is sinks
    ref, ref_lse = reference(q, k, v, "bshd", key_padding_mask=kpm, sinks=sinks.detach())
    assert_close(out.transpose(1, 2), ref, tol=2e-2)
    assert_close(lse, ref_lse)
    if padded:
        assert not out[2].any() and torch.equal(lse[2], sinks.detach()[:, None].expand(4, 5))
    w = torch.randn(ref.shape, dtype=torch.float64)
    (got,) = torch.autograd.grad((out.transpose(1, 2).double() * w).sum(), sinks)
    s64 = sinks.detach().double().requires_grad_()
    want_out, _ = reference(q, k, v, "bshd", key_padding_mask=kpm, sinks=s64)
    (want,) = torch.autograd.grad((want_out * w).sum(), s64)
    assert_close(got, want, tol=3e-2)


@pytest.mark.parametrize("api", ["fa3", "fa2"])
def test_sinks_refused_on_fa3_fa2(flash_env: Callable, api: str) -> None:
    flash_env(API_FAKES[api]())
    q, k, v = make_qkv()
    why = ad.explain(q, k, v, layout="bshd", sinks=torch.zeros(4)).reasons("flash-attn")
    assert any("sinks given; the" in r and "learnable_sink" in r for r in why), why


def test_fa4_sink_gradients_need_sm90_or_newer() -> None:
    spec = validate(*make_qkv(layout="bhsd", dtype=torch.float16, grad=True),
                    sinks=torch.zeros(4))
    assert spec.sinks and spec.requires_grad
    assert any("learnable_sink backward" in r for r in _flash_api._fa4_call_reasons(spec, (12, 0)))
    assert not _flash_api._fa4_call_reasons(spec, (9, 0))
