"""The ``flex`` backend's paged KV-cache route: a BlockMask built from the
block table (the index mapping of torch's experimental ``PagedAttention``,
written here without its state).

flex runs over the flat cache k (1, Hkv, num_blocks * block_size, D) with the
sparse key block size equal to the cache's block size, so a key block *is* a
cache block.  Row b's key blocks are its used cache blocks
(``block_table[b, :ceil(L_b / bs)]``, L_b = cache_seqlens[b]); every other
block is skipped and never read.  Inside them the mask_mod maps a physical
key index back to the row's position (``logical[b, kv // bs] * bs + kv % bs``,
``logical`` the inverse of the row's table, -1 for blocks it does not use) and
keeps position j iff j < L_b and the per-row causal / window test holds
(query i at position i + L_b - Sq).  A row's last block is one key block,
loaded whole: its slots past L_b get weight 0, so they must hold finite
values (``paged_reads_tail``); NaN there would give 0 * NaN.

Equivalent math: ``attention_paged``'s (see the math backend's gather).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .._core.backend import AttentionResult
from .._core.spec import CallSpec

Tensor = torch.Tensor
_Q_BLOCK = 128  # flex's default query block


def paged_reasons(spec: CallSpec) -> list[str]:
    """The flex paged route's limits: block sizes that are powers of two >= 16
    (the sparse key block is the cache block: flex's Triton kernels tile keys
    in blocks that must divide it, and the CPU kernel's 16-key micro-GEMM
    steps must fill it), >= 128 on CUDA for Sq >= 128; on CUDA GQA groups
    that are powers of two (flex's decoding kernel)."""
    out = []
    bs = spec.block_size
    if bs < 16 or bs & (bs - 1):
        out.append(f"block_size={bs}; allowed: a power of two >= 16 (flex's key block is "
                   "the cache block)")
    if spec.device_type == "cuda" and spec.seq_q >= _Q_BLOCK and bs < _Q_BLOCK:
        # research notes on torch 2.13's Triton kernels: the decoding kernel
        # (short queries) clamps its key tile to the block; the main one needs
        # key tiles (64-128) that divide the sparse block
        out.append(f"block_size={bs} with Sq={spec.seq_q} on CUDA; allowed: >= 128 for "
                   "Sq >= 128 (flex's main kernel tiles keys by up to 128)")
    group = spec.heads_q // spec.heads_kv
    if spec.device_type == "cuda" and group & (group - 1):
        out.append(f"GQA group {group} on CUDA; allowed: powers of two (flex's decoding "
                   "kernel)")
    return out


def _logical_blocks(block_table: Tensor, used: Tensor, num_blocks: int) -> Tensor:
    """(B, num_blocks) long: the logical index of each physical block in each
    row's table, -1 where the row does not use it (used blocks are distinct)."""
    b, maxb = block_table.shape
    cols = torch.arange(maxb, device=block_table.device).expand(b, maxb)
    target = torch.where(used, block_table.long(), num_blocks)  # unused -> a spare column
    logical = torch.full((b, num_blocks + 1), -1, dtype=torch.long, device=block_table.device)
    logical.scatter_(1, target, torch.where(used, cols, -1))
    return logical[:, :num_blocks]


def _mask_mod(logical: Tensor, lengths: Tensor, spec: CallSpec) -> Callable[..., Tensor]:
    bs, sq, causal = spec.block_size, spec.seq_q, spec.causal
    left, right = spec.window if spec.window is not None else (-1, -1)

    def mask_mod(b: Tensor, h: Tensor, qi: Tensor, kv: Tensor) -> Tensor:
        blk = logical[b, kv // bs]
        j = blk * bs + kv % bs
        n = lengths[b]
        keep = (blk >= 0) & (j < n)
        d = j - (qi + n - sq)  # key position minus the query's
        if causal:
            keep = keep & (d <= 0)
        if left >= 0:
            keep = keep & (d >= -left)
        if right >= 0:
            keep = keep & (d <= right)
        return keep

    return mask_mod


def paged_block_mask(block_table: Tensor, cache_seqlens: Tensor, spec: CallSpec,
                     num_blocks: int, flex: Any) -> Any:
    """The BlockMask of a paged call (built per call: it depends on the table's
    values; no host synchronisation).  Every used block is a partial block
    (the mask_mod applies); q blocks are not computed (forward only)."""
    bs = spec.block_size
    b, maxb = block_table.shape
    lengths = cache_seqlens.long()
    nused = (lengths + bs - 1) // bs
    used = torch.arange(maxb, device=block_table.device)[None, :] < nused[:, None]
    nq = -(-spec.seq_q // _Q_BLOCK)
    num = nused.to(torch.int32)[:, None, None].expand(b, 1, nq).contiguous()
    # one column per cache block (flex sizes the key axis from it); the first
    # nused[b] hold row b's blocks, the rest are never read
    cols = torch.zeros(b, max(num_blocks, maxb), dtype=torch.int32, device=block_table.device)
    cols[:, :maxb] = torch.where(used, block_table, 0)
    idx = cols[:, None, None, :num_blocks].expand(b, 1, nq, num_blocks).contiguous()
    logical = _logical_blocks(block_table, used, num_blocks)
    return flex.BlockMask.from_kv_blocks(
        num, idx, BLOCK_SIZE=(_Q_BLOCK, bs), mask_mod=_mask_mod(logical, lengths, spec),
        seq_lengths=(spec.seq_q, num_blocks * bs), compute_q_blocks=False)


def _softcap_mod(softcap: Optional[float]) -> Optional[Callable[..., Tensor]]:
    if softcap is None:
        return None

    def score_mod(score: Tensor, b: Tensor, h: Tensor, qi: Tensor, kv: Tensor) -> Tensor:
        return torch.tanh(score / softcap) * softcap

    return score_mod


def forward_paged(self: Any, q: Tensor, k_cache: Tensor, v_cache: Tensor, *, spec: CallSpec,
                  block_table: Tensor, cache_seqlens: Tensor, scale: float,
                  sinks: Optional[Tensor] = None) -> AttentionResult:
    """``FlexBackend.forward_paged``: one flex call over the flat cache
    (1, Hkv, num_blocks * bs, D) (a view when the cache's first two axes
    merge) with the block-table BlockMask and flex's native GQA (the cache
    is not expanded).  q (B, Sq, Hq, D) -> out (B, Sq, Hq, Dv), lse or None."""
    from torch.nn.attention import flex_attention as flex

    nb, bs, hkv, d = k_cache.shape
    kf = k_cache.reshape(1, nb * bs, hkv, d).transpose(1, 2)
    vf = v_cache.reshape(1, nb * bs, hkv, v_cache.shape[-1]).transpose(1, 2)
    bm = paged_block_mask(block_table, cache_seqlens, spec, nb, flex)
    key = ("paged", q.device, q.dtype, spec.causal, spec.window, spec.softcap, bs,
           tuple(block_table.shape))
    out, lse = self._run(key, q.transpose(1, 2), kf, vf, spec, _softcap_mod(spec.softcap),
                         bm, scale, sinks, native_gqa=True)
    return out.transpose(1, 2), lse
