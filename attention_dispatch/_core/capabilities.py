"""Capabilities as data, and the one generic checker that turns them into reasons.

Each backend declares a frozen :class:`Capabilities`; :func:`capability_reasons`
compares it with a :class:`~attention_dispatch._core.spec.CallSpec` and returns one
string per unsupported feature, stating the actual and the allowed value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .layout import UNIT_LAST_STRIDE, StrideRequirements
from .spec import EXTRA_FEATURES, CallSpec

_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype))


@dataclass(frozen=True)
class Capabilities:
    """What a kernel can do, declared once per backend class.

    Attributes:
        device_types: device types it runs on ("cpu", "cuda", ...).
        dtypes: accepted input dtypes.
        max_head_dim: largest head dim (q/k and v).
        head_dim_multiple: head dims must be a multiple of this.
        head_dims: if set, the only head dims accepted.
        different_v_head_dim: accepts Dv != D.
        min_compute_capability / max_compute_capability: CUDA (major, minor) range.
        mask_kinds: subset of {"bool", "float"}: dense masks it can take.
        key_padding: accepts key_padding_mask.
        causal: accepts causal=True (bottom-right, any Sq/Sk).
        dropout: applies dropout_p > 0.
        lse: can return the log-sum-exp.
        gqa: accepts Hq != Hkv.
        backward: gradients flow through it.
        native_layout: the axis order ("bhsd"/"bshd") the kernel reads without
            a copy; a tensor that must be copied (``strides``) is copied into it.
        strides: what the kernel needs of the memory of q, k, v and a dense
            mask (unit last stride, aligned strides and pointers, stride-0
            axes); the dispatcher copies the tensors that break it, and only
            those.  Default: a unit last stride.  See ``_layout``.
        padded_keys_unread: the kernel never reads the key/value slots that
            ``key_padding_mask`` excludes (it takes lengths, e.g. ``seqused_k``);
            if False, the dispatcher zeroes those slots in one masked copy of
            K and V first, so NaN or Inf stored there cannot reach the result.
        empty_rows_exact: output 0 / lse -inf for rows with no allowed key
            without help; if False the dispatcher restores that after the call.
        window: sliding windows (``spec.window``, with or without causal).
        softcap: ``softcap * tanh(scores / softcap)`` (``spec.softcap``).
        alibi: ALiBi slopes (``spec.alibi``; ``forward`` gets ``alibi_slopes=``).
        extras: names of the later per-call features (``spec.EXTRA_FEATURES``)
            the kernel implements; a call using any other one is refused.
        deterministic_forward / deterministic_backward: the forward (the
            backward) gives bitwise identical results for identical inputs on
            one device (no atomics, no split reductions whose order varies).
            Read by the ``deterministic=True`` policy (see docs/selection.md)
            through :meth:`Backend.determinism`; a backend whose answer depends
            on the device narrows it in ``capabilities_on``.  Default False:
            a kernel is not assumed deterministic until it says so.
        varlen: packed variable-length calls natively (``forward_varlen``);
            without it :func:`attention_varlen` pads to a dense batch.  A
            backend with ``varlen`` but without ``key_padding`` also takes dense
            key-padding calls whose result does not depend on key positions
            (no causal with Sq > 1, no window, no ALiBi, no dense mask): the
            dispatcher unpads the keys and calls ``forward_varlen``.

    The structured features default to False, so a backend that does not
    declare one refuses calls that use it, with a reason.
    """

    device_types: frozenset[str]
    dtypes: frozenset[torch.dtype]
    max_head_dim: int = 1 << 30
    head_dim_multiple: int = 1
    head_dims: Optional[frozenset[int]] = None
    different_v_head_dim: bool = True
    min_compute_capability: Optional[tuple[int, int]] = None
    max_compute_capability: Optional[tuple[int, int]] = None
    mask_kinds: frozenset[str] = field(default_factory=lambda: frozenset({"bool", "float"}))
    key_padding: bool = True
    causal: bool = True
    dropout: bool = True
    lse: bool = True
    gqa: bool = True
    backward: bool = True
    native_layout: str = "bhsd"
    strides: StrideRequirements = UNIT_LAST_STRIDE
    padded_keys_unread: bool = False
    empty_rows_exact: bool = False
    window: bool = False
    softcap: bool = False
    alibi: bool = False
    varlen: bool = False
    extras: frozenset[str] = frozenset()
    deterministic_forward: bool = False
    deterministic_backward: bool = False

    def features(self) -> list[str]:
        """The supported features by name ("causal", ..., "bool-mask")."""
        feats = [f for f in ("causal", "dropout", "lse", "gqa", "key_padding", "backward",
                             "window", "softcap", "alibi", "varlen") if getattr(self, f)]
        return feats + sorted(self.extras) + [f"{m}-mask" for m in sorted(self.mask_kinds)]

    def dtype_names(self) -> list[str]:
        """The accepted dtypes by name, sorted."""
        return [dtype_name(d) for d in sorted(self.dtypes, key=str)]

    def summary(self) -> str:
        """One line for tables: dtypes, head dims, features."""
        dims = f"D<={self.max_head_dim}" if self.max_head_dim < (1 << 30) else "any D"
        return f"{'/'.join(self.dtype_names())}; {dims}; {', '.join(self.features())}"


def _head_dim_reasons(c: Capabilities, spec: CallSpec) -> list[str]:
    out = []
    dims = {("head_dim", spec.head_dim), ("head_dim_v", spec.head_dim_v)}
    if spec.head_dim != spec.head_dim_v and not c.different_v_head_dim:
        out.append(f"head_dim_v={spec.head_dim_v} != head_dim={spec.head_dim}; "
                   "allowed: equal head dims for q/k and v")
    for name, d in sorted(dims):
        if d > c.max_head_dim:
            out.append(f"{name}={d}; allowed: <= {c.max_head_dim}")
        elif c.head_dims is not None and d not in c.head_dims:
            out.append(f"{name}={d}; allowed: {sorted(c.head_dims)}")
        elif d % c.head_dim_multiple:
            out.append(f"{name}={d}; allowed: multiples of {c.head_dim_multiple}")
    return out


def _feature_reasons(c: Capabilities, spec: CallSpec) -> list[str]:
    out = []
    if spec.mask_kind != "none" and spec.mask_kind not in c.mask_kinds:
        allowed = "/".join(sorted(c.mask_kinds)) or "none"
        out.append(f"mask kind {spec.mask_kind}; allowed: {allowed}")
    checks = (
        (spec.key_padding, c.key_padding or (c.varlen and key_padding_as_varlen(spec)),
         "key_padding_mask given; not supported"),
        (spec.causal, c.causal, "causal=True; not supported"),
        (spec.dropout, c.dropout, "dropout_p > 0; this kernel cannot drop out"),
        (spec.return_lse, c.lse, "return_lse=True; this kernel does not return the LSE"),
        (spec.gqa, c.gqa, f"GQA (Hq={spec.heads_q}, Hkv={spec.heads_kv}); allowed: Hq == Hkv"),
        (spec.requires_grad, c.backward, "gradients needed; this kernel is forward-only"),
    )
    out.extend(msg for wanted, have, msg in checks if wanted and not have)
    return out + _structured_reasons(c, spec)


def _structured_reasons(c: Capabilities, spec: CallSpec) -> list[str]:
    """Reasons for window / softcap / ALiBi / varlen (the fields default to False)."""
    checks = (
        (spec.window is not None, c.window,
         f"window={spec.window}; allowed: no window (no sliding-window support)"),
        (spec.softcap is not None, c.softcap,
         f"softcap={spec.softcap}; allowed: no softcap"),
        (spec.alibi, c.alibi, "alibi_slopes given; allowed: no ALiBi"),
        (spec.varlen, c.varlen,
         "packed varlen call; allowed: dense batches (attention_varlen pads for this kernel)"),
    )
    out = [msg for wanted, have, msg in checks if wanted and not have]
    return out + [why for name, (used, why) in EXTRA_FEATURES.items()
                  if name not in c.extras and used(spec)]


def key_padding_as_varlen(spec: CallSpec) -> bool:
    """Whether a dense key-padding call equals the varlen call on the unpadded
    keys: nothing may depend on key positions (causal only with Sq <= 1, no
    window, no ALiBi, no dense mask), so dropping padded keys changes nothing."""
    return (spec.mask_kind == "none" and not spec.varlen and spec.window is None
            and not spec.alibi and (not spec.causal or spec.seq_q <= 1))


def capability_reasons(c: Capabilities, spec: CallSpec) -> list[str]:
    """Every reason ``c`` cannot take the call ``spec``; empty if it can."""
    out = []
    if spec.device_type not in c.device_types:
        out.append(f"device {spec.device_type}; allowed: {'/'.join(sorted(c.device_types))}")
    if spec.dtype not in c.dtypes:
        allowed = "/".join(dtype_name(d) for d in sorted(c.dtypes, key=str))
        out.append(f"dtype {dtype_name(spec.dtype)}; allowed: {allowed}")
    return out + _head_dim_reasons(c, spec) + _feature_reasons(c, spec)


def device_reasons(c: Capabilities, device: torch.device) -> list[str]:
    """Reasons the kernel cannot run on ``device`` at all (type, compute capability)."""
    if device.type not in c.device_types:
        return [f"device {device.type}; allowed: {'/'.join(sorted(c.device_types))}"]
    if device.type != "cuda":
        return []
    if not torch.cuda.is_available():
        return ["CUDA is not available in this torch build or machine"]
    cc = torch.cuda.get_device_capability(device)
    lo, hi = c.min_compute_capability, c.max_compute_capability
    if lo is not None and cc < lo:
        return [f"compute capability sm{cc[0]}{cc[1]}; allowed: >= sm{lo[0]}{lo[1]}"]
    if hi is not None and cc > hi:
        return [f"compute capability sm{cc[0]}{cc[1]}; allowed: <= sm{hi[0]}{hi[1]}"]
    return []
