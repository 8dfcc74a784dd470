"""``chunked``: attention over query chunks, for long sequences under tight memory.

Registered with attention_dispatch through the entry point group
``attention_dispatch.backends`` (see this distribution's pyproject.toml).

Equivalent math (for each chunk of ``chunk_size`` query rows ``r``)::

    s = scale * q[:, :, r] @ k.T + float_mask[..., r, :]     # (B, Hq, chunk, Sk)
    s[~(bool_mask[..., r, :] & key_padding & causal_bottom_right[r])] = -inf
    out[:, :, r] = softmax(s) @ v      # rows of all -inf -> 0
    lse[:, :, r] = logsumexp(s, -1)    # rows of all -inf -> -inf
"""

from __future__ import annotations

import os
from typing import ClassVar, Optional

import torch

import attention_dispatch as ad

from ._kernel import chunked_attention

Tensor = torch.Tensor

CHUNK_SIZE_ENV = "ATTENTION_DISPATCH_CHUNK_SIZE"
DISTRIBUTION = "attention-dispatch-chunked"


def _chunk_size_from_env(default: int) -> int:
    """``ATTENTION_DISPATCH_CHUNK_SIZE`` as an int >= 1, or ``default`` if unset."""
    raw = os.environ.get(CHUNK_SIZE_ENV, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{CHUNK_SIZE_ENV}: expected an integer >= 1; got {raw!r}")
    return value


class ChunkedBackend(ad.Backend):
    """Chunked-query attention in plain torch ops.

    Queries are processed ``chunk_size`` rows at a time, so the extra memory
    of a call is O(B * Hq * chunk_size * Sk) instead of O(B * Hq * Sq * Sk):
    the scores, probabilities and masks of one chunk only.  The caller's
    masks are sliced per chunk (views), never expanded to (B, Hq, Sq, Sk).
    When gradients are needed each chunk runs under activation checkpointing
    (``recompute = True``), so training keeps the same bound at the cost of
    recomputing the scores in the backward pass.

    Shapes (the dispatcher's bhsd view): q (B, Hq, Sq, D), k (B, Hkv, Sk, D),
    v (B, Hkv, Sk, Dv) -> out (B, Hq, Sq, Dv), lse (B, Hq, Sq) float32 or None.

    Attributes:
        chunk_size: query rows per chunk; default 1024, overridden at
            instantiation by ATTENTION_DISPATCH_CHUNK_SIZE.
        recompute: checkpoint each chunk when gradients are needed.

    Equivalent math: see the module docstring.  Scores and softmax run in
    float32 for float16/bfloat16 inputs (float64 stays float64); the scores'
    matmul runs in the input dtype and p is rounded to it before p @ v, as in
    the ``math`` backend.  Dropout is refused, never ignored.
    """

    package: ClassVar[Optional[str]] = DISTRIBUTION
    capabilities: ClassVar[ad.Capabilities] = ad.Capabilities(
        device_types=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        mask_kinds=frozenset({"bool", "float"}),
        key_padding=True,
        causal=True,
        dropout=False,
        lse=True,
        gqa=True,
        backward=True,
        native_layout="bhsd",
        empty_rows_exact=True,
        # matmul, softmax and elementwise ops per chunk (recomputed under
        # checkpointing): no atomics in either direction
        deterministic_forward=True,
        deterministic_backward=True,
    )

    chunk_size: int = 1024
    recompute: bool = True

    def __init__(self) -> None:
        """Read ATTENTION_DISPATCH_CHUNK_SIZE (now, not at import).

        Raises:
            ValueError: the variable is set but not an integer >= 1.
        """
        env = _chunk_size_from_env(0)
        if env:
            self.chunk_size = env

    def describe(self) -> str:
        v = self.version()
        head = f"{DISTRIBUTION} {v}" if v else DISTRIBUTION
        return f"{head} (torch {torch.__version__}, {self.chunk_size} query rows per chunk)"

    def buffers(self, spec: ad.CallSpec) -> tuple[ad.Buffer, ...]:
        """One chunk's scores and probabilities: B * Hq * min(chunk, Sq) * Sk
        elements, twice in the accumulation dtype (float32 for half inputs)
        plus once in the input dtype for half inputs.  Bounded by the chunk
        size, so not counted as O(Sq * Sk)."""
        rows = min(self.chunk_size, spec.seq_q)
        e = spec.dtype.itemsize
        a = 4 if spec.dtype in (torch.float16, torch.bfloat16) else e
        n = spec.batch * spec.heads_q * rows * spec.seq_k * (2 * a + (e if a != e else 0))
        return (ad.Buffer(f"scores of one chunk of {rows} query rows", n),)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, spec: ad.CallSpec,
                mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                dropout_p: float, scale: float) -> ad.AttentionResult:
        """Run chunked attention.  See the class docstring for shapes.

        Raises:
            BackendUnavailable: ``dropout_p > 0`` (normally refused earlier by
                the capabilities; checked again so dropout is never ignored).
        """
        if dropout_p > 0:
            raise ad.BackendUnavailable(
                (self.name or "chunked",),
                {self.name or "chunked": ["dropout_p > 0; this kernel cannot drop out"]})
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, mask))
        out, lse = chunked_attention(
            q, k, v, mask=mask, key_padding_mask=key_padding_mask, causal=spec.causal,
            scale=scale, chunk_size=int(self.chunk_size), recompute=self.recompute and grad)
        return out, (lse if spec.return_lse else None)
