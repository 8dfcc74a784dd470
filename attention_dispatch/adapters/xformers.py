"""``xformers``: ``xformers.ops.memory_efficient_attention`` behind the contract.

Two op families of ``xformers.ops.fmha``, each used only after a tiny self-test
on the device passed (xformers may import while its kernels do not run):

* ``flash`` (``fmha.flash.FwOp/BwOp``: FA2 from flash-attn or torch): float16/
  bfloat16, sm80+, D == Dv <= 256, no tensor bias.  Causal is
  ``LowerTriangularFromBottomRightMask``; key padding (forward only) is
  ``BlockDiagonalPaddedKeysMask`` over (1, B*S, H, D) views; GQA is the 5-D
  (B, M, G, H, K) form with K/V expanded by stride 0 (with gradients K/V are
  repeated instead: the flash BwOp takes no 5-D input).
* ``cutlass`` (``fmha.cutlass.FwOp/BwOp``, torch's memory-efficient kernel):
  float16/bfloat16/float32; masks, key padding (and causal, when combined with
  them) as one additive tensor bias on rows padded to 8 elements, then sliced;
  causal alone is ``LowerTriangularFromBottomRightMask``; GQA by repeating K/V.

Dropout is ``p``.  The LSE comes from ``memory_efficient_attention_forward_requires_grad``
(no autograd, no dropout), so LSE with gradients or dropout is refused.

Known conflict: xformers <= 0.0.35's ops/fmha/flash.py imports
``flash_attn.flash_attn_interface`` whenever a ``flash_attn`` package exists;
flash-attn-4 ships only ``flash_attn.cute``, so ``import xformers.ops`` raises
ModuleNotFoundError.  xformers reads no setting to skip that import, so for that
exact layout the import is retried once with ``flash_attn`` hidden
(``sys.modules["flash_attn"] = None`` during the import only; nothing on disk
changes) and xformers uses torch's flash kernel, as without flash-attn.
``HIDE_FLASH_ATTN_4 = False`` reports the error instead.

Equivalent math: see :mod:`attention_dispatch.adapters.math`.
"""

from __future__ import annotations

import importlib
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .._core.backend import AttentionResult, Backend
from .._core.capabilities import Capabilities, dtype_name
from .._core.layout import CUDA_ALIGNED, Buffer
from .._core.masks import expand_kv
from .._core.spec import CallSpec
from ._flash_api import cuda_capability, fa4_without_fa2, import_hiding_flash_attn, module_present
from . import _estimates as est
from ._torch_common import aligned_bias, torch_bias
from .._core.packing import (CAUSAL_PADDING_REASON, causal_differs_with_padding, lse_to_bhs,
    prefix_kv)

Tensor = torch.Tensor
HALF = frozenset({torch.float16, torch.bfloat16})
INSTALL_HINT = "xformers not installed: pip install 'attention-dispatch[xformers]'"
HIDE_FLASH_ATTN_4 = True
CONFLICT = ("xformers' ops/fmha/flash.py imports flash_attn.flash_attn_interface (FA2) whenever "
            "a 'flash_attn' package is importable, and flash-attn-4 provides only "
            "flash_attn.cute. Fix: install flash-attn 2 (2.7.1-2.8.4) beside it, uninstall "
            "flash-attn-4, or use the flash-attn backend")


@dataclass
class _Loaded:
    """Result of importing xformers.ops (once per process)."""

    ops: Any = None    # xformers.ops
    fmha: Any = None   # xformers.ops.fmha
    bias: Any = None   # xformers.ops.fmha.attn_bias
    error: Optional[str] = None
    notes: list[str] = field(default_factory=list)


_lock = threading.RLock()
_loaded: Optional[_Loaded] = None


def forget() -> None:
    """Forget the import result (tests)."""
    global _loaded
    with _lock:
        _loaded = None


