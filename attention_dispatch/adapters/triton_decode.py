"""``triton-decode``: a split-KV Triton kernel for short queries (decode and
chunked prefill), over dense K/V or a paged KV cache (``_triton_splitkv``).

It splits every row's keys across programs, so a batch of few rows still
fills the device, reads each key block once for all query heads of a GQA
group, and reads a paged cache through the block table at any power-of-two
block size >= 16 - nothing past a row's length (``paged_reads_tail`` False).
Forward only (no gradients, no dropout); no dense mask, key padding or ALiBi;
causal (bottom-right), sliding windows, softcap, sinks and the LSE are exact.
float16/bfloat16 on CUDA sm80+, head dims up to 256, Dv == D, and at most 64
query rows per kv head (Sq * Hq / Hkv).

Ranking: first for paged calls with few (row, kv head) pairs, where FA4's
paged route (one split each on sm90) leaves SMs idle; second behind FA4 on
sm90 where those pairs fill the device (``ranking.shape_class``);
for dense calls it ranks just before ``math`` until measured, i.e. it is
chosen by name or when the kernels ahead refuse.

Equivalent math: see :mod:`attention_dispatch.adapters._triton_splitkv`.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from .._core.backend import AttentionResult, Backend
from .._core.capabilities import Capabilities
from .._core.layout import Buffer
from .._core.spec import CallSpec
from ._triton_splitkv import MAX_ROWS, block_n_for, num_splits, pow2, split_kv_attention

Tensor = torch.Tensor
_PAGED_FIRST = {f"{family}/{cls}": "first" for family in ("sm80", "sm90", "sm100", "cuda")
                for cls in ("paged", "paged-wide")}  # sm90's tables place it themselves


class TritonDecodeBackend(Backend):
    """Split-KV attention for short queries (Triton), dense or paged."""

    ranking = _PAGED_FIRST
    capabilities = Capabilities(
        device_types=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        max_head_dim=256,
        different_v_head_dim=False,
        min_compute_capability=(8, 0),
        mask_kinds=frozenset(),
        key_padding=False,
        dropout=False,
        backward=False,
        native_layout="bshd",
        empty_rows_exact=True,
        window=True,
        softcap=True,
        extras=frozenset({"paged", "sinks"}),
        # the splits are combined in a fixed order: no atomics
        deterministic_forward=True,
    )

    def buffers(self, spec: CallSpec) -> tuple[Buffer, ...]:
        """The splits' partial outputs (float32, padded to the kernel's tiles)
        and their LSEs, for up to two programs per SM of a 132-SM device."""
        rows = spec.seq_q * (spec.heads_q // max(1, spec.heads_kv))
        block_n = block_n_for(spec.paged, spec.block_size)
        splits = num_splits(spec.batch, spec.heads_kv, spec.seq_k, block_n, 132)
        per = spec.batch * spec.heads_kv * splits * pow2(rows)
        return (Buffer("partial outputs of the key splits (float32)",
                       per * (pow2(spec.head_dim) + 1) * 4),)

    def describe(self) -> str:
        import triton
        return f"triton {triton.__version__} split-KV kernel"

    def probe(self, device: torch.device) -> list[str]:
        out = super().probe(device)
        if not out and importlib.util.find_spec("triton") is None:
            out.append("triton is not installed (pip install triton; CUDA builds of torch "
                       "bring it)")
        return out

    def check(self, spec: CallSpec) -> list[str]:
        out = []
        rows = spec.seq_q * (spec.heads_q // max(1, spec.heads_kv))
        if rows > MAX_ROWS:
            out.append(f"Sq * Hq / Hkv = {rows} query rows per kv head; allowed: <= {MAX_ROWS} "
                       "(a kernel for short queries: decode, chunked prefill)")
        bs = spec.block_size
        if spec.paged and (bs < 16 or bs & (bs - 1)):
            out.append(f"block_size={bs}; allowed: a power of two >= 16 (a key tile lies in "
                       "one block)")
        return out

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, spec: CallSpec,
                mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                dropout_p: float, scale: float, sinks: Optional[Tensor] = None
                ) -> AttentionResult:
        """Dense call on (B, H, S, D) views: read as (B, S, H, D) strides."""
        out, lse = split_kv_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale,
            causal=spec.causal, window=spec.window, softcap=spec.softcap, sinks=sinks)
        return out.transpose(1, 2), (lse if spec.return_lse else None)

    def forward_paged(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, *, spec: CallSpec,
                      block_table: Tensor, cache_seqlens: Tensor, scale: float,
                      sinks: Optional[Tensor] = None) -> AttentionResult:
        """Paged call: q (B, Sq, Hq, D) -> out (B, Sq, Hq, D), lse (B, Hq, Sq) or None."""
        out, lse = split_kv_attention(
            q, k_cache, v_cache, scale=scale, causal=spec.causal, window=spec.window,
            softcap=spec.softcap, sinks=sinks, block_table=block_table,
            cache_seqlens=cache_seqlens)
        return out, (lse if spec.return_lse else None)
