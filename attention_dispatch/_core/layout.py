"""Memory layouts: what a kernel needs of its inputs' strides, and the least
copying that gives it.

Not to be confused with the ``layout`` argument ("bhsd"/"bshd"), which names
the order of the axes.  This module is about the memory behind those axes:
a K stored transposed (``k.stride(-1) != 1``), a V broadcast with ``expand``
(stride 0), step slices (``x[..., ::2]``), views with a storage offset, views
of a packed qkv projection.  Every backend declares the
:class:`StrideRequirements` of its kernel (``Capabilities.strides``); the
dispatcher copies exactly the tensors that break them, once per call, into the
kernel's native axis order, and never refuses a call for its memory layout.

Whether a tensor's strides break a rule is known from its shape and strides
alone, so it is decided once per call signature (the strides are part of the
decision-cache key); only a data-pointer alignment rule needs a look at the
pointers on every call, and only for the kernels that declare one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .maskvalues import padded_slots

Tensor = torch.Tensor


@dataclass(frozen=True)
class StrideRequirements:
    """What a kernel needs of the memory of q, k and v (in the bhsd view).

    Axes of length 1 are never judged: their stride addresses nothing.

    Attributes:
        unit_last_stride: the head-dim axis is contiguous (``t.stride(-1) == 1``).
        stride_alignment: every other stride, in bytes, is a multiple of this
            (e.g. 16 for kernels that load rows with 16-byte vector or TMA copies).
        pointer_alignment: the data pointer, in bytes, is a multiple of this.
        broadcast: axes with stride 0 (``expand``) are read correctly.
        mask_unit_last_stride: a dense mask handed to the kernel (after its
            broadcast axes are reduced to length 1) is contiguous along keys.
    """

    unit_last_stride: bool = True
    stride_alignment: int = 1
    pointer_alignment: int = 1
    broadcast: bool = True
    mask_unit_last_stride: bool = True

    def violation(self, t: Tensor) -> Optional[str]:
        """Why ``t``'s strides break the rule (None if they do not).  Pointer
        alignment is judged separately (:meth:`misaligned`): it changes per call."""
        if t.is_contiguous() and (  # every stride a multiple of the last axis' bytes
                not t.dim() or (t.shape[-1] * t.element_size()) % self.stride_alignment == 0):
            return None
        shape, strides = t.shape, t.stride()
        if t.dim() and self.unit_last_stride and shape[-1] > 1 and strides[-1] != 1:
            return f"last-dim stride {strides[-1]}; the kernel needs 1"
        size = t.element_size()
        for axis, (n, s) in enumerate(zip(shape, strides)):
            if n <= 1 or (axis == len(shape) - 1 and s == 1):
                continue
            if s == 0 and not self.broadcast:
                return f"strides {tuple(strides)} (stride 0, expanded); the kernel needs memory"
            if (s * size) % self.stride_alignment:
                return (f"strides {tuple(strides)} ({size}-byte elements); the kernel needs "
                        f"strides in multiples of {self.stride_alignment} bytes")
        return None

    def misaligned(self, t: Tensor) -> bool:
        """Whether ``t``'s data pointer breaks ``pointer_alignment``.  While
        torch.compile traces there is no pointer to read (nor a storage offset
        dynamo can trace or guards on): False, the graph's tensors are taken as
        aligned - torch's allocators align every storage far beyond 16 bytes,
        so only a graph input that is a view starting off a 16-byte boundary
        escapes the copy eager calls make (docs/contract.md, "Any memory layout")."""
        if self.pointer_alignment <= 1 or torch.compiler.is_compiling():
            return False
        return t.data_ptr() % self.pointer_alignment != 0

    @property
    def checks_pointers(self) -> bool:
        return self.pointer_alignment > 1


#: Any memory layout (kernels built from torch ops: matmul, softmax).
ANY_STRIDES = StrideRequirements(unit_last_stride=False, mask_unit_last_stride=False)
#: The head-dim axis contiguous; any other strides (torch's CPU kernels).
UNIT_LAST_STRIDE = StrideRequirements()
#: The rule of the fused CUDA kernels (flash, memory-efficient, cuDNN, FA4,
#: xformers): unit last stride, 16-byte aligned strides and pointers, no
#: stride-0 axes (TMA descriptors and vectorised loads assume all three).
CUDA_ALIGNED = StrideRequirements(stride_alignment=16, pointer_alignment=16, broadcast=False)


def relayout(t: Tensor, native_layout: str) -> Tensor:
    """A fresh, aligned copy of ``t`` (a bhsd view) whose memory is contiguous
    in ``native_layout`` order ("bhsd" or "bshd"); differentiable."""
    if native_layout == "bshd":
        return t.transpose(1, 2).clone(memory_format=torch.contiguous_format).transpose(1, 2)
    return t.clone(memory_format=torch.contiguous_format)


def compact_broadcast(mask: Tensor) -> Tensor:
    """``mask`` with every stride-0 axis (from ``expand``) cut to length 1: the
    same values under broadcasting, and nothing (B, H, Sq, Sk)-sized is ever
    built from it.  A view; no copy."""
    for axis, (n, s) in enumerate(zip(mask.shape, mask.stride())):
        if s == 0 and n > 1:
            mask = mask.narrow(axis, 0, 1)
    return mask


def mask_violation(mask: Tensor, req: StrideRequirements) -> Optional[str]:
    """Why a (compacted) dense mask breaks ``req`` (None if it does not)."""
    if req.mask_unit_last_stride and mask.dim() and mask.shape[-1] > 1 and mask.stride(-1) != 1:
        return f"mask last-dim stride {mask.stride(-1)}; the kernel needs 1"
    return None


class Buffer(NamedTuple):
    """One allocation a path makes beyond its inputs and output (an estimate,
    see ``Backend.buffers``): what it is, its bytes, and whether it grows as
    Sq * Sk (score matrix, materialised mask or bias)."""

    what: str
    nbytes: int
    quadratic: bool = False


def describe_bytes(n: int) -> str:
    """1536 -> "1.5 KiB"; for reasons and explain()."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.3g} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