def installed() -> bool:
    """Whether an ``xformers`` package is importable (nothing is imported)."""
    return module_present("xformers")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _import() -> _Loaded:
    try:
        return _Loaded(ops=importlib.import_module("xformers.ops"))
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("flash_attn"):
            return _Loaded(error=f"import xformers.ops failed: {_first_line(exc)}")
        why = f"import xformers.ops failed: ModuleNotFoundError: {exc}. {CONFLICT}"
        if not (HIDE_FLASH_ATTN_4 and fa4_without_fa2()):
            return _Loaded(error=why)
        try:
            return _Loaded(ops=import_hiding_flash_attn("xformers.ops"), notes=[
                "imported with flash_attn hidden (flash-attn-4 has no flash_attn_interface); "
                "xformers uses torch's flash kernel"])
        except Exception as exc2:
            return _Loaded(error=f"{why}; retry with flash_attn hidden failed: {_first_line(exc2)}")
    except Exception as exc:  # a broken optional package must not break dispatch
        return _Loaded(error=f"import xformers.ops failed: {_first_line(exc)}")


def load() -> _Loaded:
    """Import xformers.ops, fmha and attn_bias once; never raises."""
    global _loaded
    with _lock:
        if _loaded is None:
            res = _import()
            if res.ops is not None:
                try:
                    res.fmha = importlib.import_module("xformers.ops.fmha")
                    res.bias = importlib.import_module("xformers.ops.fmha.attn_bias")
                except Exception as exc:
                    res = _Loaded(error=f"import xformers.ops.fmha failed: {_first_line(exc)}")
            cpp = getattr(sys.modules.get("xformers._cpp_lib"), "_cpp_library_load_exception", None)
            if cpp is not None:
                res.notes.append(f"C++ extension not loaded ({_first_line(cpp)})")
            _loaded = res
        return _loaded


@dataclass(frozen=True)
class _Family:
    """An xformers op family and what it can express."""

    key: str               # attribute of xformers.ops.fmha
    dtypes: frozenset
    tensor_bias: bool      # takes masks / key padding as a tensor attn_bias


FLASH = _Family("flash", HALF, tensor_bias=False)
CUTLASS = _Family("cutlass", HALF | {torch.float32}, tensor_bias=True)
FAMILIES = (FLASH, CUTLASS)


@dataclass
class _FamilyState:
    """Self-test results of one family on one device: None = works, else why not."""

    fw: Any = None
    bw: Any = None
    name: str = ""
    fwd: Optional[str] = None
    bwd: Optional[str] = None
    lse: Optional[str] = None
    padded: Optional[str] = None


def _attempt(fn: Callable[[], None]) -> Optional[str]:
    try:
        fn()
        return None
    except Exception as exc:  # the self-test must never raise
        return _first_line(exc)


def _reference(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Float32 (out, lse) for bshd q, k, v of equal heads (the self-test's reference)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.float()), s.logsumexp(-1)


def _close(got: Tensor, want: Tensor, what: str) -> None:
    err = (got.float() - want.float()).abs().max().item()
    if not err <= 2e-2 * (1.0 + want.abs().max().item()):
        raise RuntimeError(f"{what}: wrong values (max error {err:.3g})")


def _self_test(ld: _Loaded, fam: _Family, device: torch.device) -> _FamilyState:
    mod = getattr(ld.fmha, fam.key, None)
    st = _FamilyState(getattr(mod, "FwOp", None), getattr(mod, "BwOp", None))
    if st.fw is None:
        st.fwd = f"xformers.ops.fmha.{fam.key}.FwOp not found"
        return st
    st.name = f"{getattr(st.fw, 'NAME', '?')}/{getattr(st.bw, 'NAME', '-')}"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2, 64, generator=g).to(device, torch.float16) for _ in range(3))
    ref, ref_lse = _reference(q, k, v)
    mea = ld.ops.memory_efficient_attention
    st.fwd = _attempt(lambda: _close(mea(q, k, v, op=(st.fw, st.bw)), ref, "forward"))
    if st.fwd:
        return st
    st.bwd = "no BwOp" if st.bw is None else _attempt(lambda: _test_backward(mea, st, q, k, v))
    st.lse = _attempt(lambda: _close(ld.ops.memory_efficient_attention_forward_requires_grad(
        q, k, v, op=st.fw)[1][..., :16], ref_lse, "lse"))
    if not fam.tensor_bias:
        st.padded = _attempt(lambda: _test_padded(ld, st, q, k, v))
    return st


def _test_backward(mea: Callable, st: _FamilyState, q: Tensor, k: Tensor, v: Tensor) -> None:
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    mea(*leaves, op=(st.fw, st.bw)).float().sum().backward()
    refs = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    _reference(*refs)[0].sum().backward()
    for name, a, b in zip("qkv", leaves, refs):
        _close(a.grad, b.grad, f"d{name}")  # type: ignore[arg-type]


