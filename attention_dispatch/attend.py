"""``Attend``: drop-in replacement for the seed's attention module.

The seed (recurrent-memory-transformer-pytorch) had ``Attend(dropout, causal,
use_flash)`` with ``forward(q, k, v, mask=None)``; this keeps that interface and
routes through :func:`attention_dispatch.attention`.

One deliberate difference: a query row whose keys are all masked gives 0.
The seed gave a uniform average over the masked keys in its math path
(it filled with -finfo.max) and NaN in its fused path.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ._core import AttentionInputError, AttentionTypeError, attention


Tensor = torch.Tensor


class Attend(nn.Module):
    """Attention over (b, h, n, d) tensors with the seed's arguments.

    Args:
        dropout: dropout on the attention weights, applied in training only.
        causal: bottom-right causal mask (the seed's ``triu(j - i + 1)``).
        backend: as in :func:`attention_dispatch.attention`.
        use_flash: the seed's switch, kept so old code runs: False means
            ``backend="math"``; True means ``backend`` (auto by default).
        context_parallel_group: a torch.distributed process group: q, k, v
            are this rank's shard of the sequence and forward runs
            :func:`attention_dispatch.distributed.ring_attention` (no mask,
            no dropout in that mode).  See docs/distributed.md.
        sharding: how the sequence is sharded in that mode ("zigzag" or
            "contiguous").

    forward(q, k, v, mask=None):
        q (b, h, i, d); k, v (b, h, j, d) or (b, j, d) (one kv head shared by
        all query heads, as in the seed); mask either (b, j) bool key padding
        (True = keep) or a bool mask broadcastable to (b, h, i, j); any other
        dtype raises AttentionTypeError naming ``mask``.
        Returns (b, h, i, d).
    """

    def __init__(self, dropout: float = 0.0, causal: bool = False,
                 backend: Union[str, Sequence[str]] = "auto",
                 use_flash: Optional[bool] = None, context_parallel_group: Optional[object] = None,
                 sharding: str = "zigzag") -> None:
        super().__init__()
        self.context_parallel_group = context_parallel_group
        self.sharding = sharding
        self.dropout = float(dropout)
        self.causal = causal
        self.backend = "math" if use_flash is False else backend
        self.use_flash = use_flash

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if isinstance(k, Tensor) and k.dim() == 3:
            k = k.unsqueeze(1)
        if isinstance(v, Tensor) and v.dim() == 3:
            v = v.unsqueeze(1)
        if self.context_parallel_group is not None:
            return self._ring(q, k, v, mask)
        kpm = None
        if isinstance(mask, Tensor):
            _check_mask(mask, q, k)
            if mask.dim() == 2:
                kpm, mask = mask, None
        return attention(q, k, v, mask=mask, key_padding_mask=kpm, causal=self.causal,
                         dropout_p=self.dropout if self.training else 0.0,
                         backend=self.backend)  # type: ignore[return-value]

    def _ring(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        """Context-parallel forward: ring attention over the group's shards."""
        if mask is not None:
            raise AttentionInputError("mask", "None with context_parallel_group (ring "
                                      "attention takes no mask)", "a mask")
        from .distributed import ring_attention

        return ring_attention(q, k, v, group=self.context_parallel_group, causal=self.causal,
                              sharding=self.sharding, backend=self.backend,
                              dropout_p=self.dropout if self.training else 0.0
                              )  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, causal={self.causal}, backend={self.backend!r}"


def _check_mask(mask: Tensor, q: Tensor, k: Tensor) -> None:
    """``forward``'s mask: bool, and a 2-D one is (b, j) key padding.

    Raises:
        AttentionTypeError: a mask that is not bool (named ``mask``, the
            argument the caller passed).
        AttentionInputError: a 2-D mask whose shape is not (b, j).
    """
    got = f"{str(mask.dtype).replace('torch.', '')} tensor of shape {tuple(mask.shape)}"
    if mask.dtype != torch.bool:
        raise AttentionTypeError(
            "mask", "a bool tensor (True = keep): (b, j) key padding, or broadcastable to "
            "(b, h, i, j)", got, "mask.bool() if it holds 1 = keep and 0 = masked; for an "
            "additive float bias call ad.attention(q, k, v, mask=bias)")
    if mask.dim() == 2 and isinstance(q, Tensor) and isinstance(k, Tensor) and q.dim() == 4:
        want = (q.shape[0], k.shape[-2])
        if tuple(mask.shape) != want:
            raise AttentionInputError("mask", f"a 2-D key padding mask of shape (b, j) = {want}",
                                      got)
