"""The flash-attn family APIs behind the ``flash-attn`` backend: how to find,
import and gate each one, and how to call it.

Three APIs, newest first (the backend uses the first that accepts a call):

* FA4 - ``flash_attn.cute`` (distribution ``flash-attn-4``), CuTe-DSL kernels,
  sm90/sm100/sm110.  ``flash_attn_func(q, k, v, ..., softmax_scale, causal,
  ..., return_lse)`` and ``flash_attn_varlen_func(q, k, v, qv, cu_seqlens_q,
  cu_seqlens_k, max_seqlen_q, max_seqlen_k, min_seqlen_k, seqused_q, seqused_k,
  ..., softmax_scale, causal, ..., return_lse)`` both return ``(out, lse)``, lse
  (B, H, Sq) float32 (natural log) for dense queries; autograd; no dropout.
* FA3 - ``flash_attn_interface`` (Hopper build ``flash_attn_3``), sm90.
  ``flash_attn_func(q, k, v, softmax_scale=None, causal=False, ...,
  return_attn_probs=False)`` returns ``out`` or ``(out, softmax_lse)`` (older
  betas always returned the pair); no dropout.
* FA2 - ``flash_attn`` (distribution ``flash-attn`` >= 2.1), sm80+.
  ``flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
  window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
  return_attn_probs=False)`` returns ``out`` or ``(out, softmax_lse, S_dmask)``;
  ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
  max_seqlen_k, dropout_p, softmax_scale, causal, ...)``, lse (H, total_q).

All take (B, S, H, D) tensors with a unit last stride, native GQA (query head
h reads kv head h // (Hq // Hkv)) and bottom-right causal (j <= i + Sk - Sq).
Their backward passes differentiate the output only; the contract's LSE is
detached (the dispatcher returns ``lse.detach()``), so that is all it needs.

Equivalent math: see :mod:`attention_dispatch.adapters.math`.
"""

from __future__ import annotations

import importlib
import importlib.util
import functools
import inspect
import os
import sys
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterator, Optional

import torch

from .._core.spec import CallSpec

Tensor = torch.Tensor
CC = tuple[int, int]

INSTALL_HINT = ("flash-attn not installed: pip install 'attention-dispatch[flash-attn]' "
                "(FA4, sm90/sm100) or 'attention-dispatch[flash-attn2]' (FA2, sm80+)")


@dataclass(frozen=True)
class FlashApi:
    """One flash-attn API: where it lives and what it is called."""

    key: str                 # "fa4" / "fa3" / "fa2"
    label: str               # for reasons and describe()
    module: str              # import path of the functions
    dists: tuple[str, ...]   # distributions whose version is reported


FA4 = FlashApi("fa4", "FA4, flash_attn.cute", "flash_attn.cute", ("flash-attn-4",))
FA3 = FlashApi("fa3", "FA3, flash_attn_interface", "flash_attn_interface",
               ("flash-attn-3", "flash_attn_3"))
FA2 = FlashApi("fa2", "FA2, flash_attn", "flash_attn", ("flash-attn",))
APIS: tuple[FlashApi, ...] = (FA4, FA3, FA2)

_lock = threading.RLock()
_imports: dict[str, tuple[Optional[ModuleType], Optional[str]]] = {}


def forget() -> None:
    """Drop cached imports (tests; after installing a package)."""
    with _lock:
        _imports.clear()


def cuda_capability(device: torch.device) -> Optional[CC]:
    """(major, minor) of a CUDA ``device``; None when it is not a usable CUDA device.

    The single device gate of the flash-attn adapter (tests replace it).
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def _has_submodule(package: str, sub: str) -> bool:
    """Whether ``package.sub`` exists, without importing either."""
    mod = sys.modules.get(package)
    if mod is not None and (hasattr(mod, sub) or f"{package}.{sub}" in sys.modules):
        return True
    if package in sys.modules and mod is None:
        return False
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return False
    paths = list(spec.submodule_search_locations or []) if spec else []
    return any(os.path.exists(os.path.join(p, sub)) or os.path.exists(os.path.join(p, sub + ".py"))
               for p in paths)


def module_present(name: str) -> bool:
    """Whether the top-level module ``name`` is importable (nothing is imported)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def installed(api: FlashApi) -> bool:
    """Whether ``api`` looks installed (nothing is imported)."""
    if api is FA4:
        return _has_submodule("flash_attn", "cute")
    if api is FA2:
        return _has_submodule("flash_attn", "flash_attn_interface")
    return module_present("flash_attn_interface")


