"""TRANSLATION tests of the ``xformers`` adapter, on CPU, against a FAKE xformers.

No xformers kernel runs here.  The fake ``xformers.ops`` below implements the
documented ``memory_efficient_attention(query, key, value, attn_bias=None,
p=0.0, scale=None, *, op=None)`` and ``memory_efficient_attention_forward_requires_grad``
(-> (out, lse)) with a float64 computation written plainly in this file, the
``attn_bias`` classes ``LowerTriangularFromBottomRightMask`` and
``BlockDiagonalPaddedKeysMask.from_seqlens(q_seqlen, kv_padding, kv_seqlen)``,
the (B, M, H, K) and 5-D (B, M, G, H, K) GQA forms, tensor biases with
xformers' alignment rule, the op families ``fmha.flash`` (no tensor bias,
float16/bfloat16 only) and ``fmha.cutlass``, and LSE layouts (cutlass pads the
query axis to a multiple of 32).  Calls are recorded.  The adapter's device gate
is relaxed so the CPU passes for CUDA.  The import conflict with flash-attn-4 is
reproduced with a small fake package tree on disk.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
import types
from typing import Any, Callable, Optional

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch import testing
from attention_dispatch.adapters import xformers as xf
from attention_dispatch.adapters.xformers import XformersBackend

from _helpers import assert_close, bhsd, make_qkv, padding_mask, reference

Tensor = torch.Tensor
INF = float("inf")
CALLS: list[dict[str, Any]] = []
BROKEN: set[str] = set()  # op NAMEs whose kernels "fail" in this process


# ----------------------------------------------------------------- fake attn_bias


@dataclasses.dataclass
class LowerTriangularFromBottomRightMask:
    """Causal: query i sees key j iff j <= i + Mk - Mq."""


@dataclasses.dataclass
class BlockDiagonalPaddedKeysMask:
    """Queries in blocks of ``q_seqlen``; block i's keys are the first ``kv_seqlen[i]``
    of [i * kv_padding, (i + 1) * kv_padding)."""

    q_seqlen: list[int]
    kv_padding: int
    kv_seqlen: list[int]

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_padding, kv_seqlen, causal_diagonal=None, *,
                     device=None) -> "BlockDiagonalPaddedKeysMask":
        if isinstance(kv_seqlen, torch.Tensor) or not all(n <= kv_padding for n in kv_seqlen):
            raise AssertionError("kv_seqlen must be a list of ints <= kv_padding")
        return cls(list(q_seqlen), int(kv_padding), list(kv_seqlen))


# ----------------------------------------------------------------- fake op families


class FlashFw:
    NAME = "fa2F@fake-pt"


class FlashBw:
    NAME = "fa2B@fake-pt"


class CutlassFw:
    NAME = "cutlassF-pt"


class CutlassBw:
    NAME = "cutlassB-pt"


def _check_op(fw: Any, q: Tensor, bias: Any) -> None:
    if fw.NAME in BROKEN:
        raise RuntimeError(f"No such operator for {fw.NAME} (fake broken op)")
    if fw is FlashFw and (isinstance(bias, torch.Tensor) or q.dtype == torch.float32):
        raise NotImplementedError("fa2F: tensor attn_bias / float32 not supported")
    if fw is FlashFw and q.requires_grad and (q.dim() == 5 or isinstance(
            bias, BlockDiagonalPaddedKeysMask)):
        raise NotImplementedError("fa2B: no BMGHK format / BlockDiagonalPaddedKeysMask backward")
    if isinstance(bias, torch.Tensor):
        align = 128 // torch.finfo(bias.dtype).bits
        if any(bias.stride(d) % align for d in range(bias.dim() - 1)) or bias.stride(-1) != 1:
            raise ValueError(f"attn_bias.stride(-2) % {align} != 0 ({bias.stride()})")


# ----------------------------------------------------------------- float64 fake kernel


def _one(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
         bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """q (Mq, H, K), k (Mk, H, K), v (Mk, H, Kv) -> out (Mq, H, Kv) f64, lse (H, Mq);
    empty rows: out 0, lse +inf (as the memory-efficient kernel writes)."""
    mq, h, mk = q.shape[0], q.shape[1], k.shape[0]
    s = torch.einsum("ihd,jhd->hij", q.double(), k.double()) * scale
    if bias is not None:
        s = s + bias.double()
    if causal:
        s = s.masked_fill(torch.arange(mk)[None, :] > torch.arange(mq)[:, None] + (mk - mq), -INF)
    alive = torch.isfinite(s).any(-1) if mk else torch.zeros(h, mq, dtype=torch.bool)
    if mk == 0:
        return q.new_zeros(mq, h, v.shape[-1], dtype=torch.float64), torch.full((h, mq), INF)
    m = torch.where(alive, s.amax(-1), torch.zeros(())).detach()
    e = torch.exp(s - m[..., None])
    denom = e.sum(-1)
    p = e / torch.where(alive, denom, torch.ones(()))[..., None]
    out = torch.einsum("hij,jhd->ihd", p, v.double())
    return out, torch.where(alive, torch.log(denom) + m, torch.full_like(m, INF))


def _fold(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """5-D (B, M, G, H, K) -> 4-D with G*H query heads and kv heads repeated per group."""
    if q.dim() == 4:
        return q, k, v
    b, m, g, h, d = q.shape
    kv = [t[:, :, :, 0] if t.stride(3) == 0 else t.reshape(t.shape[0], t.shape[1], g * h, -1)
          for t in (k, v)]
    if kv[0].shape[2] == g:
        kv = [t.repeat_interleave(h, dim=2) for t in kv]
    return q.reshape(b, m, g * h, d), kv[0], kv[1]


def _fake_mea(q: Tensor, k: Tensor, v: Tensor, bias: Any, p: float, scale: Optional[float],
              fw: Any) -> tuple[Tensor, Tensor]:
    _check_op(fw, q, bias)
    qf, kf, vf = _fold(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    causal = isinstance(bias, LowerTriangularFromBottomRightMask)
    outs, lses = [], []
    if isinstance(bias, BlockDiagonalPaddedKeysMask):
        if q.shape[0] != 1:
            raise ValueError("Expected batch_size=1 when using block-diagonal bias")
        start = 0
        for i, (nq, nk) in enumerate(zip(bias.q_seqlen, bias.kv_seqlen)):
            ks = slice(i * bias.kv_padding, i * bias.kv_padding + nk)
            o, lse = _one(qf[0, start:start + nq], kf[0, ks], vf[0, ks], scale, False, None)
            outs.append(o)
            lses.append(lse)
            start += nq
        out, lse = torch.cat(outs)[None], torch.cat(lses, dim=1)[None]  # lse (1, H, total)
    else:
        for b in range(q.shape[0]):
            t = bias[b] if isinstance(bias, torch.Tensor) else None
            o, lse = _one(qf[b], kf[b], vf[b], scale, causal, t)
            outs.append(o)
            lses.append(lse)
        out, lse = torch.stack(outs), torch.stack(lses)  # lse (B, H, M)
        if fw is CutlassFw:  # cutlass pads the query axis of the lse to a multiple of 32
            pad = (-lse.shape[-1]) % 32
            lse = torch.cat([lse, lse.new_full((*lse.shape[:-1], pad), 123.0)], -1)
    if p > 0:
        out = torch.nn.functional.dropout(out, p)
    if q.dim() == 5:
        out = out.reshape(*q.shape[:-1], out.shape[-1])
        lse = lse.unflatten(1, q.shape[2:4])
    return out.to(q.dtype), lse.float()


def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None,
                               output_dtype=None) -> Tensor:
    fw = op[0] if isinstance(op, tuple) else op
    CALLS.append(dict(fn="mea", q=query, k=key, v=value, bias=attn_bias, p=p, scale=scale, op=op))
    return _fake_mea(query, key, value, attn_bias, p, scale, fw)[0]


def memory_efficient_attention_forward_requires_grad(query, key, value, attn_bias=None, p=0.0,
                                                     scale=None, *, op=None,
                                                     output_dtype=None) -> tuple[Tensor, Tensor]:
    if p != 0.0:
        raise NotImplementedError("dropout is not supported on the non-autograd API.")
    CALLS.append(dict(fn="mea_lse", q=query, k=key, v=value, bias=attn_bias, p=p, scale=scale,
                      op=op))
    out, lse = _fake_mea(query, key, value, attn_bias, p, scale, op)
    return out.detach(), lse.detach()


def fake_modules() -> dict[str, types.ModuleType]:
    """xformers, xformers.ops, .fmha, .fmha.attn_bias, .fmha.flash, .fmha.cutlass."""
    mods = {n: types.ModuleType(n) for n in (
        "xformers", "xformers.ops", "xformers.ops.fmha", "xformers.ops.fmha.attn_bias",
        "xformers.ops.fmha.flash", "xformers.ops.fmha.cutlass")}
    mods["xformers"].__version__ = "0.0.35"
    mods["xformers"].ops = mods["xformers.ops"]
    ops = mods["xformers.ops"]
    ops.memory_efficient_attention = memory_efficient_attention
    ops.memory_efficient_attention_forward_requires_grad = \
        memory_efficient_attention_forward_requires_grad
    ops.fmha = fmha = mods["xformers.ops.fmha"]
    fmha.attn_bias = bias = mods["xformers.ops.fmha.attn_bias"]
    bias.LowerTriangularFromBottomRightMask = LowerTriangularFromBottomRightMask
    bias.BlockDiagonalPaddedKeysMask = BlockDiagonalPaddedKeysMask
    fmha.flash, fmha.cutlass = mods["xformers.ops.fmha.flash"], mods["xformers.ops.fmha.cutlass"]
    fmha.flash.FwOp, fmha.flash.BwOp = FlashFw, FlashBw
    fmha.cutlass.FwOp, fmha.cutlass.BwOp = CutlassFw, CutlassBw
    return mods


# ----------------------------------------------------------------- fixtures and helpers


def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in ("xformers", "flash_attn"):
            monkeypatch.delitem(sys.modules, name)


@pytest.fixture
def xf_env(monkeypatch: pytest.MonkeyPatch) -> Callable[..., XformersBackend]:
    """``install(fake=True, cc=(9, 0), broken=(), hide_real=True)``: the fake xformers
    in sys.modules (or, without it, any real one hidden unless ``hide_real`` is
    False), the CPU treated as a CUDA device; returns the (reset) backend."""
    backend = ad.get_backend("xformers")
    _clean(monkeypatch)
    before = set(sys.modules)

    def install(fake: bool = True, cc: Optional[tuple[int, int]] = (9, 0),
                broken: tuple[str, ...] = (), hide_real: bool = True) -> XformersBackend:
        if fake:
            for name, mod in fake_modules().items():
                monkeypatch.setitem(sys.modules, name, mod)
        elif hide_real:  # a real installation looks absent
            monkeypatch.setitem(sys.modules, "xformers", None)
        if cc is not None:
            monkeypatch.setattr(xf, "cuda_capability", lambda device: cc)
            caps = dataclasses.replace(XformersBackend.capabilities,
                                       device_types=frozenset({"cpu", "cuda"}))
            monkeypatch.setattr(XformersBackend, "capabilities", caps)
        BROKEN.clear()
        BROKEN.update(broken)
        CALLS.clear()
        backend.forget()
        ad.clear_cache()
        return backend  # type: ignore[return-value]

    yield install
    for name in set(sys.modules) - before:  # modules a test imported from disk
        if name.split(".")[0] in ("xformers", "flash_attn"):
            del sys.modules[name]
    BROKEN.clear()
    backend.forget()
    ad.clear_cache()


def op_names(call: dict) -> tuple[str, ...]:
    op = call["op"]
    return tuple(getattr(o, "NAME", "-") for o in (op if isinstance(op, tuple) else (op,)))


# ----------------------------------------------------------------- tests: probe and import


def test_probe_without_xformers(xf_env: Callable) -> None:
    backend = xf_env(fake=False, cc=None)
    assert backend.probe(torch.device("cpu")) == [
        "device cpu; allowed: cuda",
        "xformers not installed: pip install 'attention-dispatch[xformers]'"]
    backend = xf_env(fake=False, cc=(9, 0))
    (reason,) = backend.probe(torch.device("cpu"))
    assert reason == xf.INSTALL_HINT
    assert backend.describe() == "xformers (not installed)"


def test_probe_runs_every_op_family(xf_env: Callable) -> None:
    backend = xf_env()
    assert backend.probe(torch.device("cpu")) == []
    text = backend.describe()
    assert text.startswith("xformers 0.0.35 (")
    assert "flash fa2F@fake-pt/fa2B@fake-pt: fwd+bwd" in text and "cutlass cutlassF-pt" in text
    tested = {(c["fn"], op_names(c)[0], type(c["bias"]).__name__) for c in CALLS}
    assert ("mea", "fa2F@fake-pt", "NoneType") in tested
    assert ("mea", "fa2F@fake-pt", "BlockDiagonalPaddedKeysMask") in tested
    assert ("mea_lse", "cutlassF-pt", "NoneType") in tested


def test_probe_records_broken_op_family(xf_env: Callable) -> None:
    backend = xf_env(broken=("fa2F@fake-pt",))
    assert backend.probe(torch.device("cpu")) == []  # cutlass still works
    q, k, v = make_qkv()
    reasons = ad.explain(q, k, v, layout="bshd", backend="xformers").reasons("xformers")
    assert reasons == ()
    ad.attention(q, k, v, layout="bshd", backend="xformers")
    assert op_names(CALLS[-1]) == ("cutlassF-pt", "cutlassB-pt")
    assert "flash fa2F@fake-pt/fa2B@fake-pt: unusable" in backend.describe()
    backend = xf_env(broken=("fa2F@fake-pt", "cutlassF-pt"))
    reasons = backend.probe(torch.device("cpu"))
    assert len(reasons) == 2
    assert reasons[0].startswith("flash (fa2F@fake-pt/fa2B@fake-pt): self-test failed: "
                                 "RuntimeError: No such operator for fa2F@fake-pt")
    assert reasons[1].startswith("cutlass (cutlassF-pt/cutlassB-pt): self-test failed")


# ----------------------------------------------------------------- tests: translation


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_flash_causal_bottom_right_views_scale(xf_env: Callable, layout: str) -> None:
    xf_env()
    q, k, v = make_qkv(sq=6, sk=10, layout=layout)
    out = ad.attention(q, k, v, causal=True, scale=0.3, layout=layout, backend="xformers")
    call = CALLS[-1]
    assert call["fn"] == "mea" and op_names(call) == ("fa2F@fake-pt", "fa2B@fake-pt")
    assert isinstance(call["bias"], LowerTriangularFromBottomRightMask)
    assert call["scale"] == 0.3 and call["p"] == 0.0
    for got, t in zip((call["q"], call["k"], call["v"]), (q, k, v)):  # (B, M, H, K) views
        assert got.data_ptr() == t.data_ptr() and got.shape == (t.shape if layout == "bshd"
                                                                else t.transpose(1, 2).shape)
    assert_close(bhsd(out, layout), reference(q, k, v, layout, causal=True, scale=0.3)[0])


def test_decode_causal_needs_no_bias(xf_env: Callable) -> None:
    xf_env()
    q, k, v = make_qkv(sq=1, sk=9)
    ad.attention(q, k, v, causal=True, layout="bshd", backend="xformers")
    assert CALLS[-1]["bias"] is None


def test_gqa_forward_uses_5d_stride0_views(xf_env: Callable) -> None:
    xf_env()
    q, k, v = make_qkv(hq=6, hkv=2, sq=5, sk=7)
    out = ad.attention(q, k, v, causal=True, layout="bshd", backend="xformers")
    call = CALLS[-1]
    assert call["q"].shape == (2, 5, 2, 3, 16) and call["q"].data_ptr() == q.data_ptr()
    assert call["k"].shape == (2, 7, 2, 3, 16) and call["k"].stride(3) == 0
    assert call["k"].data_ptr() == k.data_ptr()
    assert_close(out.transpose(1, 2), reference(q, k, v, "bshd", causal=True)[0])


def test_gqa_with_gradients_repeats_kv(xf_env: Callable) -> None:
    xf_env()
    q, k, v = make_qkv(hq=6, hkv=2, sq=5, sk=7, grad=True, layout="bhsd")
    out = ad.attention(q, k, v, causal=True, backend="xformers")
    assert CALLS[-1]["k"].shape == (2, 7, 6, 16)  # 4-D: the flash BwOp takes no 5-D
    out.float().square().sum().backward()
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref, _ = testing.reference_attention(*leaves, causal=True)
    ref.square().sum().backward()
    assert_close(out, ref)
    for got, want in zip((q, k, v), leaves):
        assert_close(got.grad, want.grad, tol=5e-3)


@pytest.mark.parametrize("lengths_or_mask", [[10, 4], [[0, 1, 1, 0, 1, 0, 0, 1, 1, 1],
                                                       [1, 1, 1, 1, 1, 1, 1, 1, 1, 0]]])
def test_key_padding_forward_block_diagonal_padded_keys(xf_env: Callable,
                                                        lengths_or_mask: list) -> None:
    xf_env()
    q, k, v = make_qkv(hq=4, hkv=2, sq=6, sk=10)
    kpm = (padding_mask(lengths_or_mask, 10) if isinstance(lengths_or_mask[0], int)
           else torch.tensor(lengths_or_mask, dtype=torch.bool))
    out, lse = ad.attention(q, k, v, key_padding_mask=kpm, layout="bshd", backend="xformers",
                            return_lse=True)
    call = CALLS[-1]
    assert call["fn"] == "mea_lse" and op_names(call) == ("fa2F@fake-pt",)
    bias = call["bias"]
    assert isinstance(bias, BlockDiagonalPaddedKeysMask)
    # right padding: K/V as given (Sk slots); scattered: the real keys gathered
    # to the front of max(lengths) slots (no copy of the all-padding tail)
    scattered = not isinstance(lengths_or_mask[0], int)
    assert bias.q_seqlen == [6, 6]
    assert bias.kv_padding == (int(kpm.sum(-1).max()) if scattered else 10)
    assert bias.kv_seqlen == kpm.sum(-1).tolist()
    assert call["q"].shape == (1, 12, 2, 2, 16)  # (1, B*Sq, G, H, K)
    ref, ref_lse = reference(q, k, v, "bshd", key_padding_mask=kpm)
    assert_close(out.transpose(1, 2), ref)
    assert_close(lse, ref_lse)


def test_key_padding_with_gradients_uses_cutlass_tensor_bias(xf_env: Callable) -> None:
    xf_env()
    q, k, v = make_qkv(hq=4, hkv=2, sq=5, sk=9, grad=True, layout="bhsd")
    kpm = padding_mask([9, 3], 9)
    out = ad.attention(q, k, v, key_padding_mask=kpm, backend="xformers")
    call = CALLS[-1]
    assert op_names(call) == ("cutlassF-pt", "cutlassB-pt")
    bias = call["bias"]
    assert bias.shape == (2, 4, 5, 9) and bias.stride(-2) % 8 == 0 and bias.stride(-1) == 1
    out.float().sum().backward()
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref, _ = testing.reference_attention(*leaves, key_padding_mask=kpm)
    ref.sum().backward()
    assert_close(out, ref)
    for got, want in zip((q, k, v), leaves):
        assert_close(got.grad, want.grad, tol=5e-3)
    assert torch.all(k.grad.transpose(1, 2)[~kpm] == 0)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks_become_an_aligned_cutlass_bias_with_causal(xf_env: Callable, kind: str) -> None:
    xf_env()
    q, k, v = make_qkv(sq=7, sk=11, layout="bhsd")
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(2, 1, 7, 11, generator=g) > 0.3 if kind == "bool"
            else torch.randn(2, 4, 7, 11, generator=g).half())
    out = ad.attention(q, k, v, mask=mask, causal=True, backend="xformers")
    call = CALLS[-1]
    assert op_names(call)[0] == "cutlassF-pt" and isinstance(call["bias"], torch.Tensor)
    assert call["bias"].stride(-2) == 16  # Sk = 11 padded to a multiple of 8
    assert_close(out, reference(q, k, v, "bhsd", mask=mask, causal=True)[0])


def test_dropout_is_passed_as_p(xf_env: Callable) -> None:
    xf_env()
    q, k, v = make_qkv()
    ad.attention(q, k, v, dropout_p=0.25, layout="bshd", backend="xformers")
    assert CALLS[-1]["p"] == 0.25 and op_names(CALLS[-1])[0] == "fa2F@fake-pt"


@pytest.mark.parametrize("dtype, hkv, family", [(torch.float16, 4, "fa2F@fake-pt"),
                                                (torch.float16, 2, "fa2F@fake-pt"),
                                                (torch.float32, 2, "cutlassF-pt")])
def test_lse_layouts(xf_env: Callable, dtype: torch.dtype, hkv: int, family: str) -> None:
    xf_env()
    q, k, v = make_qkv(hq=4, hkv=hkv, sq=7, sk=5, dtype=dtype)
    out, lse = ad.attention(q, k, v, causal=True, layout="bshd", backend="xformers",
                            return_lse=True)
    assert CALLS[-1]["fn"] == "mea_lse" and op_names(CALLS[-1]) == (family,)
    assert lse.shape == (2, 4, 7) and lse.dtype == torch.float32
    ref, ref_lse = reference(q, k, v, "bshd", causal=True)
    assert_close(lse, ref_lse)
    assert_close(out.transpose(1, 2), ref)


# ----------------------------------------------------------------- tests: refusals


def _reasons(**kw: Any) -> tuple[str, ...]:
    shape = kw.pop("shape", {})
    q, k, v = make_qkv(**shape)
    return ad.explain(q, k, v, layout="bshd", backend="xformers", **kw).reasons("xformers")


@pytest.mark.parametrize("broken, kw, expect", [
    ((), dict(shape=dict(grad=True), return_lse=True),
     "return_lse=True with gradients; xformers returns the LSE only from"),
    ((), dict(dropout_p=0.1, return_lse=True), "return_lse=True with dropout_p > 0"),
    (("cutlassF-pt",), dict(shape=dict(dtype=torch.float32)),
     "flash (fa2F@fake-pt/fa2B@fake-pt): dtype float32; allowed: bfloat16/float16"),
    (("cutlassF-pt",), dict(shape=dict(dv=32)), "allowed: D == Dv <= 256"),
    (("cutlassF-pt",), dict(mask=torch.ones(6, 10, dtype=torch.bool)),
     "mask kind bool; the flash op takes no tensor attn_bias"),
    (("cutlassF-pt",), dict(causal=True, key_padding_mask=padding_mask([10, 3], 10)),
     "causal=True with key_padding_mask and Sq > 1"),
    (("cutlassF-pt",), dict(shape=dict(grad=True), key_padding_mask=padding_mask([10, 3], 10)),
     "key_padding_mask with gradients; the flash BwOp does not take BlockDiagonalPaddedKeysMask"),
    (("cutlassF-pt",), {}, None),
])
def test_refusal_reasons(xf_env: Callable, broken: tuple, kw: dict, expect: Optional[str]) -> None:
    xf_env(broken=broken)
    reasons = _reasons(**kw)
    if expect is None:
        assert reasons == ()
    else:
        assert any(expect in r for r in reasons), reasons


@pytest.mark.parametrize("dtypes", [(torch.float16,), (torch.float32,)])
def test_conformance_cases_through_fake(xf_env: Callable, dtypes: tuple) -> None:
    """Every default case the adapter accepts meets the contract's accuracy rule."""
    xf_env()
    passed = refused = 0
    for case in testing.default_cases(dtypes=dtypes, head_dims=(32,)):
        try:
            testing.check_backend("xformers", case, device="cpu")
            passed += 1
        except ad.BackendUnavailable:
            refused += 1
    assert passed >= 30, (passed, refused)


