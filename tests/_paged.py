"""Paged KV-cache test cases and their independent float64 reference (shared
by the CPU tests, the fuzz test and the GPU tests).

The reference rebuilds each row's keys from the block table with plain
Python loops (no code of the package but ``reference_attention``) and runs
one dense float64 call per row: Sk = the row's length, so its bottom-right
causal offset is L - Sq.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from attention_dispatch.testing import reference_attention

Tensor = torch.Tensor


@dataclass
class PagedCase:
    q: Tensor            # (B, Sq, Hq, D)
    k_cache: Tensor      # (NB, bs, Hkv, D)
    v_cache: Tensor      # (NB, bs, Hkv, Dv)
    block_table: Tensor  # (B, max_blocks) int32
    cache_seqlens: Tensor  # (B,) int32


def make_case(lengths: list[int], sq: int, hq: int, hkv: int, d: int, bs: int, *,
              dv: Optional[int] = None, max_blocks: Optional[int] = None, spare: int = 3,
              dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
              poison: bool = True, tail: float = float("nan"),
              garbage_table: bool = True) -> PagedCase:
    """A random paged cache: every row's used blocks drawn from a random
    permutation of the blocks (non-contiguous), ``spare`` blocks no row uses.
    ``poison``: NaN in every unused block and ``tail`` (NaN unless given) in
    the slots past a row's length in its last block; ``garbage_table``: the table's entries past a row's used blocks
    hold out-of-range values (-1, num_blocks + 7), which must never be read."""
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    b = len(lengths)
    need = [max(1, -(-n // bs)) for n in lengths]
    maxb = max(need) if max_blocks is None else max_blocks
    nb = sum(need) + spare
    perm = torch.randperm(nb, generator=g)
    table = torch.zeros(b, maxb, dtype=torch.int32)
    used_slots = torch.zeros(nb, bs, dtype=torch.bool)
    used_blocks = torch.zeros(nb, dtype=torch.bool)
    at = 0
    for r, (n, u) in enumerate(zip(lengths, need)):
        table[r, :u] = perm[at:at + u].int()
        for j in range(n):
            used_slots[table[r, j // bs], j % bs] = True
        used_blocks[table[r, :u].long()] = True
        if garbage_table and u < maxb:
            table[r, u:] = torch.tensor([-1, nb + 7], dtype=torch.int32).repeat(maxb)[:maxb - u]
        at += u
    kc = torch.randn(nb, bs, hkv, d, generator=g, dtype=torch.float64)
    vc = torch.randn(nb, bs, hkv, dv, generator=g, dtype=torch.float64)
    if poison:
        tails = ~used_slots & used_blocks[:, None]
        for c in (kc, vc):
            c[tails] = tail
            c[~used_blocks] = float("nan")
    q = torch.randn(b, sq, hq, d, generator=g, dtype=torch.float64)
    to = dict(dtype=dtype, device=device)
    return PagedCase(q.to(**to), kc.to(**to), vc.to(**to), table.to(device),
                     torch.tensor(lengths, dtype=torch.int32, device=device))


def row_keys(case: PagedCase, b: int) -> tuple[Tensor, Tensor]:
    """Row b's keys and values (L, Hkv, D|Dv), rebuilt slot by slot."""
    bs = case.k_cache.shape[1]
    n = int(case.cache_seqlens[b])
    table = case.block_table[b].tolist()
    ks = [case.k_cache[table[j // bs], j % bs] for j in range(n)]
    vs = [case.v_cache[table[j // bs], j % bs] for j in range(n)]
    return torch.stack(ks), torch.stack(vs)


def paged_reference(case: PagedCase, *, causal: bool = True, scale: Optional[float] = None,
                    window: Optional[tuple[int, int]] = None,
                    softcap: Optional[float] = None, sinks: Optional[Tensor] = None
                    ) -> tuple[Tensor, Tensor]:
    """float64 (out (B, Sq, Hq, Dv), lse (B, Hq, Sq)) on the CPU."""
    outs, lses = [], []
    scale = 1.0 / math.sqrt(case.q.shape[-1]) if scale is None else scale
    for b in range(case.q.shape[0]):
        k, v = (t.double().cpu() for t in row_keys(case, b))
        q = case.q[b].double().cpu()
        o, lse = reference_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                     v.transpose(0, 1)[None], causal=causal, scale=scale,
                                     window=window, softcap=softcap,
                                     sinks=None if sinks is None else sinks.double().cpu())
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.stack(outs), torch.stack(lses)


def max_err(a: Tensor, ref: Tensor) -> float:
    """max |a - ref| (NaN if a has NaN: never passes a bound)."""
    diff = (a.double().cpu() - ref).abs()
    return float("nan") if torch.isnan(diff).any() else diff.max().item()
