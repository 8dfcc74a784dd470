"""The per-step pieces of ring attention, shared by the real ring
(:func:`attention_dispatch.distributed.ring_attention`) and its one-process
simulation (:func:`attention_dispatch.distributed.simulate_ring`).

* sequence sharding: contiguous and zig-zag layouts (:func:`shard_sequence`,
  :func:`concat_shards`);
* which part of a kv block a rank's queries see (:func:`block_kind`);
* the forward step: the block's attention on the dispatcher's local backend
  with ``return_lse=True``, merged into the running (out, lse) with the exact
  LSE merge (:func:`forward_block`);
* the backward step: the block's gradients against the GLOBAL out and lse,
  added into the dq / dk / dv accumulators (:func:`backward_block`), by a fused
  flash backward kernel (:mod:`._ring_bwd`) or in plain torch.

Tensors are (B, H, S, D) ("bhsd") or (B, S, H, D) ("bshd"); lse is always
(B, H, S) float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .._core import AttentionInputError, AttentionTypeError, apply_sinks, attention
from ..structured.merge import merge_attention
from .ring_bwd import block_grads

Tensor = torch.Tensor

SHARDINGS = ("contiguous", "zigzag")
LAYOUTS = ("bhsd", "bshd")
BACKWARD_IMPLS = ("auto", "fused", "cudnn", "torch")

# what the queries of rank r see of the kv block that came from rank j
SKIP = "skip"          # nothing (contiguous causal, j > r)
FULL = "full"          # every query sees every key
CAUSAL = "causal"      # the diagonal block: standard causal, Sq == Sk
KV_FIRST = "kv_first"  # zig-zag, j < r: every query sees the block's first half
Q_SECOND = "q_second"  # zig-zag, j > r: the second half of the queries sees it all

ALL = slice(None)


@dataclass(frozen=True)
class RingConfig:
    """What every step needs besides the tensors."""

    causal: bool
    sharding: str
    scale: float
    layout: str
    backend: Any
    backward_impl: str
    grad_dtype: torch.dtype   # dtype of the dq accumulator and the travelling dk/dv


def seq_dim(layout: str) -> int:
    """The sequence axis of a q/k/v/out tensor in ``layout``."""
    return 2 if layout == "bhsd" else 1


def bhsd(t: Tensor, layout: str) -> Tensor:
    """A (B, H, S, D) view of ``t``."""
    return t.transpose(1, 2) if layout == "bshd" else t


def rows(t: Tensor, layout: str, sl: slice) -> Tensor:
    """The view of ``t`` restricted to the sequence positions ``sl``."""
    return t[:, :, sl] if layout == "bhsd" else t[:, sl]


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- sharding


def _check_shardable(x: Any, world: int, sharding: str, dim: int) -> int:
    """Validate shard_sequence's arguments; return the chunk length."""
    if not isinstance(x, Tensor):
        raise AttentionTypeError("x", "a torch.Tensor", type(x).__name__)
    if sharding not in SHARDINGS:
        raise AttentionInputError("sharding", "'contiguous' or 'zigzag'", repr(sharding))
    if not isinstance(world, int) or world < 1:
        raise AttentionInputError("world", "an int >= 1", repr(world))
    if not -x.dim() <= dim < x.dim():
        raise AttentionInputError("dim", f"an axis of a {x.dim()}-D tensor", repr(dim))
    parts = world * (2 if sharding == "zigzag" else 1)
    if x.shape[dim] % parts:
        raise AttentionInputError(
            "x", f"a sequence length (axis {dim}) divisible by {parts} "
            f"({world} ranks, sharding {sharding!r})", str(x.shape[dim]),
            "pad the sequence to a multiple of " + str(parts))
    return x.shape[dim] // parts


def shard_sequence(x: Tensor, rank: int, world: int, sharding: str = "contiguous",
                   dim: int = 2) -> Tensor:
    """This rank's shard of the full-sequence tensor ``x`` along ``dim``.

    contiguous: rank r holds positions [r*S/N, (r+1)*S/N) (a view).
    zigzag: the sequence is cut into 2N chunks c_0..c_{2N-1} of S/(2N); rank r
    holds [c_r, c_{2N-1-r}], concatenated in that order, which balances the
    causal work (every rank gets one early and one late chunk).

    Equivalent math::

        contiguous: x.chunk(N, dim)[r]
        zigzag:     cat([x.chunk(2N, dim)[r], x.chunk(2N, dim)[2N-1-r]], dim)
    """
    c = _check_shardable(x, world, sharding, dim)
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise AttentionInputError("rank", f"an int in [0, {world})", repr(rank))
    if sharding == "contiguous":
        return x.narrow(dim, rank * c, c)
    return torch.cat([x.narrow(dim, rank * c, c), x.narrow(dim, (2 * world - 1 - rank) * c, c)],
                     dim)


def concat_shards(shards: Sequence[Tensor], sharding: str = "contiguous", dim: int = 2
                  ) -> Tensor:
    """The full sequence from every rank's shard (``shards[r]`` from rank r);
    the inverse of :func:`shard_sequence`.  Differentiable (slices and cat).

    Equivalent math::

        contiguous: cat(shards, dim)
        zigzag:     cat([s.chunk(2, dim)[0] for s in shards]
                        + [s.chunk(2, dim)[1] for s in reversed(shards)], dim)
    """
    if sharding not in SHARDINGS:
        raise AttentionInputError("sharding", "'contiguous' or 'zigzag'", repr(sharding))
    if len(shards) == 0:
        raise AttentionInputError("shards", "at least one shard", "an empty list")
    if sharding == "contiguous":
        return torch.cat(list(shards), dim)
    half = shards[0].shape[dim] // 2
    firsts = [s.narrow(dim, 0, half) for s in shards]
    seconds = [s.narrow(dim, half, s.shape[dim] - half) for s in reversed(shards)]
    return torch.cat(firsts + seconds, dim)


