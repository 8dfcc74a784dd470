"""Context-parallel (ring) attention over a ``torch.distributed`` process group.

Import it explicitly (``import attention_dispatch.distributed``, or use the
attribute ``attention_dispatch.distributed``, loaded on first access)::

    from attention_dispatch.distributed import ring_attention, shard_sequence
    q_local = shard_sequence(q, rank, world, "zigzag", dim=2)      # likewise k, v
    out_local = ring_attention(q_local, k_local, v_local, causal=True, sharding="zigzag")

Each rank holds one shard of the sequence (contiguous, or zig-zag for a
balanced causal load); the K/V blocks travel around the ring with
``torch.distributed`` point-to-point operations (NCCL on GPUs, gloo on CPU),
each step runs the dispatcher's best local backend with ``return_lse=True``,
and the partial results are merged exactly (:func:`attention_dispatch.merge_attention`).
The backward pass runs the same ring again: each K/V block travels with its
dK/dV accumulators, which arrive back at their owner after the last step.
See docs/distributed.md.

:func:`simulate_ring` runs the same per-step code for every rank in one
process (no process group): a check of the step kernels and the merge on one
device.
"""

from __future__ import annotations

import struct
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist

from .._core import AttentionInputError, AttentionTypeError, resolve, validate
from .ring import (BACKWARD_IMPLS, LAYOUTS, SHARDINGS, RingConfig, accum_dtype, backward_block,
    block_kind, concat_shards, forward_block, seq_dim, shard_sequence, sink_forward, sink_grad)
from .ring_bwd import fused_reason

Tensor = torch.Tensor

