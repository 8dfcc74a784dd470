"""``flex``: ``torch.nn.attention.flex_attention`` with the contract built in.

The call's structure becomes flex's two hooks, never an O(Sq * Sk) tensor:

* ``block_mask`` (a block-sparse mask_mod): bottom-right causal, the sliding
  window, key padding, and for packed varlen calls the document mask built
  from cu_seqlens (causal and window per document);
* ``score_mod``: softcap (``c * tanh(s / c)``) then ALiBi
  (``- slope * |i + Sk - Sq - j|``, per document for varlen).

flex_attention is compiled with ``torch.compile`` once per signature (device,
dtype, shapes, features, scale) and cached: a fresh code object per signature,
so distinct signatures never share (or exhaust) dynamo's recompile budget.
Block masks that depend only on the shape (causal, window) are cached per
(device, Sq, Sk, causal, window).  Key padding depends on data: its block
mask is assembled per call from the cached static one and per-block counts of
real keys (no per-element mask sweep).  Document masks are cached per
cu_seqlens value (the last 8), so a fixed packing costs no rebuild.
Packed totals are rounded up to a power of two (>= 128), so varlen batches
of changing total length reuse a handful of compiled kernels; the padding
tokens belong to no document (fully masked: their blocks are skipped).

On the CPU, for head dims below 24, keys are padded to a multiple of 16 and
the padded keys masked out (``kv_idx < Sk`` in the block mask): torch's CPU
kernel reads and writes past a key block whose length is 8 mod 16 there
(see ``cpu_key_length``).

On the CPU (inductor's C++ flex kernel; the first compile of a signature
takes seconds, ~15 s on a laptop) it is inference-only and returns no LSE:
calls that need gradients or ``return_lse`` are refused there, and so are
calls with fewer than ``FlexBackend.min_cpu_scores`` (64 * 64) scores, which
finish before a compile would.  On CUDA (triton): gradients, LSE, and sinks
through the LSE.  No dropout, no dense masks (use another
backend for those).

Equivalent math::

    s = scale * q @ k.T                           # (B, Hq, Sq, Sk), GQA by head groups
    s = softcap * tanh(s / softcap)               # score_mod, if softcap
    s = s - slope[h] * |i + Sk - Sq - j|          # score_mod, if ALiBi
    s[~(key_padding & causal_bottom_right & window & same_document)] = -inf  # block_mask
    out = softmax(s) @ v;  lse = logsumexp(s)     # rows without keys: 0 / -inf
    out *= sigmoid(lse - sinks[h]); lse = logaddexp(lse, sinks[h])  # sinks (CUDA)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import shutil
import threading
import types
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch

from .._core.backend import AttentionResult, Backend
from .._core.capabilities import Capabilities
from .._core.layout import CUDA_ALIGNED, Buffer, StrideRequirements
from .._core.masks import apply_sinks, expand_kv
from .._core.spec import CallSpec
from . import _estimates as est
from ._flex_mods import _Docs, dense_mask_mod, make_score_mod
from .paged_flex import forward_paged, paged_reasons

Tensor = torch.Tensor

_lock = threading.Lock()
_compiled: "OrderedDict[tuple, Callable[..., Any]]" = OrderedDict()
_block_masks: "OrderedDict[tuple, Any]" = OrderedDict()
_doc_masks: "OrderedDict[tuple, Any]" = OrderedDict()
#: call signature -> key of the compiled kernel its last call ran (see compiled())
_warm: "OrderedDict[CallSpec, tuple]" = OrderedDict()
_MAX_COMPILED = 128
_MAX_BLOCK_MASKS = 256
_MAX_DOC_MASKS = 8  # O(T) tables + O(T^2 / 128^2) blocks each: keep few
_names = itertools.count()


def _flex() -> Any:
    """torch.nn.attention.flex_attention, imported on first use."""
    from torch.nn.attention import flex_attention as mod

    return mod


def _call_flex(q: Tensor, k: Tensor, v: Tensor, score_mod: Any, block_mask: Any,
               scale: float, enable_gqa: bool, aux: Any) -> Any:
    """The compiled unit (one fresh copy per signature; see _compiled_for)."""
    fa = _flex().flex_attention
    if aux is None:
        return fa(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                  enable_gqa=enable_gqa)
    return fa(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
              enable_gqa=enable_gqa, **aux)


def _fresh_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its own code object: dynamo caches compiled frames (and
    counts recompiles) per code object, so each signature gets its own."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_names)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                              fn.__closure__)


def _compiled_for(key: tuple) -> Callable[..., Any]:
    """The compiled flex call of one signature, cached (LRU of 128)."""
    with _lock:
        fn = _compiled.get(key)
        if fn is not None:
            _compiled.move_to_end(key)
            return fn
        fn = torch.compile(_fresh_copy(_call_flex), dynamic=False, fullgraph=True)
        _compiled[key] = fn
        if len(_compiled) > _MAX_COMPILED:
            _compiled.popitem(last=False)
        return fn


def _remember_warm(spec: CallSpec, key: tuple) -> None:
    """``spec`` has run the compiled kernel ``key`` (bounded like _compiled)."""
    with _lock:
        _warm[spec] = key
        _warm.move_to_end(spec)
        if len(_warm) > 2 * _MAX_COMPILED:
            _warm.popitem(last=False)


def _cached_block_mask(key: tuple, build: Callable[[], Any],
                       cache: "Optional[OrderedDict[tuple, Any]]" = None,
                       limit: int = _MAX_BLOCK_MASKS) -> Any:
    """``build()`` once per key (LRU of ``limit`` entries in ``cache``)."""
    cache = _block_masks if cache is None else cache
    with _lock:
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
    bm = build()
    with _lock:
        cache[key] = bm
        if len(cache) > limit:
            cache.popitem(last=False)
    return bm


def clear_caches() -> None:
    """Forget compiled kernels and block masks (tests; memory)."""
    with _lock:
        _compiled.clear()
        _block_masks.clear()
        _doc_masks.clear()
        _warm.clear()


# ------------------------------------------------------------ mask and score


_BLOCK = 128  # flex's default sparse block size (create_block_mask's too)


def _dense_blocks(num: Optional[Tensor], idx: Optional[Tensor], shape: tuple[int, ...],
                  device: torch.device) -> Tensor:
    """A BlockMask's (num, indices) pair -> a dense (1|B, 1, nq, nk) bool grid."""
    nk = shape[-1]
    if num is None or idx is None:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    used = torch.arange(idx.shape[-1], device=device) < num[..., None]
    cols = torch.where(used, idx.long(), nk)  # unused slots -> a dummy column
    grid = torch.zeros(tuple(cols.shape[:-1]) + (nk + 1,), dtype=torch.bool, device=device)
    return grid.scatter_(-1, cols, True)[..., :nk]