# --------------------------------------------------------------------------- block plan


def block_kind(rank: int, src: int, causal: bool, sharding: str) -> str:
    """What the queries of ``rank`` see of the kv block owned by ``src``."""
    if not causal:
        return FULL
    if src == rank:
        return CAUSAL
    if sharding == "contiguous":
        return FULL if src < rank else SKIP
    return KV_FIRST if src < rank else Q_SECOND


def block_rows(kind: str, s_local: int) -> tuple[slice, slice]:
    """(query rows, kv rows) of the local shard and of the block that a step uses."""
    half = s_local // 2
    if kind == KV_FIRST:
        return ALL, slice(0, half)
    if kind == Q_SECOND:
        return slice(half, s_local), ALL
    return ALL, ALL


# --------------------------------------------------------------------------- forward


def forward_block(q: Tensor, k: Tensor, v: Tensor, kind: str,
                  acc: Optional[tuple[Tensor, Tensor]], cfg: RingConfig
                  ) -> Optional[tuple[Tensor, Tensor]]:
    """One forward step: attention of the local queries over one kv block,
    merged into the running ``acc`` = (out in accum dtype, lse float32).

    Shapes: q (B, Hq, S, D) / k, v (B, Hkv, S, D[v]) in ``cfg.layout``;
    ``acc`` None before the first block (which must cover every query row).

    Equivalent math::

        o, l = attention(q[qr], k[kr], v[kr], causal=kind == CAUSAL, return_lse=True)
        acc[qr] = merge_attention([acc[qr], o], [acc_lse[qr], l])
    """
    if kind == SKIP:
        return acc
    lay = cfg.layout
    qr, kr = block_rows(kind, q.shape[seq_dim(lay)])
    o, lse = attention(rows(q, lay, qr), rows(k, lay, kr), rows(v, lay, kr),
                       causal=kind == CAUSAL, scale=cfg.scale, layout=lay,
                       backend=cfg.backend, return_lse=True)
    o = o.to(accum_dtype(q.dtype))
    if acc is None:
        if qr != ALL:
            raise AssertionError("the first ring step must cover every query")
        return o, lse
    out, lse_acc = acc
    if qr == ALL:
        return merge_attention([out, o], [lse_acc, lse], layout=lay)
    part, part_lse = merge_attention([rows(out, lay, qr), o], [lse_acc[:, :, qr], lse],
                                     layout=lay)
    rows(out, lay, qr).copy_(part)
    lse_acc[:, :, qr] = part_lse
    return out, lse_acc


# --------------------------------------------------------------------------- backward


def backward_block(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor,
                   kind: str, grads: tuple[Tensor, Tensor, Tensor], cfg: RingConfig) -> None:
    """One backward step: add this kv block's share of dq (local queries) and
    of dk, dv (the block's keys) into ``grads`` = (dq, dk, dv) accumulators.

    Every tensor is in ``cfg.layout``; ``out`` and ``lse`` are the GLOBAL output
    and lse of the local queries (over every block), so the block's
    probabilities are exactly its share of the full softmax.

    Equivalent math (GQA: kv heads expanded, dk/dv summed over each group)::

        p  = exp(scale * q[qr] @ k[kr]^T - lse[qr])    (masked like the forward)
        dv[kr] += p^T @ dout[qr]
        ds = p * (dout[qr] @ v[kr]^T - rowsum(dout[qr] * out[qr]))
        dq[qr] += scale * ds @ k[kr];   dk[kr] += scale * ds^T @ q[qr]
    """
    if kind == SKIP:
        return
    lay = cfg.layout
    qr, kr = block_rows(kind, q.shape[seq_dim(lay)])

    def view(t: Tensor, sl: slice) -> Tensor:
        return bhsd(rows(t, lay, sl), lay)

    dq, dk, dv = grads
    block_grads(view(q, qr), view(k, kr), view(v, kr), view(out, qr), view(dout, qr),
                lse[:, :, qr], causal=kind == CAUSAL, scale=cfg.scale,
                impl=cfg.backward_impl, into=(view(dq, qr), view(dk, kr), view(dv, kr)))


def _lse_to_out(layout: str) -> Any:
    """Lines an lse-shaped (B, H, S) tensor up with an output in ``layout``."""
    if layout == "bhsd":
        return lambda x: x.unsqueeze(-1)
    return lambda x: x.transpose(1, 2).unsqueeze(-1)


def sink_forward(out: Tensor, lse: Tensor, sinks: Tensor, layout: str
                 ) -> tuple[Tensor, Tensor]:
    """Attention sinks (Hq,) applied once, to the merged (out, lse) of every block:
    out * sigmoid(lse - s), logaddexp(lse, s) (lse (B, Hq, S) float32)."""
    o, l = apply_sinks(out, lse, sinks.detach().view(1, -1, 1), _lse_to_out(layout))
    return o, l.float()


def sink_grad(out: Tensor, dout: Tensor, lse: Tensor, sinks: Tensor, layout: str) -> Tensor:
    """d loss / d sinks for this rank's query rows, given the sink-applied out
    and lse (the block backward, run with those, is then exact for q, k, v).

    Equivalent math::

        dsink[h] = -sum_{b,i} exp(s[h] - lse'[b,h,i]) * rowsum(dout * out')[b,h,i]
    """
    delta = (dout.float() * out.float()).sum(-1)
    if layout == "bshd":
        delta = delta.transpose(1, 2)
    p_sink = torch.exp(sinks.detach().float().view(1, -1, 1) - lse.float())
    return (-(p_sink * delta).sum((0, 2))).to(sinks.dtype)