def fa4_without_fa2() -> bool:
    """flash_attn importable (flash-attn-4's namespace package) without FA2's
    ``flash_attn.flash_attn_interface``: the layout that breaks xformers <= 0.0.35."""
    return _has_submodule("flash_attn", "cute") and not _has_submodule("flash_attn",
                                                                       "flash_attn_interface")


def import_hiding_flash_attn(name: str) -> ModuleType:
    """Import module ``name`` while ``flash_attn`` looks absent to it.

    ``sys.modules["flash_attn"] = None`` makes ``importlib.util.find_spec("flash_attn")``
    return None and ``import flash_attn`` fail, for the duration of this import only;
    the previous entry is restored afterwards (nothing on disk changes).
    """
    missing = object()
    with _lock:
        saved = sys.modules.get("flash_attn", missing)
        sys.modules["flash_attn"] = None  # type: ignore[assignment]
        try:
            return importlib.import_module(name)
        finally:
            if saved is missing:
                sys.modules.pop("flash_attn", None)
            else:
                sys.modules["flash_attn"] = saved  # type: ignore[assignment]


def load(api: FlashApi) -> tuple[Optional[ModuleType], Optional[str]]:
    """(module, None) or (None, "why the import failed"); cached, never raises."""
    with _lock:
        hit = _imports.get(api.key)
        if hit is None:
            try:
                hit = (importlib.import_module(api.module), None)
            except Exception as exc:  # a broken optional package must not break dispatch
                hit = (None, f"import {api.module} failed: {type(exc).__name__}: {exc}")
            _imports[api.key] = hit
        return hit


def version(api: FlashApi, module: Optional[ModuleType] = None) -> Optional[str]:
    """Installed version of ``api`` from package metadata, else ``__version__``."""
    from importlib import metadata

    for dist in api.dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    v = getattr(module, "__version__", None) if module is not None else None
    return v if isinstance(v, str) and v != "0.0.0" else None


@functools.lru_cache(maxsize=64)  # asked per call (paged, lse): inspect costs ~100 us
def _params(fn: Any) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()


_NEEDS = {
    "fa4": (("flash_attn_func", {"softmax_scale", "causal", "return_lse"}),
            ("flash_attn_varlen_func", {"seqused_k", "softmax_scale", "causal", "return_lse"})),
    "fa3": (("flash_attn_func", {"softmax_scale", "causal"}),
            ("flash_attn_varlen_func", {"cu_seqlens_q", "cu_seqlens_k", "causal"})),
    "fa2": (("flash_attn_func", {"dropout_p", "softmax_scale", "causal", "return_attn_probs"}),
            ("flash_attn_varlen_func", {"cu_seqlens_q", "cu_seqlens_k", "max_seqlen_k",
                                        "dropout_p", "return_attn_probs"})),
}


def _signature_reasons(api: FlashApi, module: ModuleType) -> list[str]:
    out = []
    for fname, need in _NEEDS[api.key]:
        fn = getattr(module, fname, None)
        if fn is None:
            out.append(f"{api.module}.{fname} is missing")
            continue
        params = _params(fn)
        if params and not need <= params:  # no signature (C function): trust it
            out.append(f"{api.module}.{fname} takes no {', '.join(sorted(need - params))}; "
                       "this version is not supported")
    return out


def _cc_reasons(api: FlashApi, cc: CC) -> list[str]:
    sm = f"sm{cc[0]}{cc[1]}"
    if api is FA4 and cc[0] not in (9, 10, 11):
        return [f"compute capability {sm}; FA4 is used on sm90/sm100/sm110 "
                "(its backward needs >= sm90)"]
    if api is FA3 and cc[0] != 9:
        return [f"compute capability {sm}; FA3 allowed: sm90 (Hopper)"]
    if api is FA2 and cc < (8, 0):
        return [f"compute capability {sm}; FA2 allowed: >= sm80"]
    return []