def _sparse_blocks(grid: Tensor) -> tuple[Tensor, Tensor]:
    """Dense (B, 1, nq, nk) bool grid -> (num int32, indices int32), True first."""
    num = grid.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~grid).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, idx


def key_padding_block_mask(static: Any, mask_mod: Callable[..., Tensor], kpm: Tensor,
                           seq_q: int, seq_k: int) -> Any:
    """The BlockMask of (static causal/window mask) & key padding without
    evaluating mask_mod per element: block classes from the static mask's
    blocks and per-block padding counts, O(B * nq * nk).

    A block is full where the static block is full and all its keys are real,
    skipped where the static block is skipped or all its keys are padding,
    partial otherwise (mask_mod then applies per element)."""
    b, dev = kpm.shape[0], kpm.device
    nq, nk = -(-seq_q // _BLOCK), -(-seq_k // _BLOCK)
    if static is None:
        s_full = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=dev)
        s_part = torch.zeros_like(s_full)
    else:
        s_part = _dense_blocks(static.kv_num_blocks, static.kv_indices, (1, 1, nq, nk), dev)
        s_full = _dense_blocks(static.full_kv_num_blocks, static.full_kv_indices,
                               (1, 1, nq, nk), dev)
    pad = nk * _BLOCK - seq_k  # positions past Sk: flex bounds them itself
    real_all = torch.nn.functional.pad(kpm, (0, pad), value=True).view(b, nk, _BLOCK).all(-1)
    real_any = torch.nn.functional.pad(kpm, (0, pad), value=False).view(b, nk, _BLOCK).any(-1)
    full = s_full & real_all[:, None, None, :]
    part = (s_part | s_full) & real_any[:, None, None, :] & ~full
    num, idx = _sparse_blocks(part)
    fnum, fidx = _sparse_blocks(full)
    return _flex().BlockMask.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=_BLOCK,
                                            mask_mod=mask_mod, seq_lengths=(seq_q, seq_k))


