"""Score and mask modifications for the flex adapters: the contract's causal,
window, softcap and ALiBi as flex ``mask_mod`` / ``score_mod`` functions, and
the document tables of packed varlen batches."""

from __future__ import annotations

from typing import Callable, Optional

import torch

Tensor = torch.Tensor


def _window_ok(d: Tensor, window: Optional[tuple[int, int]], causal: bool) -> Optional[Tensor]:
    """d = j - (i + Sk - Sq) (per document for varlen): the causal/window test."""
    keep: Optional[Tensor] = None
    left, right = window if window is not None else (-1, -1)
    for ok, test in ((left >= 0, lambda: d >= -left), (right >= 0, lambda: d <= right),
                     (causal, lambda: d <= 0)):
        if ok:
            keep = test() if keep is None else keep & test()
    return keep


def dense_mask_mod(seq_q: int, seq_k: int, causal: bool, window: Optional[tuple[int, int]],
                   kpm: Optional[Tensor], padded_k: Optional[int] = None
                   ) -> Optional[Callable[..., Tensor]]:
    """mask_mod for a dense call (None when nothing is masked).

    ``padded_k`` (> seq_k): K/V were padded to that length; keys at
    ``kv_idx >= seq_k`` are masked out, and causal/window keep the offset of
    the real lengths (``kpm``, if given, has ``padded_k`` columns then)."""
    limit = seq_k if padded_k is not None and padded_k > seq_k else None
    if not causal and window is None and kpm is None and limit is None:
        return None
    off = seq_k - seq_q

    def mask_mod(b: Tensor, h: Tensor, qi: Tensor, kv: Tensor) -> Tensor:
        keep = _window_ok(kv - (qi + off), window, causal)
        if kpm is not None:
            keep = kpm[b, kv] if keep is None else keep & kpm[b, kv]
        if limit is not None:
            keep = kv < limit if keep is None else keep & (kv < limit)
        return keep if keep is not None else kv >= 0

    return mask_mod


def make_score_mod(softcap: Optional[float], slopes: Optional[Tensor],
                   distance: Callable[[Tensor, Tensor, Tensor], Tensor],
                   row: Callable[[Tensor, Tensor], Tensor]) -> Optional[Callable[..., Tensor]]:
    """score_mod: softcap, then ALiBi.  ``distance(b, qi, kv)`` is
    i + Sk - Sq - j (per document for varlen); ``row(b, qi)`` indexes (B, Hq)
    slopes (the document index for varlen)."""
    if softcap is None and slopes is None:
        return None

    def score_mod(score: Tensor, b: Tensor, h: Tensor, qi: Tensor, kv: Tensor) -> Tensor:
        if softcap is not None:
            score = torch.tanh(score / softcap) * softcap
        if slopes is not None:
            slope = slopes[h] if slopes.dim() == 1 else slopes[row(b, qi), h]
            score = score - slope * distance(b, qi, kv).abs()
        return score

    return score_mod


class _Docs:
    """Per-token document tables of a packed call, padded to ``total_q`` /
    ``total_k`` slots (padding tokens: document -1 / -2, never equal)."""

    def __init__(self, cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int) -> None:
        from .._core.packing import seqlens, token_positions

        dev = cu_q.device
        tq, tk = int(cu_q[-1]), int(cu_k[-1])
        dq, pq = token_positions(cu_q, tq)
        dk, pk = token_positions(cu_k, tk)
        lq, lk = seqlens(cu_q).long(), seqlens(cu_k).long()
        self.doc_q = torch.full((total_q,), -1, dtype=torch.long, device=dev)
        self.doc_k = torch.full((total_k,), -2, dtype=torch.long, device=dev)
        self.centre = torch.zeros(total_q, dtype=torch.long, device=dev)  # i + Lk - Lq
        self.pos_k = torch.zeros(total_k, dtype=torch.long, device=dev)
        self.doc_q[:tq], self.doc_k[:tk] = dq, dk
        self.centre[:tq] = pq + lk[dq] - lq[dq]
        self.pos_k[:tk] = pk

    def mask_mod(self, causal: bool, window: Optional[tuple[int, int]]
                 ) -> Callable[..., Tensor]:
        doc_q, doc_k, centre, pos_k = self.doc_q, self.doc_k, self.centre, self.pos_k

        def mask_mod(b: Tensor, h: Tensor, qi: Tensor, kv: Tensor) -> Tensor:
            keep = doc_q[qi] == doc_k[kv]
            extra = _window_ok(pos_k[kv] - centre[qi], window, causal)
            return keep if extra is None else keep & extra

        return mask_mod

    def distance(self, b: Tensor, qi: Tensor, kv: Tensor) -> Tensor:
        return self.centre[qi] - self.pos_k[kv]

    def row(self, b: Tensor, qi: Tensor) -> Tensor:
        return self.doc_q[qi].clamp(min=0)
