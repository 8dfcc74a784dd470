"""``flash-attn``: one backend over the flash-attn family, whichever is installed.

Per call the newest API that accepts it runs: FA4 (``flash_attn.cute``,
sm90/sm100/sm110), then FA3 (``flash_attn_interface``, sm90), then FA2
(``flash_attn`` >= 2.1, sm80+); see :mod:`._flash_api` for their signatures.

Translation of the contract:

* layout: the kernels read (B, S, H, D); they get ``q.transpose(1, 2)`` etc.,
  views of the caller's tensors (no copy; for ``layout="bshd"`` the caller's
  contiguous tensors themselves).
* causal: passed as is; every API aligns it bottom-right (j <= i + Sk - Sq).
  With Sq == 1 it admits every key and is dropped.
* GQA: native (query head h reads kv head h // (Hq // Hkv)).
* key_padding_mask: FA4 gets ``seqused_k`` (dense q, k, v, no copy when the
  real keys are each row's first ones; otherwise they are gathered to the
  front); FA3/FA2 get the varlen path: dense queries (``cu_seqlens_q = arange(B
  + 1) * Sq``), the real keys packed with ``cu_seqlens_k`` from the mask, output
  reshaped back to (B, Sq, H, Dv).  Causal with key padding (Sq > 1) is refused:
  varlen kernels align causal to each row's real key count, the contract to the
  padded Sk.
* sinks: FA4 only (``learnable_sink``; its lse includes them; gradients on
  sm90/sm100/sm110).
* window / softcap: FA4 only (``window_size`` with -1 as None, ``softcap``),
  both bottom-right and capped by causal as in the contract.  A window with
  key padding is refused (the kernel would align it to each row's real key
  count, like causal below).
* refused: dense bool/float masks, float32/float64, dropout on FA3/FA4, head
  dims a kernel lacks, Dv != D on FA3/FA2, LSE with dropout on FA2.
* rows with no allowed key are zeroed by the dispatcher (FA2 writes lse=+inf).
* packed varlen calls (:func:`attention_varlen`): ``flash_attn_varlen_func``
  with ``cu_seqlens`` on both sides (``forward_varlen``).
* paged KV caches (``forward_paged``): FA4 only, sm90/sm100/sm110, any block
  size: ``page_table`` = block_table, ``seqused_k`` = cache_seqlens, causal and
  window bottom-right per row as ``attention_paged`` defines them.  Blocks a
  row does not use are never read; on its TMA path (block size = the kernel's
  key tile, 128 for most head dims) FA4 loads a row's whole last block, so the
  slots past a row's length there must hold finite values (FA4's own
  requirement; zero-initialised caches meet it).

Equivalent math (what every path computes)::

    s = scale * q @ k.T                       # (B, Hq, Sq, Sk), kv head h // (Hq // Hkv)
    s = softcap * tanh(s / softcap)           # if softcap
    s[~(key_padding & causal_bottom_right & window)] = -inf
    out = dropout(softmax(s)) @ v;  lse = logsumexp(s, -1)
"""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Optional

import torch

from .._core.backend import AttentionResult, Backend
from .._core.capabilities import Capabilities
from .._core.layout import CUDA_ALIGNED, Buffer
from .._core.spec import CallSpec
from . import _estimates as est
from . import _flash_api as api_mod
from ._flash_api import APIS, FA4, FlashApi
from .._core.packing import (CAUSAL_PADDING_REASON, causal_differs_with_padding, cu_seqlens,
    dense_cu_seqlens, key_lengths, lse_to_bhs, prefix_kv, unpad)

Tensor = torch.Tensor
Choice = tuple[FlashApi, ModuleType]
WINDOW_PADDING_REASON = (
    "window with key_padding_mask: the kernel aligns the window to each row's real key "
    "count, the contract to the padded Sk; allowed: a window without key padding")
_MAX_CHOICES = 4096


@dataclass
class _DeviceState:
    """What the flash-attn family offers on one device."""

    cc: Optional[tuple[int, int]]
    usable: list[Choice] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def _device_state(device: torch.device) -> _DeviceState:
    cc = api_mod.cuda_capability(device)
    if cc is None:
        why = (f"device {device.type}; allowed: cuda" if device.type != "cuda"
               else "CUDA is not available in this torch build or machine")
        return _DeviceState(None, reasons=[why])
    state = _DeviceState(cc)
    for api in APIS:
        if not api_mod.installed(api):
            continue
        mod, err = api_mod.load(api)
        why = [err] if mod is None else api_mod.device_reasons(api, mod, cc)
        if why:
            state.reasons.extend(f"{api.label}: {w}" for w in why)
        else:
            state.usable.append((api, mod))  # type: ignore[arg-type]
    return state