#: torch 2.13's CPU flex kernel computes q @ k.T per key block with a micro
#: GEMM of 16 key columns per step (inductor's CppMicroGemmFP32Vec, block
#: (1, 16, 1)).  For a head dim below 24 that is a multiple of the vector
#: width (8 floats with AVX2: head dims 8 and 16) its last step, when the
#: block's key count is 8 mod 16 (a multiple of the vector width, not of 16),
#: loads 16 keys and stores 16 scores: it reads 8 keys past the block (past
#: the tensor at the end) and writes 8 scores past the row.  When the block
#: is the widest one (all Sk keys without a block mask, or Sk < 128), those
#: of the last query row land in the softmax's running max/sum: silent wrong
#: output or NaN, data dependent.  Key blocks are 128 keys (all keys without
#: a block mask), so padding Sk to a multiple of 16 keeps every step full.
CPU_KEY_MULTIPLE = 16
CPU_SAFE_HEAD_DIM = 24  # head dims >= 24 take the micro GEMM's other path


def cpu_key_length(device: torch.device, head_dim: int, seq_k: int) -> int:
    """The key length flex runs with: ``seq_k`` rounded up to a multiple of
    16 on the CPU for head dims below 24 (the padded keys are masked out),
    ``seq_k`` otherwise.  Varlen calls need nothing: their packed totals
    are powers of two >= 128."""
    if device.type != "cpu" or head_dim >= CPU_SAFE_HEAD_DIM:
        return seq_k
    return -(-seq_k // CPU_KEY_MULTIPLE) * CPU_KEY_MULTIPLE


def _pad_keys(k: Tensor, v: Tensor, kpm: Optional[Tensor], length: int
              ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """K/V (B, H, Sk, D) zero-padded to ``length`` keys, and the key padding
    mask (B, Sk) padded with False (padded keys are never real)."""
    extra = length - k.shape[2]
    if extra == 0:
        return k, v, kpm
    fn = torch.nn.functional.pad
    k, v = (fn(t, (0, 0, 0, extra)) for t in (k, v))
    return k, v, None if kpm is None else fn(kpm, (0, extra), value=False)


def _dense_block_mask(device: torch.device, seq_q: int, seq_k: int, padded_k: int,
                      spec: CallSpec, kpm: Optional[Tensor]) -> Any:
    """The BlockMask of a dense call over ``padded_k`` keys (None: no mask):
    causal, window and keys past ``seq_k`` cached per shape, key padding
    (``kpm``, ``padded_k`` columns) assembled per call on top."""
    fa = _flex()
    static_mm = dense_mask_mod(seq_q, seq_k, spec.causal, spec.window, None, padded_k)
    bm = None
    if static_mm is not None:  # depends on the shape only: cached
        bm = _cached_block_mask((device, seq_q, seq_k, padded_k, spec.causal, spec.window),
                                lambda: fa.create_block_mask(static_mm, None, None, seq_q,
                                                             padded_k, device=device))
    if kpm is not None:  # depends on data: block classes per call, no mask_mod sweep
        mm = dense_mask_mod(seq_q, seq_k, spec.causal, spec.window, kpm, padded_k)
        bm = key_padding_block_mask(bm, mm, kpm, seq_q, padded_k)  # type: ignore[arg-type]
    return bm


def _bucket(n: int) -> int:
    """Packed totals: the next power of two, at least 128 (one flex block)."""
    return max(128, 1 << max(0, n - 1).bit_length())


def _gqa(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, bool]:
    """K/V expanded to the query heads (native GQA off).

    Measured on an H100 (torch 2.11, GPU fuzzing): flex's native GQA
    (``enable_gqa=True``) fails to compile for many short-query shapes
    (inductor "NoValidChoicesError", e.g. Sq=127, Sk=129, group 2), and group
    sizes that are not powers of two are not supported by its decoding kernel.
    """
    if q.shape[1] == k.shape[1]:
        return k, v, False
    return expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1]), False


def _cxx_compiler() -> Optional[str]:
    names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