__all__ = ["concat_shards", "ring_attention", "shard_sequence", "simulate_ring",
           "unshard_sequence"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- validation


def _config(q: Any, k: Any, v: Any, *, causal: Any, scale: Any, layout: Any, sharding: Any,
            backend: Any, dropout_p: Any, return_lse: Any, backward_impl: Any,
            grad_dtype: Any, sinks: Any = None) -> RingConfig:
    """Check everything that needs no communication; the step configuration."""
    if layout not in LAYOUTS:
        raise AttentionInputError("layout", "'bhsd' or 'bshd'", repr(layout))
    validate(q, k, v, causal=causal, dropout_p=dropout_p, scale=scale, layout=layout,
             return_lse=return_lse, sinks=sinks)
    if dropout_p != 0:
        raise AttentionInputError(
            "dropout_p", "0.0 (ring attention applies no dropout)", repr(dropout_p),
            "drop out elsewhere, or run single-device attention: each block's dropout "
            "mask would have to be drawn again, identically, in the backward ring")
    if sharding not in SHARDINGS:
        raise AttentionInputError("sharding", "'contiguous' or 'zigzag'", repr(sharding))
    d = seq_dim(layout)
    s_local = q.shape[d]
    if k.shape[d] != s_local:
        raise AttentionInputError("k", f"the local sequence length of q ({s_local}): q, k "
                                  "and v are shards of one sequence", str(k.shape[d]))
    if sharding == "zigzag" and s_local % 2:
        raise AttentionInputError("q", "an even local sequence length with sharding='zigzag' "
                                  "(two chunks per rank)", str(s_local),
                                  "pad the sequence to a multiple of 2 * world size")
    if backward_impl not in BACKWARD_IMPLS:
        raise AttentionInputError("backward_impl", "'auto', 'fused', 'cudnn' or 'torch'",
                                  repr(backward_impl))
    why = fused_reason(q, k, v, backward_impl) if backward_impl in ("fused", "cudnn") else None
    if why is not None:
        raise AttentionInputError("backward_impl", "'auto' or 'torch' for these tensors",
                                  repr(backward_impl), why)
    if grad_dtype is not None and grad_dtype not in _DTYPES:
        raise AttentionTypeError("grad_dtype", "None or a float dtype", repr(grad_dtype))
    resolve(backend)  # unknown backend names raise here, before any communication
    eff = float(scale) if scale is not None else q.shape[-1] ** -0.5
    return RingConfig(causal, sharding, eff, layout, backend, backward_impl,
                      grad_dtype or accum_dtype(q.dtype))


def _check_group(group: Any, q: Tensor) -> Any:
    """The process group to use (WORLD for None), checked against q's device."""
    if not (dist.is_available() and dist.is_initialized()):
        raise AttentionInputError(
            "group", "an initialized torch.distributed process group",
            "torch.distributed is not initialized",
            "call torch.distributed.init_process_group('nccl' on GPUs, 'gloo' on CPU) "
            "first, or use simulate_ring() in one process")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise AttentionTypeError("group", "None or a torch.distributed.ProcessGroup",
                                 type(group).__name__)
    group = dist.group.WORLD if group is None else group
    if dist.get_rank(group) < 0:
        raise AttentionInputError("group", "a group this process belongs to",
                                  "a group without this rank")
    name = str(dist.get_backend(group)).lower()
    if q.device.type == "cuda" and name == "gloo":
        raise AttentionInputError("group", "a group whose backend moves CUDA tensors (nccl)",
                                  "a gloo group for CUDA tensors")
    if q.device.type == "cpu" and name == "nccl":
        raise AttentionInputError("group", "a group whose backend moves CPU tensors (gloo)",
                                  "an nccl group for CPU tensors")
    return group


_FIELDS = ("batch", "heads_q", "heads_kv", "S_local", "head_dim", "head_dim_v", "dtype",
           "causal", "sharding", "layout", "scale")


def _signature(q: Tensor, k: Tensor, v: Tensor, cfg: RingConfig) -> list[int]:
    b, s, hq = (q.shape[0], q.shape[2], q.shape[1]) if cfg.layout == "bhsd" else q.shape[:3]
    hkv = k.shape[1] if cfg.layout == "bhsd" else k.shape[2]
    bits = struct.unpack("<q", struct.pack("<d", cfg.scale))[0]
    return [b, hq, hkv, s, q.shape[-1], v.shape[-1], _DTYPES.index(q.dtype), int(cfg.causal),
            SHARDINGS.index(cfg.sharding), LAYOUTS.index(cfg.layout), bits]


def _check_shards_agree(group: Any, q: Tensor, k: Tensor, v: Tensor, cfg: RingConfig) -> None:
    """One small all_gather: every rank must hold a shard of the same shape,
    dtype and options, else every rank raises the same error (no hang)."""
    dev = q.device if q.device.type == "cuda" else torch.device("cpu")
    mine = torch.tensor(_signature(q, k, v, cfg), dtype=torch.int64, device=dev)
    world = dist.get_world_size(group)
    got = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(got, mine, group=group)
    rows = [t.tolist() for t in got]
    for rank, row in enumerate(rows):
        if row != rows[0]:
            diff = [f"{n}={a} vs {b}" for n, a, b in zip(_FIELDS, row, rows[0]) if a != b]
            raise AttentionInputError(
                "q", "shards of the same shape, dtype and options on every rank",
                f"rank {rank} differs from rank 0: " + ", ".join(diff),
                "shard with shard_sequence() on every rank (equal S_local)")


# --------------------------------------------------------------------------- the ring


class _Pending:
    """In-flight ring exchange: ``wait()`` returns the received tensors."""

    def __init__(self, works: list, received: list[Tensor], sent: list[Tensor]) -> None:
        self._works, self._received, self._sent = works, received, sent

    def wait(self) -> list[Tensor]:
        for work in self._works:
            work.wait()
        self._sent = []
        return self._received


class _P2PRing:
    """Send to rank + 1 and receive from rank - 1 of a group (global ranks)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def start(self, tensors: Sequence[Tensor]) -> _Pending:
        """Post the sends of ``tensors`` (contiguous) and the matching receives."""
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in received]
        return _Pending(dist.batch_isend_irecv(ops), received, list(tensors))


def _ring_forward(q: Tensor, k: Tensor, v: Tensor, ring: _P2PRing, cfg: RingConfig
                  ) -> tuple[Tensor, Tensor]:
    """Step s: hold the block of rank (r - s) mod N; post its send to r + 1 and
    the receive of the next one, compute and merge, then wait."""
    n, r = ring.world, ring.rank
    acc, kc, vc = None, k, v
    for s in range(n):
        pending = ring.start([kc, vc]) if s < n - 1 else None
        acc = forward_block(q, kc, vc, block_kind(r, (r - s) % n, cfg.causal, cfg.sharding),
                            acc, cfg)
        if pending is not None:
            kc, vc = pending.wait()
    assert acc is not None
    return acc[0].to(q.dtype), acc[1]


def _ring_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                   ring: _P2PRing, cfg: RingConfig) -> tuple[Tensor, Tensor, Tensor]:
    """The same ring; the block's dK/dV accumulators travel with it (they are
    received before a step adds into them, sent after) and reach their owner
    after the N-th hop."""
    n, r = ring.world, ring.rank
    dq = torch.zeros(q.shape, dtype=accum_dtype(q.dtype), device=q.device)
    kc, vc, incoming = k, v, None
    for s in range(n):
        pending = ring.start([kc, vc]) if s < n - 1 else None
        if incoming is None:
            dk, dv = (torch.zeros(t.shape, dtype=cfg.grad_dtype, device=t.device) for t in (k, v))
        else:
            dk, dv = incoming.wait()
        kind = block_kind(r, (r - s) % n, cfg.causal, cfg.sharding)
        backward_block(q, kc, vc, out, dout, lse, kind, (dq, dk, dv), cfg)
        incoming = ring.start([dk, dv]) if n > 1 else None
        if pending is not None:
            kc, vc = pending.wait()
    if incoming is not None:
        dk, dv = incoming.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    """out, lse = ring attention of the local shard; lse is not differentiable."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor],
                ring: _P2PRing, cfg: RingConfig) -> tuple[Tensor, Tensor]:
        k, v = k.contiguous(), v.contiguous()
        out, lse = _ring_forward(q, k, v, ring, cfg)
        if sinks is not None:  # once, on the merged result
            out, lse = sink_forward(out, lse, sinks, cfg.layout)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.ring, ctx.cfg = ring, cfg
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: Tensor, _dlse: Optional[Tensor]) -> tuple:
        # with sinks, the blocks' backward against the sink-applied out and lse is
        # exact for q, k, v (P' = exp(s - lse') is the sink-aware probability)
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = _ring_backward(q, k, v, out, lse, dout, ctx.ring, ctx.cfg)
        dsink = None
        if sinks is not None and ctx.needs_input_grad[3]:
            dsink = sink_grad(out, dout, lse, sinks, ctx.cfg.layout)
        return dq, dk, dv, dsink, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group: Optional[Any] = None,
                   causal: bool = False, scale: Optional[float] = None, layout: str = "bhsd",
                   sharding: str = "contiguous", backend: Any = "auto",
                   dropout_p: float = 0.0, return_lse: bool = False,
                   backward_impl: str = "auto", grad_dtype: Optional[torch.dtype] = None,
                   check_shards: bool = True, sinks: Optional[Tensor] = None
                   ) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention over a sequence sharded across the ranks of ``group``.

    Shapes (this rank's shard, S_local = S / N): q (B, Hq, S_local, D),
    k (B, Hkv, S_local, D), v (B, Hkv, S_local, Dv) for layout "bhsd"
    ((B, S_local, H, D) for "bshd") -> out like q with Dv, and with
    ``return_lse`` lse (B, Hq, S_local) float32 (detached).  Every rank of the
    group must call it with shards of the same shape, in the same order.

    Args:
        group: the process group (None: the default group).  NCCL for CUDA
            tensors, gloo for CPU tensors.
        causal: causal over the GLOBAL positions of the sharded sequence.
        sharding: how the sequence is split (see :func:`shard_sequence`):
            "contiguous" or "zigzag" (balanced causal work; S_local even).
        backend: the local backend for every block, as in :func:`attention`.
        dropout_p: must be 0 (AttentionInputError otherwise).
        backward_impl: block backward: "auto" (fused flash kernel where
            possible, else plain torch), "fused" (torch's flash backward),
            "cudnn" (cuDNN's backward, CUDA) or "torch" (plain torch).
        grad_dtype: dtype of the dq accumulator and of the dK/dV accumulators
            that travel the ring; default float32 (float64 for float64 inputs).
        check_shards: one small all_gather per call checking that every rank
            passes the same shapes and options.
        sinks: (Hq,) attention sinks (as in :func:`attention`), the same on
            every rank; applied once, to the merged result.  Their gradient on
            each rank covers that rank's query rows: sum it over the group
            (as data parallelism does for any replicated parameter).

    Equivalent math (q_full etc.: the unsharded sequence)::

        out_full = attention(q_full, k_full, v_full, causal=causal, scale=scale, sinks=sinks)
        out = shard_sequence(out_full, rank, N, sharding, seq_dim)

    Raises:
        AttentionInputError / AttentionTypeError: bad input, no initialized
            process group, a group backend that cannot move these tensors,
            shards that differ between ranks (raised on every rank).
    """
    cfg = _config(q, k, v, causal=causal, scale=scale, layout=layout, sharding=sharding,
                  backend=backend, dropout_p=dropout_p, return_lse=return_lse,
                  backward_impl=backward_impl, grad_dtype=grad_dtype, sinks=sinks)
    group = _check_group(group, q)
    if check_shards:
        _check_shards_agree(group, q, k, v, cfg)
    out, lse = _RingAttention.apply(q, k, v, sinks, _P2PRing(group), cfg)
    return (out, lse) if return_lse else out


def unshard_sequence(x: Tensor, *, group: Optional[Any] = None, sharding: str = "contiguous",
                     dim: int = 2) -> Tensor:
    """The full sequence from every rank's shard ``x`` (an all_gather; the
    result carries no gradient).  Inverse of :func:`shard_sequence`.

    Shapes: x (..., S_local, ...) along ``dim`` -> (..., N * S_local, ...).

    Equivalent math::

        concat_shards(all_gather(x), sharding, dim)
    """
    if not isinstance(x, Tensor):
        raise AttentionTypeError("x", "a torch.Tensor", type(x).__name__)
    if sharding not in SHARDINGS:
        raise AttentionInputError("sharding", "'contiguous' or 'zigzag'", repr(sharding))
    group = _check_group(group, x)
    got = [torch.empty_like(x.contiguous()) for _ in range(dist.get_world_size(group))]
    dist.all_gather(got, x.detach().contiguous(), group=group)
    return concat_shards(got, sharding, dim)


# --------------------------------------------------------------------------- simulation


def _rotate(xs: list[Any]) -> list[Any]:
    """One ring hop: rank r receives what rank r - 1 held."""
    return [xs[(r - 1) % len(xs)] for r in range(len(xs))]


def _sim_forward(qs: list[Tensor], ks: list[Tensor], vs: list[Tensor], cfg: RingConfig
                 ) -> tuple[list[Tensor], list[Tensor]]:
    n = len(qs)
    acc: list[Any] = [None] * n
    kc, vc = list(ks), list(vs)
    for s in range(n):
        for r in range(n):
            kind = block_kind(r, (r - s) % n, cfg.causal, cfg.sharding)
            acc[r] = forward_block(qs[r], kc[r], vc[r], kind, acc[r], cfg)
        kc, vc = _rotate(kc), _rotate(vc)
    return [a[0].to(qs[0].dtype) for a in acc], [a[1] for a in acc]


def _sim_backward(qs: list[Tensor], ks: list[Tensor], vs: list[Tensor], outs: list[Tensor],
                  lses: list[Tensor], douts: list[Tensor], cfg: RingConfig) -> list[list[Tensor]]:
    n = len(qs)
    dq = [torch.zeros(t.shape, dtype=accum_dtype(t.dtype), device=t.device) for t in qs]
    dk = [torch.zeros(t.shape, dtype=cfg.grad_dtype, device=t.device) for t in ks]
    dv = [torch.zeros(t.shape, dtype=cfg.grad_dtype, device=t.device) for t in vs]
    kc, vc = list(ks), list(vs)
    for s in range(n):
        for r in range(n):
            kind = block_kind(r, (r - s) % n, cfg.causal, cfg.sharding)
            backward_block(qs[r], kc[r], vc[r], outs[r], douts[r], lses[r], kind,
                           (dq[r], dk[r], dv[r]), cfg)
        kc, vc, dk, dv = _rotate(kc), _rotate(vc), _rotate(dk), _rotate(dv)
    return [dq, dk, dv]


class _SimulatedRing(torch.autograd.Function):
    """simulate_ring's autograd: full-sequence tensors in, full-sequence out."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor],
                world: int, cfg: RingConfig) -> tuple[Tensor, Tensor]:
        d = seq_dim(cfg.layout)

        def shards(t: Tensor, dim: int = d) -> list[Tensor]:
            return [shard_sequence(t, r, world, cfg.sharding, dim).contiguous()
                    for r in range(world)]

        outs, lses = _sim_forward(shards(q), shards(k), shards(v), cfg)
        out, lse = concat_shards(outs, cfg.sharding, d), concat_shards(lses, cfg.sharding, 2)
        if sinks is not None:
            out, lse = sink_forward(out, lse, sinks, cfg.layout)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.world, ctx.cfg, ctx.shards = world, cfg, shards
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: Tensor, _dlse: Optional[Tensor]) -> tuple:
        q, k, v, out, lse, sinks = ctx.saved_tensors
        cfg, shards = ctx.cfg, ctx.shards
        grads = _sim_backward(shards(q), shards(k), shards(v), shards(out), shards(lse, 2),
                              shards(dout.contiguous()), cfg)
        d = seq_dim(cfg.layout)
        dq, dk, dv = (concat_shards(g, cfg.sharding, d) for g in grads)
        dsink = None
        if sinks is not None and ctx.needs_input_grad[3]:
            dsink = sink_grad(out, dout, lse, sinks, cfg.layout)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsink, None, None