def _fa2_version_reasons(module: ModuleType) -> list[str]:
    v = version(FA2, module)
    if v is None:
        return []
    try:
        from packaging.version import Version

        too_old = Version(v) < Version("2.1")
    except Exception:  # unparsable local version: trust it
        return []
    return [f"flash-attn {v} aligns causal to the top-left; allowed: >= 2.1 (bottom-right)"] \
        if too_old else []


def device_reasons(api: FlashApi, module: ModuleType, cc: CC) -> list[str]:
    """Why an imported ``api`` cannot run on a device of compute capability ``cc``."""
    out = _signature_reasons(api, module) + _cc_reasons(api, cc)
    if api is FA2:
        out += _fa2_version_reasons(module)
    return out


def _fa4_call_reasons(spec: CallSpec, cc: CC) -> list[str]:
    out = []
    d, dv = spec.head_dim, spec.head_dim_v
    if spec.dropout:
        out.append("dropout_p > 0; FA4 has no dropout")
    if spec.sinks and spec.requires_grad and cc[0] not in (9, 10, 11):
        out.append(f"gradients with sinks on sm{cc[0]}{cc[1]}; FA4's learnable_sink backward "
                   "needs sm90/sm100/sm110")
    if cc[0] == 9 and not (8 <= min(d, dv) and max(d, dv) <= 256):
        out.append(f"head dims (D={d}, Dv={dv}) on sm90; FA4 allowed: 8..256")
    elif cc[0] != 9 and not ((8 <= min(d, dv) and max(d, dv) <= 128)
                             or (d, dv) in ((192, 128), (256, 256))):
        out.append(f"head dims (D={d}, Dv={dv}) on sm{cc[0]}{cc[1]}; FA4 allowed: "
                   "both 8..128, or (192, 128), or (256, 256)")
    return out


def _structured_reasons(label: str, spec: CallSpec) -> list[str]:
    """FA3/FA2: window, softcap and sinks are taken on the FA4 path only."""
    out = []
    if spec.window is not None:
        out.append(f"window={spec.window}; the {label} path takes no window (FA4 does)")
    if spec.softcap is not None:
        out.append(f"softcap={spec.softcap}; the {label} path takes no softcap (FA4 does)")
    if spec.sinks:
        out.append(f"sinks given; the {label} path has no attention sinks (FA4 does: "
                   "learnable_sink)")
    return out


def _fa3_call_reasons(spec: CallSpec, cc: CC) -> list[str]:
    out = _structured_reasons("FA3", spec)
    if spec.dropout:
        out.append("dropout_p > 0; FA3 has no dropout")
    if spec.head_dim != spec.head_dim_v:
        out.append(f"head_dim_v={spec.head_dim_v} != head_dim={spec.head_dim}; "
                   "FA3 path allowed: equal head dims")
    return out


def _fa2_call_reasons(spec: CallSpec, cc: CC) -> list[str]:
    out = _structured_reasons("FA2", spec)
    d = spec.head_dim
    if d != spec.head_dim_v:
        out.append(f"head_dim_v={spec.head_dim_v} != head_dim={d}; FA2 allowed: equal head dims")
    if spec.return_lse and spec.dropout:
        out.append("return_lse=True with dropout_p > 0; FA2 returns the LSE only through "
                   "return_attn_probs, which then materialises the (B, H, Sq, Sk) probabilities")
    if (spec.requires_grad and d > 192 and cc not in ((8, 0), (9, 0))
            and (d <= 224 or spec.dropout)):
        out.append(f"gradients at head dim {d} on sm{cc[0]}{cc[1]}; FA2's backward for "
                   "head dim 224, or 256 with dropout, needs sm80/sm90")
    return out


def call_reasons(api: FlashApi, spec: CallSpec, cc: CC) -> list[str]:
    """Why ``api`` cannot take the call ``spec`` on compute capability ``cc``."""
    fn = {"fa4": _fa4_call_reasons, "fa3": _fa3_call_reasons, "fa2": _fa2_call_reasons}
    if spec.paged and api is not FA4:
        return [f"paged KV cache; the {api.label} path takes no page table (FA4 does)"]
    return fn[api.key](spec, cc)