class FlexBackend(Backend):
    """torch's flex_attention, compiled per signature, with structured masks."""

    capabilities = Capabilities(
        device_types=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        min_compute_capability=(8, 0),
        mask_kinds=frozenset(),
        key_padding=True,
        causal=True,
        dropout=False,
        lse=True,        # CUDA only: check() refuses it on the CPU
        gqa=True,
        backward=True,   # CUDA only, likewise
        empty_rows_exact=False,
        window=True,
        softcap=True,
        alibi=True,
        varlen=True,
        # forward_paged: a block-table mask (see paged_flex); sinks through the
        # LSE, CUDA only (check)
        extras=frozenset({"paged", "sinks"}),
        # no atomics for q/k/v (the backward computes dQ and dK/dV in separate programs)
        deterministic_forward=True, deterministic_backward=True,
    )

    def stride_requirements(self, spec: CallSpec) -> StrideRequirements:
        """CPU: a unit last stride; CUDA: the aligned rule of the fused kernels
        (the triton kernel loads rows with aligned vector loads)."""
        return CUDA_ALIGNED if spec.device_type == "cuda" else self.capabilities.strides

    def buffers(self, spec: CallSpec) -> tuple[Buffer, ...]:
        """K/V expanded for GQA or padded to 16 keys (block masks not counted)."""
        pad = cpu_key_length(spec.device, spec.head_dim, spec.seq_k) != spec.seq_k
        padded = est.kv_copy(spec, spec.heads_kv, "K/V padded to 16 keys")
        return est.listed(*est.gqa_expansion(spec), padded if pad and not spec.varlen else None)

    def describe(self) -> str:
        return (f"torch {torch.__version__} flex_attention (compiled per signature; on the "
                f"CPU only calls with Sq*Sk >= {self.min_cpu_scores})")

    def capabilities_on(self, device: torch.device) -> Capabilities:
        """On the CPU: no LSE and no gradients (see :meth:`check`)."""
        if device.type == "cpu":
            return dataclasses.replace(self.capabilities, lse=False, backward=False)
        return self.capabilities

    def probe(self, device: torch.device) -> list[str]:
        out = super().probe(device)
        if out:
            return out
        try:
            _flex()
        except ImportError as exc:
            return [f"torch {torch.__version__} has no flex_attention ({exc}); needs torch >= 2.5"]
        if device.type == "cpu" and _cxx_compiler() is None:
            out.append("no C++ compiler (g++/c++/clang++ or $CXX) for inductor's CPU kernel")
        if device.type == "cuda" and importlib.util.find_spec("triton") is None:
            out.append("triton is not installed (flex_attention compiles with it on CUDA)")
        return out

    compiles_per_shape = True

    def compiled(self, spec: CallSpec) -> bool:
        """A call of ``spec`` ran here and its compiled kernel is still cached
        (in this process; inductor's on-disk cache is not consulted)."""
        with _lock:
            key = _warm.get(spec)
            return key is not None and key in _compiled

    #: On the CPU, calls with fewer scores than this (Sq * Sk, max lengths for
    #: varlen) are refused: compiling a flex kernel takes seconds there, and
    #: sdpa-flash or math finish such calls in microseconds.
    min_cpu_scores: int = 64 * 64

    def check(self, spec: CallSpec) -> list[str]:
        out = paged_reasons(spec) if spec.paged else []
        if spec.device_type == "cpu":
            scores = spec.seq_q * spec.seq_k
            if scores < self.min_cpu_scores:
                out.append(f"Sq*Sk={scores} on the CPU; allowed: >= {self.min_cpu_scores} "
                           "(compiling flex takes seconds; smaller calls are faster elsewhere)")
            if spec.requires_grad:
                out.append("gradients needed; flex_attention on the CPU is inference-only")
            if spec.return_lse:
                out.append("return_lse=True on the CPU; compiled flex_attention returns no "
                           "LSE there")
            if spec.sinks:
                out.append("sinks on the CPU; flex applies them through its LSE, which "
                           "compiled flex_attention does not return there")
        elif spec.device_type == "cuda":
            for name, d in (("head_dim", spec.head_dim), ("head_dim_v", spec.head_dim_v)):
                if not 16 <= d <= 256:
                    out.append(f"{name}={d} on CUDA; allowed: 16..256")
            group = spec.heads_q // spec.heads_kv
            if spec.requires_grad and group & (group - 1):
                # measured (GPU fuzzing, H100, torch 2.11): Hkv=4, group 3 (K/V expanded to
                # 12 heads): dq/dk/dv off by 1e2, with and without empty rows
                out.append(f"gradients with a GQA group of {group} on CUDA; allowed: groups "
                           "that are powers of two (flex's backward was wrong with group 3)")
            if spec.requires_grad and spec.may_have_empty_rows:
                # measured (GPU fuzzing, H100, torch 2.11): dq/dk/dv off by 1e2 when
                # some query row has no key (causal Sq > Sk, padding under causal)
                out.append("gradients for a call that may leave query rows without keys "
                           "(mask, key padding, causal with Sq > Sk, window); flex's "
                           "backward is wrong for such rows on CUDA")
        return out

    _lse_request: Optional[dict] = None

    @classmethod
    def _aux(cls, spec: CallSpec) -> Optional[dict]:
        """flex's LSE request, one object for the process (it is guarded on)."""
        if not (spec.return_lse or spec.sinks):
            return None
        if cls._lse_request is None:
            req = getattr(_flex(), "AuxRequest", None)
            cls._lse_request = {"return_aux": req(lse=True)} if req else {"return_lse": True}
        return cls._lse_request

    def _run(self, key: tuple, q: Tensor, k: Tensor, v: Tensor, spec: CallSpec,
             score_mod: Any, block_mask: Any, scale: float, sinks: Optional[Tensor] = None,
             native_gqa: bool = False) -> AttentionResult:
        """One compiled flex call; ``sinks`` (Hq,) applied through its (differentiable)
        LSE; ``native_gqa``: flex's enable_gqa (K/V, e.g. a whole paged cache, not expanded)."""
        if native_gqa:
            gqa = q.shape[1] != k.shape[1]
        else:
            k, v, gqa = _gqa(q, k, v)
        aux = self._aux(spec)
        key = key + (tuple(q.shape), tuple(k.shape), tuple(v.shape), gqa, scale, aux is not None)
        fn = _compiled_for(key)
        res = fn(q, k, v, score_mod, block_mask, scale, gqa, aux)
        if _warm.get(spec) != key:  # compiled now: auto may promote flex for spec
            _remember_warm(spec, key)
        if aux is None:
            return res, None
        out, lse = res[0], (res[1].lse if hasattr(res[1], "lse") else res[1]).float()
        if sinks is not None and out.requires_grad and not lse.requires_grad:  # never silently
            raise RuntimeError("flex returned an LSE without a gradient; sinks need one")
        out, lse = (out, lse) if sinks is None else apply_sinks(out, lse, sinks.view(1, -1, 1))
        return out, (lse.float() if spec.return_lse else None)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, spec: CallSpec,
                mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                dropout_p: float, scale: float, alibi_slopes: Optional[Tensor] = None,
                sinks: Optional[Tensor] = None) -> AttentionResult:
        """Dense call: one flex call; on the CPU with small head dims the keys
        are padded to a multiple of 16 and masked (``cpu_key_length``)."""
        Sq, Sk = q.shape[2], k.shape[2]
        Skp = cpu_key_length(q.device, q.shape[-1], Sk)
        k, v, kpm = _pad_keys(k, v, key_padding_mask, Skp)
        bm = _dense_block_mask(q.device, Sq, Sk, Skp, spec, kpm)
        off = Sk - Sq
        sm = make_score_mod(spec.softcap, alibi_slopes, lambda b, qi, kv: qi + off - kv,
                            lambda b, qi: b)
        key = ("dense", q.device, q.dtype, spec.causal, spec.window, kpm is not None,
               spec.softcap, None if alibi_slopes is None else alibi_slopes.dim(),
               spec.requires_grad, Sk)
        return self._run(key, q, k, v, spec, sm, bm, scale, sinks)

    def forward_varlen(self, q: Tensor, k: Tensor, v: Tensor, *, spec: CallSpec,
                       cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                       max_seqlen_k: int, dropout_p: float, scale: float,
                       alibi_slopes: Optional[Tensor] = None,
                       sinks: Optional[Tensor] = None) -> AttentionResult:
        """Packed call as one (1, H, T, D) flex call with a document mask."""
        tq, tk = q.shape[0], k.shape[0]
        pq, pk = _bucket(tq), _bucket(tk)
        cu_host = tuple(torch.cat([cu_seqlens_q, cu_seqlens_k]).tolist())
        fa = _flex()

        def build() -> tuple[_Docs, Any]:
            docs = _Docs(cu_seqlens_q, cu_seqlens_k, pq, pk)
            return docs, fa.create_block_mask(docs.mask_mod(spec.causal, spec.window), None,
                                              None, pq, pk, device=q.device)

        docs, bm = _cached_block_mask((q.device, pq, pk, spec.causal, spec.window, cu_host),
                                      build, _doc_masks, _MAX_DOC_MASKS)
        qp, kp, vp = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, n - t.shape[0]))
                      .transpose(0, 1).unsqueeze(0) for t, n in ((q, pq), (k, pk), (v, pk)))
        sm = make_score_mod(spec.softcap, alibi_slopes, docs.distance, docs.row)
        key = ("varlen", q.device, q.dtype, spec.causal, spec.window, spec.softcap,
               None if alibi_slopes is None else alibi_slopes.shape, spec.requires_grad)
        out, lse = self._run(key, qp, kp, vp, spec, sm, bm, scale, sinks)
        out = out[0, :, :tq].transpose(0, 1)
        return out, (lse[0, :, :tq] if lse is not None else None)

    forward_paged = forward_paged  # the block-table route: see paged_flex
    paged_reads_tail = True  # a row's last block is one key block: read whole
