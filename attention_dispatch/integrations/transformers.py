"""transformers: ``attn_implementation="attention_dispatch"``.

:func:`register` adds an attention function to transformers'
``AttentionInterface`` and a mask function to its ``AttentionMaskInterface``
under one name, so ``from_pretrained(..., attn_implementation=name)`` (or
``from_config``) runs every attention layer through
:func:`attention_dispatch.attention`.  Needs transformers >= 5.17.

The mask function does not build an ``(Sq, Sk)`` mask for the patterns
transformers' models use: it hands the attention function a
:class:`DispatchMask`, the same pattern in the contract's terms:

* padding (the 2-D ``attention_mask``) -> ``key_padding_mask``;
* causal -> bottom-right ``causal=True`` over the keys up to the last query
  (transformers' positions: query ``i`` is token ``q_offset + i``, key ``j``
  token ``kv_offset + j``; a static cache's unused tail is sliced off, a view);
* a sliding window of ``w`` tokens -> ``window=(w - 1, 0)``;
* decode on a static cache (Sq == 1, its position a tensor): the visible key
  slots as ``key_padding_mask`` (static shapes for ``torch.compile``, no sync).

Anything else (custom ``or``/``and`` mask functions, packed sequences, chunked
attention, a prefill under ``torch.compile`` on a static cache, and sliding
windows whose masks are built while ``torch.compile`` traces: the mask
function is then a closure dynamo cannot read) falls back to transformers' own
dense boolean mask, passed as ``mask=``, as transformers' sdpa integration
uses it there.  Softcapping
(Gemma 2) -> ``softcap=``; GQA is native (no ``repeat_kv``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

import attention_dispatch as ad

Tensor = torch.Tensor
MIN_VERSION = "5.17"


class DispatchMask:
    """The attention pattern of one layer type for one forward, without a
    dense mask.  transformers passes it through its models untouched.

    Attributes:
        key_padding_mask: bool (B, keys) (True = may attend) or None.
        keep: read only the first ``keep`` key slots (None = all of them).
        causal: bottom-right causal over the kept keys.
        window: ``(left, 0)`` sliding window or None.
        packed: for a left-padded causal prefill (query i is key slot i, each
            row's real tokens last): the real tokens' (batch, position) indices
            and ``cu_seqlens``, so the layer runs :func:`attention_varlen` on
            the real tokens only (see :class:`LeftPacked`); else None.

    Equivalent math (the kept keys, contract terms)::

        attention(q, k[:, :, :keep], v[:, :, :keep], key_padding_mask=key_padding_mask,
                  causal=causal, window=window)
    """

    ndim = 4  # transformers' mask pre-processing leaves non-2-D masks alone

    def __init__(self, key_padding_mask: Optional[Tensor], keep: Optional[int], causal: bool,
                 window: Optional[tuple[int, int]], packed: Optional["LeftPacked"] = None
                 ) -> None:
        self.key_padding_mask = key_padding_mask
        self.keep = keep
        self.causal = causal
        self.window = window
        self.packed = packed

    def contiguous(self) -> "DispatchMask":
        """generate() calls ``.contiguous()`` on prepared masks; nothing to do."""
        return self

    def __repr__(self) -> str:
        kpm = None if self.key_padding_mask is None else tuple(self.key_padding_mask.shape)
        return (f"DispatchMask(key_padding_mask={kpm}, keep={self.keep}, "
                f"causal={self.causal}, window={self.window})")


class LeftPacked:
    """The real tokens of a left-padded batch, for :func:`attention_varlen`.

    With every row's padding first and query i being key slot i, the dense
    call (key padding, bottom-right causal, a window) equals the packed call
    on the real tokens: a real query at i sees the real keys in
    [i - window, i] in both forms, and a padded query sees no key (output 0,
    which the unpacked output holds).  Only the real tokens are computed.

    Attributes:
        batch, pos: (T,) int64 batch row and position of each real token.
        cu_seqlens: (B + 1,) int32; max_len: the longest row.
    """

    def __init__(self, pad: Tensor) -> None:
        lengths = pad.sum(-1, dtype=torch.int32)
        self.batch, self.pos = pad.nonzero(as_tuple=True)  # row-major: rows back to back
        self.cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32),
                                                  (1, 0))
        self.max_len = int(lengths.max()) if lengths.numel() else 0

    @staticmethod
    def of(pad: Tensor) -> Optional["LeftPacked"]:
        """A LeftPacked when ``pad`` (B, S) is left padding (one host read), else None."""
        s = pad.shape[-1]
        lengths = pad.sum(-1, keepdim=True)
        left = torch.arange(s, device=pad.device)[None, :] >= s - lengths
        return LeftPacked(pad) if bool(torch.equal(left, pad)) else None


def _masking() -> Any:
    from transformers import masking_utils

    return masking_utils


def _cell(fn: Callable, name: str) -> Any:
    """The value a closure ``fn`` captured as ``name`` (None if it has none)."""
    names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
    if name not in names or fn.__closure__ is None:
        return None
    return fn.__closure__[names.index(name)].cell_contents


def _pattern(mask_function: Callable, local_size: Any) -> Optional[tuple[str, Optional[int]]]:
    """("causal" | "bidirectional" | "sliding", window) for the mask functions
    transformers builds without user overlays; None for anything else."""
    mu = _masking()
    if mask_function is mu.causal_mask_function:
        return "causal", None
    if mask_function is mu.bidirectional_mask_function:
        return "bidirectional", None
    if torch.compiler.is_compiling():  # closures made while tracing cannot be read
        return None
    if not isinstance(local_size, int) or getattr(mask_function, "__qualname__", "") \
            != "and_masks.<locals>.and_mask":
        return None
    parts = _cell(mask_function, "mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2 or parts[1] is not mu.causal_mask_function:
        return None
    overlay = parts[0]
    if getattr(overlay, "__qualname__", "") != "sliding_window_overlay.<locals>.inner_mask" \
            or _cell(overlay, "sliding_window") != local_size:
        return None
    return "sliding", local_size


def _padding(attention_mask: Optional[Tensor], kv_length: int, kv_offset: int,
             batch: int) -> Optional[Tensor]:
    """The 2-D padding mask for the key slots [kv_offset, kv_offset + kv_length):
    positions past its end are unused cache slots (False), as in transformers."""
    if attention_mask is None:
        return None
    pad = attention_mask.to(torch.bool)
    short = kv_offset + kv_length - pad.shape[-1]
    if short > 0:
        pad = torch.nn.functional.pad(pad, (0, short), value=False)
    return pad[:, kv_offset:kv_offset + kv_length].expand(batch, kv_length)


def _visible_keys(pad: Optional[Tensor], q_offset: Tensor, kv_length: int, kv_offset: int,
                  window: Optional[int], batch: int) -> Tensor:
    """One query at position ``q_offset`` (a tensor): its visible key slots as a
    (B, kv_length) key padding mask, with tensor ops only."""
    pos = torch.arange(kv_length, device=q_offset.device) + kv_offset
    seen = pos <= q_offset
    if window is not None:
        seen = seen & (pos > q_offset - window)
    seen = seen.unsqueeze(0).expand(batch, kv_length)
    return seen if pad is None else seen & pad.to(seen.device)


def _no_padding(pad: Optional[Tensor]) -> Optional[Tensor]:
    """None where every key is real (read once per forward, not while compiling)."""
    if pad is None or torch.compiler.is_compiling():
        return pad
    return None if bool(pad.all()) else pad


def _dense(mask_function: Callable, attention_mask: Any, **kwargs: Any) -> Tensor:
    """transformers' own (B, 1, Sq, Sk) bool mask: the exact fallback."""
    for skip in ("allow_is_causal_skip", "allow_is_bidirectional_skip"):
        kwargs.pop(skip, None)
    return _masking().sdpa_mask(mask_function=mask_function, attention_mask=attention_mask,
                                allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                                **kwargs)


def mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0,
                   kv_offset: int = 0, mask_function: Optional[Callable] = None,
                   attention_mask: Any = None, local_size: Optional[int] = None,
                   **kwargs: Any) -> Any:
    """transformers' mask-interface signature -> a :class:`DispatchMask`, or
    transformers' dense (B, 1, Sq, Sk) bool mask for patterns it cannot
    express exactly (see the module docstring).

    Equivalent math (what transformers' ``sdpa_mask`` materialises; ``w`` =
    ``local_size`` for sliding-window layers)::

        q_pos, kv_pos = q_offset + i, kv_offset + j
        allowed[b, i, j] = padding[b, kv_pos] & (kv_pos <= q_pos if causal)
                           & (q_pos - kv_pos < w if sliding)
    """
    if isinstance(attention_mask, DispatchMask):  # prepared by generate() for this step
        return attention_mask
    fn = _masking().causal_mask_function if mask_function is None else mask_function
    found = _pattern(fn, local_size)
    if found is not None and isinstance(q_offset, Tensor) and q_length > 1 \
            and not torch.compiler.is_compiling():
        q_offset = int(q_offset)  # a static cache's prefill: read the position once
    keep = None if isinstance(q_offset, Tensor) else q_offset + q_length - kv_offset
    if found is None or (keep is None and q_length > 1) or (
            keep is not None and found[0] != "bidirectional" and not 0 < keep <= kv_length):
        return _dense(fn, attention_mask, batch_size=batch_size, q_length=q_length,
                      kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                      local_size=local_size, **kwargs)
    kind, size = found
    pad = _padding(attention_mask, kv_length, kv_offset, batch_size)
    if kind == "bidirectional":
        return DispatchMask(_no_padding(pad), None, False, None)
    if keep is None:  # one query at a tensor position (static cache): static shapes, no sync
        return DispatchMask(_visible_keys(pad, q_offset, kv_length, kv_offset, size,
                                          batch_size), None, False, None)
    # keys up to the last query's position; bottom-right causal over them is exact
    if pad is not None:
        pad = _no_padding(pad[:, :keep])
    window = (size - 1, 0) if size is not None and keep > size else None
    packed = None
    if pad is not None and q_length > 1 and keep == q_length and \
            not torch.compiler.is_compiling():
        packed = LeftPacked.of(pad)
    return DispatchMask(pad, None if keep == kv_length else keep, q_length > 1, window, packed)