# ----------------------------------------------------------------- the flash-attn-4 import conflict

_IMPL = "import sys\n_impl = sys.modules['_fake_xformers_impl']\n"
_TREE = {
    # flash-attn-4: a namespace package 'flash_attn' holding only 'cute'
    "flash_attn/cute/__init__.py": "def flash_attn_func(*a, **k):\n    raise RuntimeError\n",
    "xformers/__init__.py": "__version__ = '0.0.35'\n",
    "xformers/ops/__init__.py": "from . import fmha\n" + _IMPL
    + "memory_efficient_attention = _impl.memory_efficient_attention\n"
    + "memory_efficient_attention_forward_requires_grad = "
    + "_impl.memory_efficient_attention_forward_requires_grad\n",
    "xformers/ops/fmha/__init__.py": "from . import flash, attn_bias, cutlass\n",
    # what xformers 0.0.35's ops/fmha/flash.py does at import time:
    "xformers/ops/fmha/flash.py": "import importlib.util\n"
    + "if importlib.util.find_spec('flash_attn'):\n"
    + "    import flash_attn\n    import flash_attn.flash_attn_interface\n"
    + _IMPL + "FwOp, BwOp = _impl.FlashFw, _impl.FlashBw\n",
    "xformers/ops/fmha/cutlass.py": _IMPL + "FwOp, BwOp = _impl.CutlassFw, _impl.CutlassBw\n",
    "xformers/ops/fmha/attn_bias.py": _IMPL
    + "LowerTriangularFromBottomRightMask = _impl.LowerTriangularFromBottomRightMask\n"
    + "BlockDiagonalPaddedKeysMask = _impl.BlockDiagonalPaddedKeysMask\n",
}