def _test_padded(ld: _Loaded, st: _FamilyState, q: Tensor, k: Tensor, v: Tensor) -> None:
    bias = ld.bias.BlockDiagonalPaddedKeysMask.from_seqlens(
        q_seqlen=[16], kv_padding=16, kv_seqlen=[10], device=q.device)
    out = ld.ops.memory_efficient_attention(q, k, v, attn_bias=bias, op=(st.fw, None))
    _close(out, _reference(q, k[:, :10], v[:, :10])[0], "BlockDiagonalPaddedKeysMask forward")


def _flash_reasons(st: _FamilyState, spec: CallSpec, cc: tuple[int, int]) -> list[str]:
    out = []
    if cc < (8, 0):
        out.append(f"compute capability sm{cc[0]}{cc[1]}; allowed: >= sm80")
    if spec.head_dim != spec.head_dim_v or spec.head_dim > 256:
        out.append(f"head dims (D={spec.head_dim}, Dv={spec.head_dim_v}); allowed: D == Dv <= 256")
    if spec.mask_kind != "none":
        out.append(f"mask kind {spec.mask_kind}; the flash op takes no tensor attn_bias")
    if spec.key_padding and spec.requires_grad:
        out.append("key_padding_mask with gradients; the flash BwOp does not take "
                   "BlockDiagonalPaddedKeysMask")
    if spec.key_padding and st.padded:
        out.append(f"key_padding_mask; BlockDiagonalPaddedKeysMask self-test failed: {st.padded}")
    if causal_differs_with_padding(spec.causal, spec.seq_q, spec.key_padding):
        out.append(CAUSAL_PADDING_REASON)
    return out


def _family_reasons(fam: _Family, st: _FamilyState, spec: CallSpec,
                    cc: tuple[int, int]) -> list[str]:
    if st.fwd:
        return [f"self-test failed: {st.fwd}"]
    out = [] if spec.dtype in fam.dtypes else [
        f"dtype {dtype_name(spec.dtype)}; allowed: "
        + "/".join(sorted(dtype_name(d) for d in fam.dtypes))]
    if fam is FLASH:
        out += _flash_reasons(st, spec, cc)
    elif spec.dtype == torch.bfloat16 and cc < (8, 0):
        out.append(f"bfloat16 on sm{cc[0]}{cc[1]}; allowed: >= sm80")
    if spec.requires_grad and st.bwd:
        out.append(f"gradients; backward self-test failed: {st.bwd}")
    if spec.return_lse and spec.requires_grad:
        out.append("return_lse=True with gradients; xformers returns the LSE only from "
                   "memory_efficient_attention_forward_requires_grad, whose output has no "
                   "autograd")
    if spec.return_lse and spec.dropout:
        out.append("return_lse=True with dropout_p > 0; memory_efficient_attention_forward_"
                   "requires_grad takes no dropout")
    if spec.return_lse and st.lse:
        out.append(f"return_lse=True; LSE self-test failed: {st.lse}")
    return out


def _call(ld: _Loaded, st: _FamilyState, q: Tensor, k: Tensor, v: Tensor, bias: Any,
          dropout_p: float, scale: float, need_lse: bool) -> tuple[Tensor, Optional[Tensor]]:
    """One xformers call on (B, M, H, K) or (B, M, G, H, K) tensors -> (out, lse or None)."""
    if need_lse:
        out, lse = ld.ops.memory_efficient_attention_forward_requires_grad(
            q, k, v, attn_bias=bias, p=0.0, scale=scale, op=st.fw)
        return out, lse
    out = ld.ops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p,
                                            scale=scale, op=(st.fw, st.bw))
    return out, None