def _refuse(kwargs: dict[str, Any]) -> None:
    if kwargs.get("output_attentions"):
        raise ad.AttentionInputError(
            "output_attentions", "False (attention_dispatch computes no attention weights)",
            "True", "load the model with attn_implementation='eager' to get the weights")
    for name, what in (("position_bias", "T5-style position bias"),):
        if kwargs.get(name) is not None:
            raise ad.AttentionInputError(
                name, f"None ({what} are not part of the attention contract)", "a tensor",
                "use attn_implementation='eager' or 'sdpa' for this model")


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Any, dropout: float = 0.0,
                      scaling: Optional[float] = None, softcap: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention-function signature: q (B, Hq, Sq, D), k/v
    (B, Hkv, Sk, D) -> ((B, Sq, Hq, Dv) contiguous, None).

    ``attention_mask``: a :class:`DispatchMask` (from :func:`mask_interface`),
    a 4-D bool/float mask (passed as ``mask=``), or None: then causal is
    ``is_causal`` (or ``module.is_causal``) with torch's top-left alignment,
    as transformers' sdpa integration has it.

    Equivalent math (a DispatchMask ``m``)::

        k, v = key[:, :, :m.keep], value[:, :, :m.keep]          # all keys if keep is None
        out = attention(query, k, v, key_padding_mask=m.key_padding_mask, causal=m.causal,
                        window=m.window, softcap=softcap, scale=scaling, dropout_p=dropout,
                        sinks=s_aux)
        return out.transpose(1, 2).contiguous(), None

    Attention sinks (``s_aux``, gpt-oss: one logit per query head) are passed
    as ``sinks=``.

    Raises:
        AttentionInputError: ``output_attentions=True``, ``position_bias``, or a
            mask of another kind.
    """
    _refuse(kwargs)
    kw: dict[str, Any] = {"dropout_p": float(dropout), "scale": scaling, "softcap": softcap}
    if kwargs.get("s_aux") is not None:
        kw["sinks"] = kwargs["s_aux"]
    if isinstance(attention_mask, DispatchMask) and attention_mask.packed is not None:
        return _packed_forward(query, key, value, attention_mask, attention_mask.packed, kw), None
    if isinstance(attention_mask, DispatchMask):
        m = attention_mask
        if m.keep is not None:
            key, value = key[:, :, :m.keep], value[:, :, :m.keep]
        kw.update(key_padding_mask=m.key_padding_mask, causal=m.causal, window=m.window)
    elif attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        sq, sk = query.shape[2], key.shape[2]
        if causal and sq > 1 and sq <= sk:  # top-left: keys past Sq are never seen
            key, value = key[:, :, :sq], value[:, :, :sq]
            kw["causal"] = True
        elif causal and sq > 1:
            kw["window"] = (-1, sq - sk)
    elif isinstance(attention_mask, Tensor) and attention_mask.dim() == 4:
        kw["mask"] = attention_mask
    else:
        got = type(attention_mask).__name__
        if isinstance(attention_mask, Tensor):
            got = f"a {attention_mask.dim()}-D tensor"
        raise ad.AttentionInputError("attention_mask", "a DispatchMask, a 4-D mask or None",
                                     got, "register() the mask function with the "
                                     "attention function (same name)")
    out = ad.attention(query, key, value, **kw)
    return out.transpose(1, 2).contiguous(), None  # type: ignore[union-attr]


def _packed_forward(query: Tensor, key: Tensor, value: Tensor, m: DispatchMask,
                    p: LeftPacked, kw: dict[str, Any]) -> Tensor:
    """A left-padded causal prefill on the real tokens only (see :class:`LeftPacked`):
    (B, Hq, S, D) in, (B, S, Hq, Dv) out with zeros at the padded positions."""
    b, s = query.shape[0], query.shape[2]
    if m.keep is not None:  # a static cache: its slots past the last query are unused
        key, value = key[:, :, :m.keep], value[:, :, :m.keep]
    if key.shape[2] != s:  # the mask was made for other shapes: the dense call
        return ad.attention(query, key, value, key_padding_mask=m.key_padding_mask,
                            causal=m.causal, window=m.window, **kw).transpose(1, 2).contiguous()
    q, k, v = (t[p.batch, :, p.pos] for t in (query, key, value))  # (T, H, D) gathers
    out = ad.attention_varlen(q, k, v, p.cu_seqlens, p.cu_seqlens, p.max_len, p.max_len,
                              causal=m.causal, window=m.window, check_values=False, **kw)
    full = out.new_zeros(b, s, out.shape[1], out.shape[2])
    return full.index_put((p.batch, p.pos), out)


def _check_version() -> None:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__).release < Version(MIN_VERSION).release:
        raise ImportError(f"attention_dispatch.integrations.transformers needs transformers >= "
                          f"{MIN_VERSION}; found {transformers.__version__}")


def register(name: str = "attention_dispatch") -> str:
    """Register the attention function and its mask function with
    transformers under ``name``; returns ``name``.

    Then ``AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)``
    (or ``from_config``, or ``model.set_attn_implementation(name)``) runs every
    attention layer through :func:`attention_dispatch.attention`.  Calling it
    again is harmless.

    Raises:
        AttentionTypeError: ``name`` is not a non-empty string.
        ImportError: transformers is missing or older than 5.17.
    """
    if not isinstance(name, str) or not name:
        raise ad.AttentionTypeError("name", "a non-empty str", repr(name))
    _check_version()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_interface)
    return name


__all__ = ["DispatchMask", "attention_forward", "mask_interface", "register"]
