"""Memory layouts for tests and fuzzers (re-exported by :mod:`attention_dispatch.testing`).

A user can hand the dispatcher tensors with any memory behind their shape:
stored transposed, broadcast with ``expand`` (stride 0, the last axis too),
step slices, storage offsets, views of a packed qkv projection, masks and
key-padding masks that are views, and garbage (NaN, Inf) in padded key
slots.  :func:`draw_memory` draws one such combination, and the helpers here
build the views from plain tensors, differentiably, so gradients can be
compared per view.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

Tensor = torch.Tensor

#: Memory layouts a user can hand over (see :func:`memory_view`).
MEMORY_KINDS = ("contiguous", "transposed", "expand", "step", "offset")


def memory_view(t: Tensor, kind: str, axis: int = -2) -> Tensor:
    """``t`` with another memory layout behind the same shape (differentiable).

    * ``contiguous``: plain storage.
    * ``transposed``: stored with ``axis`` and the last axis swapped, so the
      last stride is not 1 (``axis=-1``: contiguous).
    * ``expand``: stride 0 along ``axis`` (its values: ``t``'s first slice
      along ``axis``, broadcast; the only kind that changes values).
    * ``step``: a step-2 slice along ``axis`` of a storage twice as long there.
    * ``offset``: contiguous at a storage offset of one element (a data
      pointer aligned to the element size only).
    """
    if kind == "contiguous":
        return t.contiguous()
    if kind == "transposed":
        return t.transpose(axis, -1).contiguous().transpose(axis, -1)
    if kind == "expand":
        return t.narrow(axis, 0, 1).expand(t.shape)
    if kind == "step":
        index = (slice(None),) * (axis % t.dim()) + (slice(None, None, 2),)
        return torch.repeat_interleave(t, 2, dim=axis)[index]
    if kind == "offset":
        flat = torch.cat([t.new_zeros(1), t.reshape(-1)])
        return flat[1:].view(t.shape)
    raise ValueError(f"kind={kind!r}; expected one of {MEMORY_KINDS}")


def packed_qkv(batch: int, seq: int, heads: int, head_dim: int, layout: str = "bhsd", *,
               dtype: torch.dtype = torch.float32, device: Any = "cpu",
               generator: Optional[torch.Generator] = None,
               requires_grad: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """q, k, v as views of one packed projection output (B, S, 3 * H * D), the
    way models split a fused qkv linear layer: returns ``(packed, (q, k, v))``
    with q, k, v in ``layout`` (no copies; gradients reach ``packed``)."""
    packed = torch.randn(batch, seq, 3 * heads * head_dim, generator=generator)
    packed = packed.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    q, k, v = split_packed(packed, heads, layout)
    return packed, (q, k, v)


def split_packed(packed: Tensor, heads: int, layout: str) -> tuple[Tensor, Tensor, Tensor]:
    """Views q, k, v (in ``layout``) of a packed projection (B, S, 3 * H * D)."""
    b, s, n = packed.shape
    parts = packed.view(b, s, 3, heads, n // (3 * heads)).unbind(2)  # each (B, S, H, D)
    if layout == "bhsd":
        parts = tuple(p.transpose(1, 2) for p in parts)
    return parts[0], parts[1], parts[2]


@dataclass(frozen=True)
class MemoryDraw:
    """The memory behind one call's tensors.

    ``q``/``k``/``v``: (kind, axis) for :func:`memory_view`; ``packed``: q, k,
    v are views of one packed projection instead; ``mask``: "plain",
    "transposed" or "expand" (stride 0 where the mask broadcasts);
    ``kpm_step``: the key-padding mask is a step slice; ``poison``: NaN and
    Inf in the K/V slots the key-padding mask excludes.
    """

    q: tuple[str, int] = ("contiguous", -1)
    k: tuple[str, int] = ("contiguous", -1)
    v: tuple[str, int] = ("contiguous", -1)
    packed: bool = False
    mask: str = "plain"
    kpm_step: bool = False
    poison: bool = False

    def label(self) -> str:
        parts = ["packed"] if self.packed else [
            f"{n}:{kind}{axis}" for n, (kind, axis) in zip("qkv", (self.q, self.k, self.v))
            if kind != "contiguous"]
        parts += [f"mask:{self.mask}"] if self.mask != "plain" else []
        parts += ["kpm:step"] if self.kpm_step else []
        parts += ["poison"] if self.poison else []
        return ",".join(parts) or "contiguous"


def draw_memory(rng: random.Random, *, packable: bool, padding: bool,
                key_axis: Optional[int] = None) -> MemoryDraw:
    """A random :class:`MemoryDraw`: plain memory everywhere in 30 % of the draws,
    else about half the tensors keep plain memory.
    ``packable``: q, k, v have one shape (Sq == Sk, Hq == Hkv, Dv == D);
    ``padding``: the call has a key-padding mask (poison and step slices);
    ``key_axis``: for calls with gradients, the key-sequence axis of k/v in the
    call's layout (2 for bhsd, 1 for bshd).  K or V broadcast along it makes
    every key (or value) the same, so dq is exactly 0 in exact arithmetic and
    the accuracy rule's slack (scaled by max|dq| = 0) falls below what fused
    kernels' float16/bfloat16 rounding of dS leaves (measured on an H200: 1.2-1.7x
    the slack, math exact): a property of those values, not of the memory
    layout (the copy the dispatcher makes holds the same values).  Such
    draws use the head-dim axis instead; forward-only calls keep them."""
    def one() -> tuple[str, int]:
        kind = rng.choice(("contiguous",) * 4 + MEMORY_KINDS[1:])
        return kind, rng.choice((0, 1, 2, 3)) if kind != "transposed" else rng.choice((0, 1, 2))

    if rng.random() < 0.3:  # plain memory everywhere: the kernels' own fast paths
        return MemoryDraw()
    q, k, v = one(), one(), one()
    if key_axis is not None:
        k, v = ((kind, 3 if kind == "expand" and axis == key_axis else axis)
                for kind, axis in (k, v))
    packed = packable and rng.random() < 0.15
    poison = padding and rng.random() < 0.5 and "expand" not in (k[0], v[0]) and not packed
    return MemoryDraw(q, k, v, packed, rng.choice(("plain", "plain", "transposed", "expand")),
                      padding and rng.random() < 0.3, poison)


def qkv_makers(mem: MemoryDraw, heads: int, layout: str
               ) -> dict[str, Callable[[Tensor], Tensor]]:
    """Functions that turn a leaf into the view of q, k or v that ``mem`` names
    (for ``mem.packed`` the leaf is the packed projection of every one)."""
    if mem.packed:
        return {n: (lambda t, i=i: split_packed(t, heads, layout)[i]) for i, n in enumerate("qkv")}
    return {n: (lambda t, m=m: memory_view(t, m[0], m[1]))
            for n, m in zip("qkv", (mem.q, mem.k, mem.v))}


def mask_view(mem: MemoryDraw, mask: Tensor, full: tuple[int, ...]) -> Tensor:
    """``mask`` stored transposed, or broadcast to ``full`` with stride 0."""
    if mem.mask == "transposed" and mask.dim() >= 2:
        return memory_view(mask, "transposed", -2)
    if mem.mask == "expand":
        return mask.expand(full[4 - mask.dim():]) if mask.dim() <= 4 else mask
    return mask


def kpm_view(mem: MemoryDraw, kpm: Tensor) -> Tensor:
    """The key-padding mask as a step slice of a (B, 2 * Sk) storage."""
    return torch.repeat_interleave(kpm, 2, dim=1)[:, ::2] if mem.kpm_step else kpm


def poison_padded(t: Tensor, kpm: Tensor, layout: str, generator: torch.Generator) -> Tensor:
    """``t`` (k or v in ``layout``) with NaN, +Inf and -Inf in about half of
    the slots ``kpm`` (B, Sk) excludes: a padded KV cache never written."""
    pad = ~kpm.to(t.device)
    pad = pad[:, None, :, None] if layout == "bhsd" else pad[:, :, None, None]
    pick = torch.rand(t.shape, generator=generator, device=generator.device).to(t.device)
    t = t.masked_fill(pad & (pick < 0.25), float("nan"))
    t = t.masked_fill(pad & (pick >= 0.25) & (pick < 0.4), float("inf"))
    return t.masked_fill(pad & (pick >= 0.4) & (pick < 0.5), float("-inf"))