def _gqa_views(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """bshd q (.., Hq, D), k/v (.., Hkv, D) -> xformers' 5-D GQA form, no copies:
    q (.., Hkv, G, D) and k/v expanded by stride 0 to (.., Hkv, G, D)."""
    groups = q.shape[2] // k.shape[2]
    q5 = q.unflatten(2, (k.shape[2], groups))
    k5, v5 = (t.unsqueeze(3).expand(*t.shape[:3], groups, t.shape[-1]) for t in (k, v))
    return q5, k5, v5


def _run_flash(ld: _Loaded, st: _FamilyState, q: Tensor, k: Tensor, v: Tensor,
               spec: CallSpec, kpm: Optional[Tensor], dropout_p: float, scale: float
               ) -> tuple[Tensor, Optional[Tensor]]:
    """The flash family on bhsd views -> (out (B, Sq, Hq, Dv) bshd, raw lse)."""
    b, sq = spec.batch, spec.seq_q
    if spec.gqa and spec.requires_grad:  # the flash BwOp takes no 5-D GQA
        k, v = expand_kv(k, spec.heads_q), expand_kv(v, spec.heads_q)
    qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    bias: Any = None
    if kpm is not None:
        ks, vs, lengths = prefix_kv(ks, vs, kpm)
        bias = ld.bias.BlockDiagonalPaddedKeysMask.from_seqlens(
            q_seqlen=[sq] * b, kv_padding=ks.shape[1], kv_seqlen=lengths.tolist(),
            device=q.device)
        qs, ks, vs = (t.reshape(1, t.shape[0] * t.shape[1], *t.shape[2:]) for t in (qs, ks, vs))
    elif spec.causal and sq > 1:
        bias = ld.bias.LowerTriangularFromBottomRightMask()
    if qs.shape[2] != ks.shape[2]:
        qs, ks, vs = _gqa_views(qs, ks, vs)
    out, lse = _call(ld, st, qs, ks, vs, bias, dropout_p, scale, spec.return_lse)
    return out.reshape(b, sq, spec.heads_q, spec.head_dim_v), lse


def _run_cutlass(ld: _Loaded, st: _FamilyState, q: Tensor, k: Tensor, v: Tensor,
                 spec: CallSpec, mask: Optional[Tensor], kpm: Optional[Tensor],
                 dropout_p: float, scale: float) -> tuple[Tensor, Optional[Tensor]]:
    """The cutlass family: masks as one aligned tensor bias -> (out bshd, raw lse)."""
    k, v = expand_kv(k, spec.heads_q), expand_kv(v, spec.heads_q)
    causal = spec.causal and spec.seq_q > 1
    bias: Any = None
    if mask is not None or kpm is not None:
        bias = aligned_bias(torch_bias(spec, mask, kpm, q.dtype, causal), spec, 8)
    elif causal:
        bias = ld.bias.LowerTriangularFromBottomRightMask()
    return _call(ld, st, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias,
                 dropout_p, scale, spec.return_lse)


@dataclass
class _DeviceState:
    cc: tuple[int, int]
    families: dict[str, _FamilyState] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)


def _device_state(device: torch.device, cc: tuple[int, int]) -> _DeviceState:
    ld = load()
    state = _DeviceState(cc)
    if ld.error:
        state.reasons.append(ld.error)
        return state
    for fam in FAMILIES:
        st = _self_test(ld, fam, device)
        state.families[fam.key] = st
    if all(st.fwd for st in state.families.values()):
        state.reasons.extend(f"{k} ({st.name or 'op'}): self-test failed: {st.fwd}"
                             for k, st in state.families.items())
    return state


