"""Input validation and the call signature (:class:`CallSpec`).

:func:`validate` checks every argument of :func:`attention_dispatch.attention`
and returns a :class:`CallSpec`, the hashable description of the call that
capability checks read.  Nothing here runs a kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch

from .errors import AttentionInputError, AttentionTypeError

LAYOUTS = ("bhsd", "bshd")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class CallSpec:
    """What a backend needs to know to accept or refuse a call.

    Shapes are given in the contract's terms whatever the layout:
    q (batch, heads_q, seq_q, head_dim), k (batch, heads_kv, seq_k, head_dim),
    v (batch, heads_kv, seq_k, head_dim_v).
    ``mask_kind`` is "none", "bool" or "float".

    Structured attention (see docs/structured.md): ``window`` is the sliding
    window (left, right) in keys, -1 = unbounded on that side, None = no window
    ((-1, -1) is normalised to None); ``softcap`` the tanh cap of the scores
    (None = off; 0 is normalised to None); ``alibi`` whether ALiBi slopes were
    given (the tensor itself reaches ``Backend.forward`` as ``alibi_slopes=``).
    ``sinks``: attention sinks were given (one logit per query head, a virtual
    key with a zero value in every row's softmax; ``Backend.forward`` gets the
    (Hq,) tensor as ``sinks=``).
    ``varlen``: a packed variable-length call (:func:`attention_varlen`); then
    ``batch`` is the number of sequences and ``seq_q``/``seq_k`` are
    ``max_seqlen_q``/``max_seqlen_k``; the causal offset is per sequence.
    ``paged``: a paged KV-cache call (:func:`attention_paged`); then ``seq_k``
    is the block table's capacity (max_blocks * block_size), ``block_size``
    the cache's block size, and each row's length, causal offset and window
    come from ``cache_seqlens`` (per row, bottom-right).

    Policies (see docs/selection.md, resolved before validation):
    ``deterministic`` only backends whose forward (and, with
    ``requires_grad``, backward) is deterministic may run the call;
    ``max_extra_bytes`` the most extra memory the chosen path may allocate
    (None = no limit).
    """

    device_type: str
    device_index: Optional[int]
    dtype: torch.dtype
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    head_dim: int
    head_dim_v: int
    layout: str = "bhsd"
    mask_kind: str = "none"
    key_padding: bool = False
    causal: bool = False
    dropout: bool = False
    return_lse: bool = False
    requires_grad: bool = False
    mask_grad: bool = False  # a float mask that needs a gradient (a learned bias)
    window: Optional[tuple[int, int]] = None
    softcap: Optional[float] = None
    alibi: bool = False
    varlen: bool = False
    paged: bool = False
    block_size: int = 0  # the KV cache's block size (paged calls), else 0
    sinks: bool = False
    deterministic: bool = False
    max_extra_bytes: Optional[int] = None

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type, self.device_index)

    @property
    def gqa(self) -> bool:
        """True when several query heads share a key/value head."""
        return self.heads_q != self.heads_kv

    @property
    def may_have_empty_rows(self) -> bool:
        """Whether some query row could have no key it may attend."""
        return (
            self.mask_kind != "none"
            or self.key_padding
            or self.varlen
            or (self.causal and self.seq_q > self.seq_k)
            or (self.window is not None
                and window_has_empty_rows(self.seq_q, self.seq_k, self.window, self.causal))
        )

    @property
    def causal_offset(self) -> int:
        """Bottom-right causal: query i sees key j iff j <= i + causal_offset."""
        return self.seq_k - self.seq_q


class CallOptions(NamedTuple):
    """Everything a call says besides q, k, v and the backend selection: the one
    object that carries a call's options from the public functions
    (:func:`~attention_dispatch.attention`, ``explain``, ``attention_varlen``)
    through validation, the decision cache, torch.compile's constant key and
    the fallback path to the adapters.

    Tensor options come first (the cache key holds their shape, strides,
    dtype, device and ``requires_grad``; see :data:`TENSOR_OPTIONS`), then the
    scalar options (the key holds their value and type).  The policies
    (``deterministic``, ``max_extra_bytes``) are scalars too: the public
    functions store the effective values (argument > ``use_policy`` >
    environment, see :mod:`.policy`), so a call under another policy is
    decided again.  Tensors beyond
    ``mask`` and ``key_padding_mask`` reach ``Backend.forward`` as keywords of
    the same name, only when given.  Adding an option: a field here, its check
    in :func:`validate` / :func:`structured_fields` (and a :class:`CallSpec`
    field when capability checks need it), the public signatures, the
    adapters that implement it, the reference, docs and tests.
    """

    mask: Optional[torch.Tensor] = None
    key_padding_mask: Optional[torch.Tensor] = None
    alibi_slopes: Optional[torch.Tensor] = None
    sinks: Optional[torch.Tensor] = None
    causal: bool = False
    dropout_p: float = 0.0
    scale: Optional[float] = None
    layout: str = "bhsd"
    return_lse: bool = False
    window: Optional[tuple[int, int]] = None
    softcap: Optional[float] = None
    deterministic: Optional[bool] = None
    max_extra_bytes: Optional[int] = None


#: CallOptions' first fields are tensors (or None).
TENSOR_OPTIONS = 4
#: Tensor options passed to ``Backend.forward`` as keywords when given.
KEYWORD_TENSORS = CallOptions._fields[2:TENSOR_OPTIONS]


def effective_scale(scale: Optional[float], head_dim: int) -> float:
    """The score scale a call runs with: ``scale``, else 1 / sqrt(head_dim)."""
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


def tensor_meta(t: Any) -> Any:
    """What the decision cache keys on for a tensor option (None stays None)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.requires_grad)