class FlashAttnBackend(Backend):
    """flash-attn FA4 / FA3 / FA2 kernels behind the contract (see module docstring)."""

    package = "flash-attn-4"
    paged_reads_tail = True  # FA4's TMA path loads a row's last page whole
    capabilities = Capabilities(
        device_types=frozenset({"cuda"}),
        strides=CUDA_ALIGNED,
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        max_head_dim=256,
        head_dim_multiple=8,
        different_v_head_dim=True,
        min_compute_capability=(8, 0),
        mask_kinds=frozenset(),
        native_layout="bshd",
        # key padding goes in as lengths: FA4 seqused_k over K/V with each row's
        # real keys first (gathered there when they are not), FA3/FA2 varlen over
        # the real keys alone.  FA4 still loads a row's whole last key tile and
        # multiplies its zero weights with what follows the row's keys (NaN there
        # gave NaN outputs on an H200): prefix_kv(zero_tail=True) zeroes those
        # slots itself, in the gathered copy or in one masked copy of K/V (none
        # without padding), so the dispatcher makes no cleaning copy of its own
        padded_keys_unread=True,
        window=True,   # FA4 path; see call reasons
        softcap=True,  # FA4 path
        varlen=True,   # forward_varlen: packed sequences, cu_seqlens on both sides
        # FA4 page_table + seqused_k (sm90/sm100/sm110); FA4 learnable_sink
        extras=frozenset({"paged", "sinks"}),
        # forward: no atomics (split-KV partials are combined in a fixed order).
        # Backward: every API takes ``deterministic=`` (dQ accumulated in a fixed
        # order); the adapter passes it under deterministic=True, and the APIs
        # that cannot honour it refuse (FA4: sm100/sm110 only; see _flash_api)
        deterministic_forward=True,
        deterministic_backward=True,
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[torch.device, _DeviceState] = {}
        self._choices: dict[CallSpec, tuple[Optional[Choice], list[str]]] = {}
        self._fa4_seen: set[CallSpec] = set()  # signatures FA4 has compiled (run once)

    def forget(self) -> None:
        """Drop cached imports, device states and per-call choices."""
        api_mod.forget()
        with self._lock:
            self._states.clear()
            self._choices.clear()
            self._fa4_seen.clear()

    def _state(self, device: torch.device) -> _DeviceState:
        with self._lock:
            st = self._states.get(device)
        if st is None:
            st = _device_state(device)
            with self._lock:
                self._states[device] = st
        return st

    def probe(self, device: torch.device) -> list[str]:
        """[] when some installed flash-attn API runs on ``device``; else why not."""
        st = self._state(device)
        if st.usable:
            return []
        if not any(api_mod.installed(a) for a in APIS):
            return st.reasons + [api_mod.INSTALL_HINT]
        return list(st.reasons)

    def _choose(self, spec: CallSpec) -> tuple[Optional[Choice], list[str]]:
        hit = self._choices.get(spec)
        if hit is not None:
            return hit
        st = self._state(spec.device)
        if not st.usable:
            res: tuple[Optional[Choice], list[str]] = (None, self.probe(spec.device))
        elif causal_differs_with_padding(spec.causal, spec.seq_q, spec.key_padding):
            res = (None, [CAUSAL_PADDING_REASON])
        elif spec.window is not None and spec.key_padding:
            res = (None, [WINDOW_PADDING_REASON])
        else:
            res = (None, [])
            for api, mod in st.usable:
                why = (api_mod.call_reasons(api, spec, st.cc)  # type: ignore[arg-type]
                       + api_mod.deterministic_reasons(api, mod, spec, st.cc))  # type: ignore
                if spec.paged and api is FA4:
                    why += api_mod.paged_reasons(mod, spec, st.cc)  # type: ignore[arg-type]
                if not why:
                    res = ((api, mod), [])
                    break
                res[1].extend(f"{api.label}: {w}" for w in why)
        with self._lock:
            if len(self._choices) >= _MAX_CHOICES:
                self._choices.clear()
            self._choices[spec] = res
        return res

    def check(self, spec: CallSpec) -> list[str]:
        """Reasons no usable flash-attn API takes ``spec`` (one per API, prefixed)."""
        return list(self._choose(spec)[1])

    def buffers(self, spec: CallSpec) -> tuple[Buffer, ...]:
        """Key padding: K/V gathered to the front (FA4, when the real keys are
        not each row's first; else, with padding, K/V copied with the padded
        slots zeroed) or unpadded (FA3/FA2): at most one copy of K/V."""
        if not spec.key_padding:
            return ()
        return (est.kv_copy(spec, spec.heads_kv, "K/V gathered/unpadded for key padding "
                            "(at most)"),)

    def chosen_api(self, spec: CallSpec) -> Optional[str]:
        """Label of the API that runs ``spec`` (e.g. "FA4, flash_attn.cute"), or None."""
        choice = self._choose(spec)[0]
        return choice[0].label if choice else None

    def version(self) -> Optional[str]:
        for api in APIS:
            if api_mod.installed(api):
                return api_mod.version(api, sys.modules.get(api.module))
        return None

    def describe(self) -> str:
        """E.g. "flash-attn-4 4.0.0b36 (FA4, flash_attn.cute)"; every installed API."""
        parts = []
        for api in APIS:
            if api_mod.installed(api):
                v = api_mod.version(api, sys.modules.get(api.module)) or "version unknown"
                parts.append(f"{api.dists[0]} {v} ({api.label})")
        return " + ".join(parts) if parts else "flash-attn (not installed)"

    def forward_paged(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, *, spec: CallSpec,
                      block_table: Tensor, cache_seqlens: Tensor, scale: float,
                      sinks: Optional[Tensor] = None) -> AttentionResult:
        """FA4 over a paged cache: q (B, Sq, Hq, D) -> out (B, Sq, Hq, Dv),
        lse (B, Hq, Sq) or None (see the module docstring)."""
        choice, why = self._choose(spec)
        if choice is None:
            raise RuntimeError("flash-attn cannot run this paged call: " + "; ".join(why))
        args = (choice[1], spec, q, k_cache, v_cache, block_table, cache_seqlens, scale, sinks)
        if spec in self._fa4_seen:
            return _paged(*args)
        with api_mod.quiet_fa4_compile():
            res = _paged(*args)
        with self._lock:
            self._fa4_seen.add(spec)
        return res

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, spec: CallSpec,
                mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                dropout_p: float, scale: float, sinks: Optional[Tensor] = None
                ) -> AttentionResult:
        """q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) bhsd views, sinks
        (Hq,) or None -> (out (B, Hq, Sq, Dv) view of the kernel's bshd output,
        lse (B, Hq, Sq) or None)."""
        choice, why = self._choose(spec)
        if choice is None:
            raise RuntimeError("flash-attn cannot run this call: " + "; ".join(why))
        api, mod = choice
        qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if api is FA4 and spec not in self._fa4_seen:
            # FA4 compiles a kernel on the first call of a signature, and the CuTe
            # DSL then warns; filtered around that call only (see _flash_api)
            with api_mod.quiet_fa4_compile():
                out, lse = _call(api, mod, spec, qs, ks, vs, key_padding_mask, dropout_p, scale,
                                 sinks)
            with self._lock:
                if len(self._fa4_seen) >= _MAX_CHOICES:
                    self._fa4_seen.clear()
                self._fa4_seen.add(spec)
        else:
            out, lse = _call(api, mod, spec, qs, ks, vs, key_padding_mask, dropout_p, scale,
                             sinks)
        if spec.return_lse:
            lse = lse_to_bhs(lse, spec.batch, spec.heads_q, spec.seq_q)  # type: ignore[arg-type]
        return out.transpose(1, 2), (lse if spec.return_lse else None)

    def forward_varlen(self, q: Tensor, k: Tensor, v: Tensor, *, spec: CallSpec,
                       cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                       max_seqlen_k: int, dropout_p: float, scale: float,
                       sinks: Optional[Tensor] = None) -> AttentionResult:
        """Packed sequences: q (Tq, Hq, D), k/v (Tk, Hkv, D|Dv), cu_seqlens (B + 1,)
        int32, sinks (Hq,) or None (FA4) -> out (Tq, Hq, Dv), lse (Hq, Tq) float32 or None."""
        choice, why = self._choose(spec)
        if choice is None:
            raise RuntimeError("flash-attn cannot run this call: " + "; ".join(why))
        api, mod = choice
        with (api_mod.quiet_fa4_compile() if api is FA4 else contextlib.nullcontext()):
            out, lse = _packed(api, mod, spec, q, k, v, cu_seqlens_q, cu_seqlens_k,
                               max_seqlen_q, max_seqlen_k, dropout_p, scale, sinks)
        if not spec.return_lse:
            return out, None
        if lse is None or lse.dim() != 2:  # older FA2: (B, Hq, max_q), padded per sequence
            raise RuntimeError("flash-attn returned no packed (Hq, Tq) LSE for this varlen call")
        return out, lse.float()