def nbytes(t: Tensor) -> int:
    """Bytes a dense copy of ``t`` takes."""
    return t.numel() * t.element_size()


def clean_padded(t: Tensor, key_padding_mask: Tensor, fresh: bool) -> Tensor:
    """``t`` (B, H, Sk, D) with the slots ``key_padding_mask`` (B, Sk) excludes
    set to 0, so that NaN or Inf stored there cannot reach the result; the
    gradient there is 0.  ``fresh``: ``t`` is a copy of our own, zeroed in place.

    The copy keeps ``t``'s order of the head and sequence axes: K/V stored
    (B, Sk, H, D) (bshd, packed projections) are copied into (B, Sk, H, D)
    memory, so their gradients come back in the caller's order (a masked copy
    in bhsd order made the gradient of a packed projection a transposing
    copy: bench/dead_rows_bench.py --profile, H200, 1.5 ms against under
    0.4 ms per 8-layer step for torch's own call)."""
    pad = padded_slots(key_padding_mask)
    if fresh:
        return t.masked_fill_(pad, 0)
    if 0 < t.stride(1) < t.stride(2):  # heads inside sequence: bshd memory order
        return t.transpose(1, 2).masked_fill(pad.transpose(1, 2), 0).transpose(1, 2)
    return t.masked_fill(pad, 0)


class MemoryPlan(NamedTuple):
    """What one call signature needs before its kernel runs (decided once).

    ``copies``: q, k, v copied into ``native`` order (their strides break
    ``req``); ``clean``: the K/V slots excluded by key padding are zeroed;
    ``mask``: 0 as given, 1 broadcast axes cut to length 1, 2 that and a
    contiguous copy of what is left; ``notes``: the same, in words (explain());
    ``nbytes``: the bytes these copies allocate (the masked copy of K and V
    counted when there is no copy of them already).
    """

    copies: tuple[bool, bool, bool]
    native: str
    req: StrideRequirements
    clean: bool
    mask: int
    notes: tuple[str, ...]
    nbytes: int = 0

    @property
    def idle(self) -> bool:
        """Nothing to do for tensors with these strides (pointers aside)."""
        return not (any(self.copies) or self.clean or self.mask)

    @property
    def copies_nothing(self) -> bool:
        """Nothing to do without key padding (pointers aside)."""
        return not (any(self.copies) or self.mask)


def plan_memory(req: StrideRequirements, native: str, clean: bool, q: Tensor, k: Tensor,
                v: Tensor, mask: Optional[Tensor]) -> MemoryPlan:
    """The least copying that gives a kernel with rule ``req`` and axis order
    ``native`` the tensors q, k, v (bhsd views) and ``mask``; ``clean``: the
    kernel reads key-padding slots, so they are zeroed (in the copy of K/V
    when there is one, else in one masked copy)."""
    notes = []
    copies = []
    total = 0
    for name, t in zip("qkv", (q, k, v)):
        why = req.violation(t)
        copies.append(why is not None)
        if why is not None:
            total += nbytes(t)
            notes.append(f"copy of {name} ({nbytes(t) / 2**20:.3g} MiB, into {native} order): "
                         f"{why}")
    if clean:
        notes.append("K and V slots excluded by key_padding_mask zeroed "
                     + ("in their copies" if copies[1] and copies[2] else "(one masked copy)"))
        total += sum(nbytes(t) for t, c in ((k, copies[1]), (v, copies[2])) if not c)
    mask_step = 0
    if mask is not None:
        small = compact_broadcast(mask)
        if small is not mask:
            mask_step = 1
        why = mask_violation(small, req)
        if why is not None:
            mask_step = 2
            total += nbytes(small)
            notes.append(f"copy of the mask ({nbytes(small) / 2**20:.3g} MiB): {why}")
    return MemoryPlan((copies[0], copies[1], copies[2]), native, req, clean, mask_step,
                      tuple(notes), total)


def apply_memory(mp: MemoryPlan, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                 kpm: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Run a :class:`MemoryPlan` on one call's tensors (bhsd views): the copies
    it names, plus any tensor whose data pointer breaks the alignment rule."""
    copies = mp.copies
    if mp.req.checks_pointers:
        copies = tuple(c or mp.req.misaligned(t) for c, t in zip(copies, (q, k, v)))  # type: ignore
    if copies[0]:
        q = relayout(q, mp.native)
    if copies[1]:
        k = relayout(k, mp.native)
    if copies[2]:
        v = relayout(v, mp.native)
    if mp.clean and kpm is not None:
        k = clean_padded(k, kpm, copies[1])
        v = clean_padded(v, kpm, copies[2])
    if mask is not None and mp.mask:
        mask = compact_broadcast(mask)
        if mp.mask == 2:
            mask = mask.contiguous()
    return q, k, v, mask