def options_key(o: CallOptions) -> tuple:
    """The part of the decision cache key that comes from the options (raises
    TypeError / AttributeError for values that are not hashable or not tensors)."""
    scalars = o[TENSOR_OPTIONS:]
    return (*map(tensor_meta, o[:TENSOR_OPTIONS]), scalars, tuple(map(type, scalars)))


def keyword_tensors(o: CallOptions) -> dict[str, torch.Tensor]:
    """The tensor options ``Backend.forward`` gets as keywords (those given)."""
    if o[2] is None and o[3] is None:  # the common case
        return {}
    return {n: t for n, t in zip(KEYWORD_TENSORS, o[2:TENSOR_OPTIONS]) if t is not None}


#: Per-call features added to the contract later, by name: (whether a call uses
#: it, what the refusal says).  A backend takes a call that uses one only if
#: its ``Capabilities.extras`` names it, so a new option needs no new
#: capability field and no new check.
EXTRA_FEATURES: dict[str, tuple[Callable[["CallSpec"], bool], str]] = {
    "paged": (lambda s: s.paged,
              "paged KV cache call; allowed: dense K/V (attention_paged gathers the used "
              "blocks to a dense batch for this kernel)"),
    "sinks": (lambda spec: spec.sinks,
              "sinks given (one extra softmax logit per query head); this kernel has no "
              "attention sinks"),
}