def _packed(api: FlashApi, mod: ModuleType, spec: CallSpec, q: Tensor, k: Tensor, v: Tensor,
            cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, dropout_p: float,
            scale: float, sinks: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """A packed varlen call: q (Tq, Hq, D), k/v (Tk, Hkv, D|Dv) -> out (Tq, Hq, Dv),
    lse (Hq, Tq) or None.  Causal, window and softcap are bottom-right per
    sequence in every API, as in the contract."""
    det = spec.deterministic and spec.requires_grad  # deterministic backward, when asked
    if api is FA4:
        kw = api_mod.fa4_structured(spec.window, spec.softcap, sinks)
        return api_mod._split(mod.flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
            max_seqlen_k=max_k, softmax_scale=scale, causal=spec.causal,
            return_lse=spec.return_lse, **kw, **api_mod._det(det)))
    return api_mod.call_varlen(api, mod, q, k, v, cu_q, cu_k, max_q, max_k,
                               causal=spec.causal, dropout_p=dropout_p, scale=scale,
                               need_lse=spec.return_lse, deterministic=det)


def _call(api: FlashApi, mod: ModuleType, spec: CallSpec, q: Tensor, k: Tensor, v: Tensor,
          kpm: Optional[Tensor], dropout_p: float, scale: float,
          sinks: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """The kernel call on bshd views: dense, FA4 seqused_k, or FA3/FA2 varlen."""
    kw = dict(causal=spec.causal and spec.seq_q > 1, scale=scale, need_lse=spec.return_lse)
    if spec.deterministic and spec.requires_grad:
        kw["deterministic"] = True
    if spec.window is not None or spec.softcap is not None or sinks is not None:
        kw["fa4_kw"] = api_mod.fa4_structured(spec.window, spec.softcap, sinks)
    if kpm is None:
        return api_mod.call_dense(api, mod, q, k, v, dropout_p=dropout_p, **kw)
    if api is FA4:
        k2, v2, lengths = prefix_kv(k, v, kpm, zero_tail=True)
        return api_mod.call_seqused(mod, q, k2, v2, lengths, **kw)
    return _varlen(api, mod, q, k, v, kpm, dropout_p, kw)


def _varlen(api: FlashApi, mod: ModuleType, q: Tensor, k: Tensor, v: Tensor, kpm: Tensor,
            dropout_p: float, kw: dict) -> tuple[Tensor, Optional[Tensor]]:
    """FA3/FA2 key padding: dense queries, real keys packed (bshd in, bshd out).

    q (B, Sq, Hq, D) -> (B*Sq, Hq, D); k/v -> (total_k, Hkv, D) with cu_seqlens_k
    from the mask.  Returns out (B, Sq, Hq, Dv) and the kernel's lse.
    """
    b, sq, hq, d = q.shape
    lengths = key_lengths(kpm)
    cu_q = dense_cu_seqlens(b, sq, q.device)
    max_k = int(lengths.max())
    out, lse = api_mod.call_varlen(api, mod, q.reshape(b * sq, hq, d), unpad(k, kpm),
                                   unpad(v, kpm), cu_q, cu_seqlens(lengths), sq, max_k,
                                   dropout_p=dropout_p, **kw)
    return out.reshape(b, sq, hq, out.shape[-1]), lse


def _paged(mod: ModuleType, spec: CallSpec, q: Tensor, k_cache: Tensor, v_cache: Tensor,
           block_table: Tensor, cache_seqlens: Tensor, scale: float,
           sinks: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """FA4's paged call (the core copied inputs whose memory breaks CUDA_ALIGNED)."""
    kw = dict(causal=spec.causal and spec.seq_q > 1, scale=scale, need_lse=spec.return_lse)
    if spec.window is not None or spec.softcap is not None or sinks is not None:
        kw["fa4_kw"] = api_mod.fa4_structured(spec.window, spec.softcap, sinks)
    out, lse = api_mod.call_paged(mod, q, k_cache, v_cache, block_table,
                                  cache_seqlens, **kw)
    if spec.return_lse:
        lse = lse_to_bhs(lse, spec.batch, spec.heads_q, spec.seq_q)  # type: ignore[arg-type]
    return out, (lse if spec.return_lse else None)
