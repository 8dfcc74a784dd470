"""The value checks of a paged call (``attention_paged``), cheap enough for a
decode loop.

One device-to-host copy brings ``cache_seqlens`` and ``block_table`` over
(one synchronisation); the lengths are checked every call, in Python over B
numbers; the table's checks (used block indices in range, distinct within a
row) are remembered by value: the table's entries (its bytes) and the number
of blocks each row uses.  In a decode loop the table changes only when a row enters a new
block, so those checks run once per ``block_size`` steps, not per step.
Nothing is keyed on a tensor's identity: a table changed in place is another
key.
"""

from __future__ import annotations

import torch

from .caches import register_cache
from .errors import AttentionInputError

Tensor = torch.Tensor
_MAX_ENTRIES = 64
_tables_ok: dict[tuple, bool] = {}
register_cache("paged.table_checks", _tables_ok.clear)


def check_paged_values(block_table: Tensor, cache_seqlens: Tensor, seq_q: int,
                       num_blocks: int, block_size: int) -> None:
    """Sq <= cache_seqlens[b] <= max_blocks * block_size, and each row's used
    blocks (the first ceil(cache_seqlens[b] / block_size)) in [0, num_blocks)
    and distinct.

    Raises:
        AttentionInputError: naming ``cache_seqlens`` or ``block_table``, the
            row (and column) and the value found.
    """
    b = cache_seqlens.numel()
    both = torch.cat([cache_seqlens.int(), block_table.int().reshape(-1)]).cpu()
    lengths = both[:b].tolist()
    cap = block_table.shape[1] * block_size
    for r, n in enumerate(lengths):
        if not seq_q <= n <= cap:
            raise AttentionInputError("cache_seqlens", f"Sq = {seq_q} <= length <= max_blocks "
                                      f"* block_size = {cap} in every row", f"{n} in row {r}")
    need = tuple((n + block_size - 1) // block_size for n in lengths)
    key = (tuple(block_table.shape), _entries(both[b:]), need, num_blocks)
    if key in _tables_ok:
        return
    _check_table(both[b:].long().view(tuple(block_table.shape)), torch.tensor(need),
                 num_blocks)
    if len(_tables_ok) >= _MAX_ENTRIES:
        _tables_ok.clear()
    _tables_ok[key] = True


def _entries(t: Tensor) -> object:
    """A hashable copy of ``t``'s values: its bytes (numpy: ~2 us for a 32 x 64
    table), else a tuple of its numbers (~20x slower)."""
    try:
        return t.numpy().tobytes()
    except (RuntimeError, TypeError):  # no numpy
        return tuple(t.tolist())


def _check_table(table: Tensor, need: Tensor, num_blocks: int) -> None:
    """Used entries (column < need[row]) in range and distinct within each row."""
    cols = torch.arange(table.shape[1])
    used = cols < need[:, None]
    out = used & ((table < 0) | (table >= num_blocks))
    if out.any():
        r, c = (int(x) for x in out.nonzero()[0])
        raise AttentionInputError("block_table", f"used block indices in [0, num_blocks = "
                                  f"{num_blocks})", f"{int(table[r, c])} at row {r}, "
                                  f"column {c}")
    marked = torch.where(used, table, -1 - cols).sort(-1).values
    dup = (marked[:, 1:] == marked[:, :-1]).nonzero()
    if dup.numel():
        r = int(dup[0, 0])
        raise AttentionInputError("block_table", "distinct blocks among a row's used ones",
                                  f"block {int(marked[r, int(dup[0, 1])])} twice in row {r}")