def simulate_ring(q: Tensor, k: Tensor, v: Tensor, world: int, *, causal: bool = False,
                  sharding: str = "contiguous", scale: Optional[float] = None,
                  layout: str = "bhsd", backend: Any = "auto", return_lse: bool = False,
                  backward_impl: str = "auto", grad_dtype: Optional[torch.dtype] = None,
                  sinks: Optional[Tensor] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Ring attention over ``world`` simulated ranks in this process.

    Shards the FULL-sequence q (B, Hq, S, D), k, v (B, Hkv, S, D[v]) (or bshd)
    like :func:`shard_sequence`, runs every rank's ring steps in lock-step with
    the code :func:`ring_attention` runs (block attention on the local backend
    + exact merge forward; block backward with travelling dK/dV accumulators),
    and returns the full-sequence out (and lse (B, Hq, S) float32 with
    ``return_lse``); differentiable w.r.t. q, k, v (and ``sinks``, (Hq,),
    applied once to the merged result).  No process group.

    Equivalent math::

        attention(q, k, v, causal=causal, scale=scale, layout=layout)

    Raises:
        AttentionInputError / AttentionTypeError: bad input; S not divisible by
            world (contiguous) or 2 * world (zigzag).
    """
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise AttentionInputError("world", "an int >= 1", repr(world))
    if layout in LAYOUTS and isinstance(q, Tensor) and q.dim() == 4:
        parts = world * (2 if sharding == "zigzag" else 1)
        s = q.shape[seq_dim(layout)]
        if sharding in SHARDINGS and s % parts:
            raise AttentionInputError("q", f"a sequence length divisible by {parts} "
                                      f"({world} ranks, sharding {sharding!r})", str(s))
    cfg = _config(q, k, v, causal=causal, scale=scale, layout=layout, sharding=sharding,
                  backend=backend, dropout_p=0.0, return_lse=return_lse,
                  backward_impl=backward_impl, grad_dtype=grad_dtype, sinks=sinks)
    out, lse = _SimulatedRing.apply(q, k, v, sinks, world, cfg)
    return (out, lse) if return_lse else out