#: Compute capability majors whose FA4 kernels take a page table (sm80/sm120
#: assert ``page_table is None``); any block size there (a block of the kernel's
#: key tile size loads by TMA, any other by cp.async).
FA4_PAGED_MAJORS = (9, 10, 11)


def paged_reasons(module: ModuleType, spec: CallSpec, cc: CC) -> list[str]:
    """Why FA4 (``module``) cannot take the paged call ``spec``."""
    out = []
    if cc[0] not in FA4_PAGED_MAJORS:
        out.append(f"paged KV cache on sm{cc[0]}{cc[1]}; FA4 allowed: sm90/sm100/sm110")
    if "page_table" not in _params(getattr(module, "flash_attn_varlen_func", None)):
        out.append("this FA4 build's flash_attn_varlen_func takes no page_table")
    return out


def call_paged(mod: ModuleType, q: Tensor, k_cache: Tensor, v_cache: Tensor,
               block_table: Tensor, cache_seqlens: Tensor, *, causal: bool, scale: float,
               need_lse: bool, fa4_kw: Optional[dict[str, Any]] = None
               ) -> tuple[Tensor, Optional[Tensor]]:
    """FA4 over a paged cache: q (B, Sq, Hq, D), caches (num_blocks, block_size,
    Hkv, D|Dv), ``page_table`` = block_table (B, max_blocks) int32 and
    ``seqused_k`` = cache_seqlens (causal and window bottom-right per row).
    One split (FA4 has no split-KV with a page table on sm90).  Returns out
    (B, Sq, Hq, Dv) and FA4's lse or None."""
    fn = mod.flash_attn_varlen_func
    extra = {"num_splits": 1} if "num_splits" in _params(fn) else {}
    return _split(fn(q, k_cache, v_cache, seqused_k=cache_seqlens, page_table=block_table,
                     softmax_scale=scale, causal=causal, return_lse=need_lse,
                     **extra, **(fa4_kw or {})))
def deterministic_reasons(api: FlashApi, mod: ModuleType, spec: CallSpec, cc: CC
                          ) -> list[str]:
    """Why ``api`` cannot give ``spec`` a deterministic backward (only asked
    under deterministic=True with gradients): its functions take no
    ``deterministic=`` (older releases), or FA4 on a device other than sm100/sm110
    (its backward asserts ``deterministic is False`` there)."""
    if not (spec.deterministic and spec.requires_grad):
        return []
    names = ("flash_attn_func", "flash_attn_varlen_func")
    if any("deterministic" not in _params(getattr(mod, n, None)) for n in names):
        return ["deterministic=True with gradients; this release's functions take no "
                "deterministic= (its backward accumulates dQ with atomics)"]
    if api is FA4 and cc[0] not in (10, 11):
        return [f"deterministic=True with gradients on sm{cc[0]}{cc[1]}; FA4's deterministic "
                "backward runs on sm100/sm110 only"]
    return []


#: The CuTe DSL's multi-line UserWarning when FA4 compiles a kernel whose
#: arguments include aux_data ("Argument aux_data (position 17) cannot be
#: converted to a JitArgument ..."): it is FA4's own business, not the user's.
FA4_COMPILE_WARNING = r".*cannot be converted to a JitArgument"


@contextmanager
def quiet_fa4_compile() -> Iterator[None]:
    """Hide FA4's compile-time CuTe DSL warning (:data:`FA4_COMPILE_WARNING`)
    inside the block, and only that warning.  Used around the first call of a
    signature (when FA4 compiles), never around every call: ``catch_warnings``
    swaps the process's warning filters while the block runs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FA4_COMPILE_WARNING, category=UserWarning)
        yield


def _split(res: Any) -> tuple[Tensor, Optional[Tensor]]:
    """A kernel's result (out, or a tuple starting with out, lse) -> (out, lse)."""
    if isinstance(res, (tuple, list)):
        return res[0], (res[1] if len(res) > 1 else None)
    return res, None