class XformersBackend(Backend):
    """xformers' memory-efficient attention (see the module docstring)."""

    package = "xformers"
    capabilities = Capabilities(
        device_types=frozenset({"cuda"}),
        strides=CUDA_ALIGNED,
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        max_head_dim=512,
        head_dim_multiple=8,
        min_compute_capability=(5, 0),
        native_layout="bshd",
        # forward: no atomics.  Backward: the flash BwOp (FA2) is called without
        # its deterministic flag and the cutlass BwOp (torch's memory-efficient
        # backward) accumulates with atomics
        deterministic_forward=True,
        deterministic_backward=False,
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[torch.device, _DeviceState] = {}
        self._choices: dict[CallSpec, tuple[Optional[_Family], list[str]]] = {}

    def forget(self) -> None:
        """Drop the import result, the per-device self-tests and per-call choices."""
        forget()
        with self._lock:
            self._states.clear()
            self._choices.clear()

    def _state(self, device: torch.device) -> Optional[_DeviceState]:
        cc = cuda_capability(device)
        if cc is None:
            return None
        with self._lock:
            st = self._states.get(device)
        if st is None:
            st = _device_state(device, cc)
            with self._lock:
                self._states[device] = st
        return st

    def probe(self, device: torch.device) -> list[str]:
        """[] when some op family passed its self-test on ``device``; else why not."""
        st = self._state(device)
        if st is None:
            why = [f"device {device.type}; allowed: cuda" if device.type != "cuda"
                   else "CUDA is not available in this torch build or machine"]
            return why if installed() else why + [INSTALL_HINT]
        if not installed() and not st.families:
            return [INSTALL_HINT]
        return list(st.reasons)

    def nondeterminism_note(self, spec: CallSpec, backward: bool) -> str:
        return "(xformers' flash and cutlass backward ops accumulate gradients with atomics)"

    def buffers(self, spec: CallSpec) -> tuple[Buffer, ...]:
        """Masks/key padding as one bias copied onto 8-aligned rows (cutlass),
        K/V expanded for GQA (cutlass; flash with gradients), K/V gathered for
        key padding (flash) - the family is not known here: the larger one."""
        cutlass = est.listed(est.bias(spec, spec.causal and spec.seq_q > 1, copies=2)
                             if spec.mask_kind != "none" or spec.key_padding else None,
                             *est.gqa_expansion(spec))
        flash = est.listed(*(est.gqa_expansion(spec) if spec.requires_grad else []),
                           est.kv_copy(spec, spec.heads_kv, "K/V gathered for key padding "
                                       "(at most)") if spec.key_padding else None)
        size = lambda bs: sum(b.nbytes for b in bs)  # noqa: E731
        return cutlass if size(cutlass) >= size(flash) else flash

    def _choose(self, spec: CallSpec) -> tuple[Optional[_Family], list[str]]:
        hit = self._choices.get(spec)
        if hit is None:
            hit = self._choose_uncached(spec)
            with self._lock:
                if len(self._choices) >= 4096:
                    self._choices.clear()
                self._choices[spec] = hit
        return hit

    def _choose_uncached(self, spec: CallSpec) -> tuple[Optional[_Family], list[str]]:
        st = self._state(spec.device)
        if st is None or st.reasons:
            return None, self.probe(spec.device)
        why: list[str] = []
        for fam in FAMILIES:
            fs = st.families[fam.key]
            r = _family_reasons(fam, fs, spec, st.cc)
            if not r:
                return fam, []
            why.extend(f"{fam.key} ({fs.name or 'op'}): {x}" for x in r)
        return None, why

    def check(self, spec: CallSpec) -> list[str]:
        """Reasons neither op family takes ``spec`` (prefixed with the family)."""
        return list(self._choose(spec)[1])

    def describe(self) -> str:
        """E.g. "xformers 0.0.35 (flash fa2F@2.8.3-pt/fa2B@2.8.3-pt: fwd+bwd; cutlass ...)"."""
        ver = (self.version() or getattr(sys.modules.get("xformers"), "__version__", None)
               or "version unknown")
        if not installed():
            return "xformers (not installed)"
        ld, parts = load(), []
        for st in list(self._states.values())[:1]:
            for key, fs in st.families.items():
                ok = "unusable" if fs.fwd else "fwd" + ("" if fs.bwd else "+bwd")
                parts.append(f"{key} {fs.name}: {ok}")
        extra = "; ".join(parts + ld.notes + ([ld.error] if ld.error else []))
        return f"xformers {ver}" + (f" ({extra})" if extra else "")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, spec: CallSpec,
                mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                dropout_p: float, scale: float) -> AttentionResult:
        """q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) bhsd views ->
        (out (B, Hq, Sq, Dv) view of xformers' bshd output, lse (B, Hq, Sq) or None)."""
        fam, why = self._choose(spec)
        if fam is None:
            raise RuntimeError("xformers cannot run this call: " + "; ".join(why))
        ld, fs = load(), self._states[spec.device].families[fam.key]
        if fam is FLASH:
            out, lse = _run_flash(ld, fs, q, k, v, spec, key_padding_mask, dropout_p, scale)
        else:
            out, lse = _run_cutlass(ld, fs, q, k, v, spec, mask, key_padding_mask,
                                    dropout_p, scale)
        if spec.return_lse:  # varlen bias: (1, Hq | Hkv, G, B*Sq); else (B, Hq | Hkv, G, >=Sq)
            flat = (spec.heads_q, -1) if fam is FLASH and key_padding_mask is not None else (
                spec.batch, spec.heads_q, -1)
            lse = lse_to_bhs(lse.reshape(flat), spec.batch, spec.heads_q, spec.seq_q)
        return out.transpose(1, 2), (lse if spec.return_lse else None)