def window_has_empty_rows(seq_q: int, seq_k: int, window: tuple[int, int],
                          causal: bool) -> bool:
    """Whether some query row of a windowed call has no key inside its window.

    Row i may attend j in [i + off - left, i + off + right] (off = Sk - Sq; a
    bound of -1 is open; causal caps the right bound at 0).  Both bounds grow
    with i, so only the first row's right bound and the last row's left bound
    can leave [0, Sk).
    """
    if seq_q == 0:
        return False
    if seq_k == 0:
        return True
    left, right = window
    off = seq_k - seq_q
    if causal:
        right = 0 if right < 0 else min(right, 0)
    first_hi_before_keys = right >= 0 and off + right < 0
    last_lo_after_keys = left >= 0 and (seq_q - 1) + off - left > seq_k - 1
    return first_hi_before_keys or last_lo_after_keys


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_tensor(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise AttentionTypeError(name, "a torch.Tensor", type(t).__name__)
    if t.dim() != 4:
        raise AttentionInputError(
            name, "a 4-D tensor", f"{t.dim()}-D tensor of shape {_shape(t)}"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise AttentionTypeError(
            name, "a floating dtype (float16, bfloat16, float32, float64)", str(t.dtype)
        )


def _to_bhsd(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    b, x, y, d = t.shape
    return (b, x, y, d) if layout == "bhsd" else (b, y, x, d)


def _check_qkv(q: Any, k: Any, v: Any, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise AttentionTypeError(name, f"dtype {q.dtype} (as q)", str(t.dtype),
                                     "cast q, k and v to one dtype")
        if t.device != q.device:
            raise AttentionInputError(name, f"device {q.device} (as q)", str(t.device),
                                      "move q, k and v to one device")
    names = "(B, H, S, D)" if layout == "bhsd" else "(B, S, H, D)"
    B, Hq, Sq, D = _to_bhsd(q, layout)
    _, Hkv, Sk, Dk = _to_bhsd(k, layout)
    vb, vh, vs, _ = _to_bhsd(v, layout)
    if k.shape[0] != B or v.shape[0] != B:
        raise AttentionInputError("k", f"batch size {B} (as q)",
                                  f"k {_shape(k)}, v {_shape(v)}")
    if Dk != D:
        raise AttentionInputError("k", f"head dim {D} (as q's last axis)", f"{Dk}")
    if (vh, vs) != (Hkv, Sk):
        raise AttentionInputError("v", f"heads and sequence of k, {names} with H={Hkv}, S={Sk}",
                                  f"shape {_shape(v)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise AttentionInputError("k", f"a number of heads dividing q's {Hq} (GQA/MQA)",
                                  f"{Hkv} heads")
    if D == 0:
        raise AttentionInputError("q", "head dim >= 1", "0")


def _check_mask(mask: Any, b: int, h: int, sq: int, sk: int, device: torch.device,
                dtype: torch.dtype) -> str:
    if mask is None:
        return "none"
    if not isinstance(mask, torch.Tensor):
        raise AttentionTypeError("mask", "a bool or float torch.Tensor or None", type(mask).__name__)
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise AttentionTypeError("mask", "dtype bool (True = may attend) or a float dtype (added to scores)",
                                 str(mask.dtype))
    full = (b, h, sq, sk)
    ok = 2 <= mask.dim() <= 4 and all(
        m in (1, f) for m, f in zip(reversed(mask.shape), reversed(full))
    )
    if not ok:
        raise AttentionInputError(
            "mask", f"a shape broadcastable to (B, Hq, Sq, Sk) = {full}", _shape(mask),
            "for a (B, Sk) padding mask pass key_padding_mask=")
    if mask.device != device:
        raise AttentionInputError("mask", f"device {device} (as q)", str(mask.device))
    return "bool" if mask.dtype == torch.bool else "float"


def _check_kpm(kpm: Any, b: int, sk: int, device: torch.device) -> bool:
    if kpm is None:
        return False
    if not isinstance(kpm, torch.Tensor):
        raise AttentionTypeError("key_padding_mask", "a bool torch.Tensor of shape (B, Sk) or None",
                                 type(kpm).__name__)
    if kpm.dtype != torch.bool:
        raise AttentionTypeError("key_padding_mask", "dtype torch.bool (True = real key)",
                                 str(kpm.dtype), "use key_padding_mask.bool()")
    if tuple(kpm.shape) != (b, sk):
        raise AttentionInputError("key_padding_mask", f"shape (B, Sk) = ({b}, {sk})", _shape(kpm))
    if kpm.device != device:
        raise AttentionInputError("key_padding_mask", f"device {device} (as q)", str(kpm.device))
    return True


def _check_scalars(causal: Any, dropout_p: Any, scale: Any, return_lse: Any) -> None:
    if not isinstance(causal, bool):
        raise AttentionTypeError("causal", "a bool", type(causal).__name__)
    if not isinstance(return_lse, bool):
        raise AttentionTypeError("return_lse", "a bool", type(return_lse).__name__)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise AttentionTypeError("dropout_p", "a float in [0, 1)", type(dropout_p).__name__)
    if not 0.0 <= dropout_p < 1.0:
        raise AttentionInputError("dropout_p", "a float in [0, 1)", repr(dropout_p))
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise AttentionTypeError("scale", "a finite float or None", type(scale).__name__)
        if not math.isfinite(scale):
            raise AttentionInputError("scale", "a finite float or None", repr(scale))


def check_window(window: Any) -> Optional[tuple[int, int]]:
    """``window`` -> (left, right) ints >= -1, or None for no window.

    (-1, -1) (unbounded on both sides) is no window and gives None.
    """
    if window is None:
        return None
    expected = "None or a (left, right) pair of ints >= -1 (-1 = unbounded)"
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise AttentionTypeError("window", expected, repr(window))
    if any(isinstance(w, bool) or not isinstance(w, int) for w in window):
        raise AttentionTypeError("window", expected, repr(window))
    left, right = int(window[0]), int(window[1])
    if left < -1 or right < -1:
        raise AttentionInputError("window", expected, repr(window),
                                  "use -1 for an unbounded side")
    return None if (left, right) == (-1, -1) else (left, right)


def check_softcap(softcap: Any) -> Optional[float]:
    """``softcap`` -> a finite float > 0, or None (None and 0 mean off)."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise AttentionTypeError("softcap", "None or a finite float > 0", type(softcap).__name__)
    if not math.isfinite(softcap) or softcap < 0:
        raise AttentionInputError("softcap", "None or a finite float > 0 (0 = off)",
                                  repr(softcap))
    return float(softcap) if softcap > 0 else None


def check_alibi(slopes: Any, batch: int, heads_q: int, device: torch.device) -> bool:
    """Check ``alibi_slopes``: float32 (Hq,) or (B, Hq) on q's device, constant."""
    if slopes is None:
        return False
    if not isinstance(slopes, torch.Tensor):
        raise AttentionTypeError("alibi_slopes", "a float32 torch.Tensor of shape (Hq,) or "
                                 "(B, Hq), or None", type(slopes).__name__)
    if slopes.dtype != torch.float32:
        raise AttentionTypeError("alibi_slopes", "dtype torch.float32", str(slopes.dtype),
                                 "use alibi_slopes.float()")
    if tuple(slopes.shape) not in ((heads_q,), (batch, heads_q)):
        raise AttentionInputError("alibi_slopes", f"shape (Hq,) = ({heads_q},) or (B, Hq) = "
                                  f"({batch}, {heads_q})", _shape(slopes))
    if slopes.device != device:
        raise AttentionInputError("alibi_slopes", f"device {device} (as q)", str(slopes.device))
    if slopes.requires_grad and torch.is_grad_enabled():
        raise AttentionInputError("alibi_slopes", "constant slopes (no gradient flows to "
                                  "them)", "a tensor that requires grad",
                                  "pass alibi_slopes.detach()")
    return True


def check_sinks(sinks: Any, heads_q: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Check ``sinks``: (Hq,) float32 or q's dtype, on q's device (it may need a
    gradient).  True when given."""
    if sinks is None:
        return False
    expected = f"a float torch.Tensor of shape (Hq,) = ({heads_q},), or None"
    if not isinstance(sinks, torch.Tensor):
        raise AttentionTypeError("sinks", expected, type(sinks).__name__)
    if sinks.dtype not in (torch.float32, dtype):
        raise AttentionTypeError("sinks", f"dtype torch.float32 or q's dtype ({dtype})",
                                 str(sinks.dtype), "use sinks.float()")
    if tuple(sinks.shape) != (heads_q,):
        raise AttentionInputError("sinks", f"shape (Hq,) = ({heads_q},): one logit per "
                                  "query head", _shape(sinks))
    if sinks.device != device:
        raise AttentionInputError("sinks", f"device {device} (as q)", str(sinks.device))
    return True


def sinks_grad(o: CallOptions) -> bool:
    """Whether the call's sinks need a gradient (grad mode on)."""
    return (isinstance(o.sinks, torch.Tensor) and o.sinks.requires_grad
            and torch.is_grad_enabled())


def validate(q: Any, k: Any, v: Any, options: Optional[CallOptions] = None,
             **kwargs: Any) -> CallSpec:
    """Check every argument of an attention call and describe it.

    ``options`` is the call's :class:`CallOptions`; or pass the options as
    keywords (``validate(q, k, v, causal=True)``).

    Raises:
        AttentionInputError / AttentionTypeError: naming the argument, the
            expected value and what came.
    """
    o = CallOptions(**kwargs) if options is None else options
    if o.layout not in LAYOUTS:
        raise AttentionInputError("layout", "'bhsd' or 'bshd'", repr(o.layout))
    _check_qkv(q, k, v, o.layout)
    _check_scalars(o.causal, o.dropout_p, o.scale, o.return_lse)
    B, Hq, Sq, D = _to_bhsd(q, o.layout)
    _, Hkv, Sk, _ = _to_bhsd(k, o.layout)
    mask_kind = _check_mask(o.mask, B, Hq, Sq, Sk, q.device, q.dtype)
    kpm = _check_kpm(o.key_padding_mask, B, Sk, q.device)
    mask_grad = o.mask is not None and o.mask.requires_grad
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or mask_grad) or sinks_grad(o)
    return CallSpec(
        device_type=q.device.type, device_index=q.device.index, dtype=q.dtype,
        batch=B, heads_q=Hq, heads_kv=Hkv, seq_q=Sq, seq_k=Sk, head_dim=D,
        head_dim_v=v.shape[-1], layout=o.layout, mask_kind=mask_kind, key_padding=kpm,
        requires_grad=grad, mask_grad=grad and mask_grad,
        **structured_fields(o, B, Hq, q.device, q.dtype),
    )


def check_deterministic(value: Any, argument: str = "deterministic") -> Optional[bool]:
    """``deterministic``: True, False or None (None = no constraint given)."""
    if value is not None and not isinstance(value, bool):
        raise AttentionTypeError(argument, "True, False or None", repr(value))
    return value


def check_max_extra_bytes(value: Any, argument: str = "max_extra_bytes") -> Optional[int]:
    """``max_extra_bytes``: an int >= 0 (bytes) or None (no limit)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise AttentionTypeError(argument, "an int >= 0 (bytes) or None", repr(value))
    if value < 0:
        raise AttentionInputError(argument, "an int >= 0 (bytes) or None", repr(value))
    return value


def structured_fields(o: CallOptions, batch: int, heads_q: int, device: torch.device,
                      dtype: torch.dtype) -> dict[str, Any]:
    """The :class:`CallSpec` fields of the options every entry point shares
    (dense and packed calls), checked: causal, dropout, lse, window, softcap,
    ALiBi, sinks, and the policies (``deterministic``, ``max_extra_bytes``)."""
    return dict(causal=o.causal, dropout=o.dropout_p > 0, return_lse=o.return_lse,
                window=check_window(o.window), softcap=check_softcap(o.softcap),
                alibi=check_alibi(o.alibi_slopes, batch, heads_q, device),
                sinks=check_sinks(o.sinks, heads_q, dtype, device),
                deterministic=bool(check_deterministic(o.deterministic)),
                max_extra_bytes=check_max_extra_bytes(o.max_extra_bytes))