def _fa3_lse_kwargs(fn: Any, need_lse: bool) -> dict[str, Any]:
    return {"return_attn_probs": True} if need_lse and "return_attn_probs" in _params(fn) else {}


def fa4_structured(window: Optional[tuple[int, int]], softcap: Optional[float],
                   sinks: Optional[Tensor] = None) -> dict[str, Any]:
    """FA4 keyword arguments for the contract's window, softcap and sinks.

    Sinks are FA4's ``learnable_sink`` ((Hq,) natural-log logits, not scaled;
    its lse includes them, and its backward returns their gradient on sm90+).

    The contract's -1 (unbounded side) is FA4's None; FA4 aligns the window
    bottom-right (j - (i + Sk - Sq) in [-left, right]) as the contract does,
    and with causal caps the right side at 0, as the contract does.
    """
    kw: dict[str, Any] = {}
    if window is not None:
        kw["window_size"] = tuple(None if w < 0 else w for w in window)
    if softcap is not None:
        kw["softcap"] = softcap
    if sinks is not None:
        kw["learnable_sink"] = sinks
    return kw


def _det(deterministic: bool) -> dict[str, Any]:
    """``deterministic=True`` only when asked (older releases lack the keyword)."""
    return {"deterministic": True} if deterministic else {}


def call_dense(api: FlashApi, mod: ModuleType, q: Tensor, k: Tensor, v: Tensor, *,
               causal: bool, dropout_p: float, scale: float, need_lse: bool,
               fa4_kw: Optional[dict[str, Any]] = None, deterministic: bool = False
               ) -> tuple[Tensor, Optional[Tensor]]:
    """Run ``api`` on bshd q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv).

    ``fa4_kw``: window / softcap arguments (FA4 only; see :func:`fa4_structured`).
    ``deterministic``: the kernel's deterministic backward.
    Returns out (B, Sq, Hq, Dv) and the kernel's lse (B, Hq, Sq) or None.
    """
    fn = mod.flash_attn_func
    if api is FA4:
        return _split(fn(q, k, v, softmax_scale=scale, causal=causal, return_lse=need_lse,
                         **(fa4_kw or {}), **_det(deterministic)))
    if api is FA3:
        return _split(fn(q, k, v, softmax_scale=scale, causal=causal,
                         **_fa3_lse_kwargs(fn, need_lse), **_det(deterministic)))
    return _split(fn(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal,
                     return_attn_probs=need_lse, **_det(deterministic)))


def call_seqused(mod: ModuleType, q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, *,
                 causal: bool, scale: float, need_lse: bool,
                 fa4_kw: Optional[dict[str, Any]] = None, deterministic: bool = False
                 ) -> tuple[Tensor, Optional[Tensor]]:
    """FA4 with key lengths: bshd q, k/v whose first ``lengths[b]`` keys are real.

    ``fa4_kw``: softcap only (a window would be aligned to each row's real key
    count; the backend refuses window with key padding).
    Returns out (B, Sq, Hq, Dv) and lse (B, Hq, Sq) or None.
    """
    return _split(mod.flash_attn_varlen_func(q, k, v, seqused_k=lengths, softmax_scale=scale,
                                             causal=causal, return_lse=need_lse,
                                             **(fa4_kw or {}), **_det(deterministic)))


def call_varlen(api: FlashApi, mod: ModuleType, q: Tensor, k: Tensor, v: Tensor,
                cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, *, causal: bool,
                dropout_p: float, scale: float, need_lse: bool, deterministic: bool = False
                ) -> tuple[Tensor, Optional[Tensor]]:
    """FA3/FA2 varlen: packed q (total_q, Hq, D), k/v (total_k, Hkv, D|Dv).

    Returns out (total_q, Hq, Dv) and lse (Hq, total_q) (older FA2: (B, Hq, max_q)) or None.
    """
    fn = mod.flash_attn_varlen_func
    if api is FA3:
        return _split(fn(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal,
                         **_fa3_lse_kwargs(fn, need_lse), **_det(deterministic)))
    return _split(fn(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p,
                     softmax_scale=scale, causal=causal, return_attn_probs=need_lse,
                     **_det(deterministic)))