@pytest.fixture
def conflict_tree(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """flash-attn-4 and xformers 0.0.35 (as fakes on disk) importable together."""
    for rel, text in _TREE.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setitem(sys.modules, "_fake_xformers_impl", sys.modules[__name__])
    monkeypatch.syspath_prepend(str(tmp_path))


def test_import_conflict_is_reported(xf_env: Callable, conflict_tree: None,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xf, "HIDE_FLASH_ATTN_4", False)
    backend = xf_env(fake=False, hide_real=False)
    (reason,) = backend.probe(torch.device("cpu"))
    assert reason.startswith("import xformers.ops failed: ModuleNotFoundError: "
                             "No module named 'flash_attn.flash_attn_interface'")
    assert "flash-attn-4 provides only flash_attn.cute" in reason
    q, k, v = make_qkv()
    assert ad.attention(q, k, v, layout="bshd").shape == q.shape  # dispatch goes on
    assert reason in backend.describe()


def test_import_conflict_worked_around_by_hiding_flash_attn(xf_env: Callable,
                                                            conflict_tree: None) -> None:
    backend = xf_env(fake=False, hide_real=False)
    assert backend.probe(torch.device("cpu")) == []
    assert "imported with flash_attn hidden" in backend.describe()
    assert importlib.import_module("flash_attn.cute").flash_attn_func  # restored afterwards
    q, k, v = make_qkv()
    out = ad.attention(q, k, v, causal=True, layout="bshd", backend="xformers")
    assert_close(out.transpose(1, 2), reference(q, k, v, "bshd", causal=True)[0])
