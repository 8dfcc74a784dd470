"""Extra-memory estimates the built-in adapters declare (``Backend.buffers``).

Figures are the forward's allocations beyond q, k, v and the output, from
the call signature alone (no tensors): the largest buffers, not a profile.
Autograd may keep some of them alive until the backward.  Notation:
n = B * Hq * Sq * Sk, e = the input dtype's bytes, a = the accumulation
dtype's bytes (4 for float16/bfloat16, else e).

* score matrix (math): s and p in the accumulation dtype, plus p rounded to
  the input dtype for half inputs: n * (2a + e [a != e]) bytes
  (:func:`scores`); packed varlen calls run one sequence at a time (B = 1).
* materialised mask/bias (adapters that turn masks into one additive bias,
  :func:`bias`): (B|1, Hq|1, Sq|1, Sk) elements of the input dtype - B when a
  dense mask or key padding is given, Hq with a dense mask or ALiBi, Sq with a
  dense mask, a causal mask the kernel cannot take as a flag, a window or
  ALiBi.  A dense mask is counted at full size (the signature does not carry
  its broadcast shape).
* K/V copies (GQA expanded to Hq heads, key padding gathered or unpadded,
  keys padded): B * H * Sk * (D + Dv) * e (:func:`kv_copy`).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._core.layout import Buffer
from .._core.spec import CallSpec

HALF = (torch.float16, torch.bfloat16)


def elem(spec: CallSpec) -> int:
    """Bytes per element of the input dtype."""
    return spec.dtype.itemsize


def acc(spec: CallSpec) -> int:
    """Bytes per element of the accumulation dtype (float32 for half inputs)."""
    return 4 if spec.dtype in HALF else elem(spec)


def scores(spec: CallSpec) -> Buffer:
    """The math path's score and probability matrices (see the module docstring)."""
    batch = 1 if spec.varlen else spec.batch
    n = batch * spec.heads_q * spec.seq_q * spec.seq_k
    a, e = acc(spec), elem(spec)
    per = 2 * a + (e if a != e else 0)
    return Buffer(f"score matrix ({batch}, {spec.heads_q}, {spec.seq_q}, {spec.seq_k}) x "
                  f"{per} B", n * per, quadratic=True)


def bias(spec: CallSpec, causal_in_bias: bool, copies: int = 1,
         what: str = "materialised mask/bias") -> Optional[Buffer]:
    """The additive bias a torch-kernel adapter builds (None when it builds none).
    ``copies``: 2 where it is copied again onto aligned rows."""
    dense = spec.mask_kind != "none"
    rows = dense or causal_in_bias or spec.window is not None or spec.alibi
    if not (dense or spec.key_padding or rows):
        return None
    b = spec.batch if dense or spec.key_padding else 1
    h = spec.heads_q if dense or spec.alibi else 1
    sq = spec.seq_q if rows else 1
    n = b * h * sq * spec.seq_k * elem(spec) * copies
    return Buffer(f"{what} ({b}, {h}, {sq}, {spec.seq_k})" + (f" x{copies}" if copies > 1
                                                               else ""),
                  n, quadratic=rows and spec.seq_q > 1)


def kv_copy(spec: CallSpec, heads: int, what: str) -> Buffer:
    """A copy of K and V with ``heads`` heads (all Sk keys)."""
    n = spec.batch * heads * spec.seq_k * (spec.head_dim + spec.head_dim_v) * elem(spec)
    return Buffer(what, n)


def gqa_expansion(spec: CallSpec) -> list[Buffer]:
    """K/V expanded to Hq heads (``expand_kv``) for a GQA call."""
    return [kv_copy(spec, spec.heads_q, f"K/V expanded to {spec.heads_q} heads (GQA)")] \
        if spec.gqa else []


def listed(*items: Optional[Buffer]) -> tuple[Buffer, ...]:
    return tuple(b for b in items if b is not None)
