"""Ring attention (attention_dispatch.distributed) on CPU.

* real rings: gloo process groups of 2 and 4 processes (torch.multiprocessing
  spawn, one spawn per world size running every configuration), each rank
  computing its shard's output, lse and gradients; the shards are gathered
  with ``unshard_sequence`` and judged against the float64 single-process
  reference by the contract's accuracy rule (float32: ``2 * |math - ref| +
  atol * (1 + max|ref|)``; float64: ``1e-6 * (1 + max|ref|)``, the precision
  of the float32 lse every backend returns, which the merge weights inherit);
* the one-process simulation (``simulate_ring``), the sharding helpers, the
  typed errors, ``Attend(context_parallel_group=...)``.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch.distributed import (concat_shards, ring_attention, shard_sequence,
    simulate_ring, unshard_sequence)
from attention_dispatch.testing import atol, reference_attention

HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA


def configs(world: int) -> list[dict[str, Any]]:
    """dtype x causal x sharding x heads; layout, backward kernel and scale vary."""
    out = []
    for n, (dt, causal, sharding, (hq, hkv)) in enumerate(itertools.product(
            ("float64", "float32"), (False, True), ("contiguous", "zigzag"), HEADS)):
        out.append(dict(dtype=dt, causal=causal, sharding=sharding, hq=hq, hkv=hkv,
                        layout=("bhsd", "bshd")[n % 2], impl=("auto", "torch")[(n // 2) % 2],
                        scale=0.3 if n % 5 == 0 else None, b=2, s=6 * world, d=16, seed=n))
    return out


def full_inputs(c: dict[str, Any]) -> list[torch.Tensor]:
    """q, k, v, dout in float64, (B, H, S, D), identical on every rank."""
    g = torch.Generator().manual_seed(c["seed"])
    shapes = [(c["b"], c["hq"]), (c["b"], c["hkv"]), (c["b"], c["hkv"]), (c["b"], c["hq"])]
    return [torch.randn(b, h, c["s"], c["d"], generator=g, dtype=torch.float64)
            for b, h in shapes]


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(1, 2).contiguous() if layout == "bshd" else t


def from_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(1, 2) if layout == "bshd" else t


def reference(c: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(float64 reference, math backend in the dtype): [out, lse, dq, dk, dv], bhsd."""
    q, k, v, do = full_inputs(c)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = reference_attention(qr, kr, vr, causal=c["causal"], scale=c["scale"])
    out.backward(do)
    ref = [out.detach(), lse, qr.grad, kr.grad, vr.grad]
    dt = getattr(torch, c["dtype"])
    qm, km, vm = (to_layout(t.to(dt), c["layout"]).requires_grad_() for t in (q, k, v))
    om, lm = ad.attention(qm, km, vm, causal=c["causal"], scale=c["scale"], layout=c["layout"],
                          backend="math", return_lse=True)
    om.backward(to_layout(do.to(dt), c["layout"]))
    base = [from_layout(om.detach(), c["layout"]), lm] + [from_layout(t.grad, c["layout"])
                                                          for t in (qm, km, vm)]
    return ref, base


def violations(c: dict[str, Any], got: list[torch.Tensor]) -> list[str]:
    """The accuracy rule on [out, lse, dq, dk, dv]; an empty list when it holds."""
    ref, base = reference(c)
    bad = []
    for name, a, m, r in zip(("out", "lse", "dq", "dk", "dv"), got, base, ref):
        err = (a.double() - r).abs().max().item()
        if c["dtype"] == "float64":
            bound = 1e-6 * (1 + r.abs().max().item())
        else:
            bound = 2 * (m.double() - r).abs().max().item() + atol(torch.float32) * (
                1 + r.abs().max().item())
        if not err <= bound:
            bad.append(f"{name}: error {err:.3g} > bound {bound:.3g}")
    return bad


# --------------------------------------------------------------------------- gloo rings


def run_config(rank: int, world: int, c: dict[str, Any]) -> list[torch.Tensor]:
    """This rank's ring call on its shard; the gathered [out, lse, dq, dk, dv], bhsd."""
    q, k, v, do = full_inputs(c)
    dt, lay, sh = getattr(torch, c["dtype"]), c["layout"], c["sharding"]
    dim = 2 if lay == "bhsd" else 1

    def shard(t: torch.Tensor) -> torch.Tensor:
        return shard_sequence(to_layout(t.to(dt), lay), rank, world, sh, dim).contiguous()

    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    out, lse = ring_attention(ql, kl, vl, causal=c["causal"], scale=c["scale"], layout=lay,
                              sharding=sh, return_lse=True, backward_impl=c["impl"])
    out.backward(shard(do))
    gathered = [unshard_sequence(t, sharding=sh, dim=dim) for t in (out, ql.grad, kl.grad,
                                                                    vl.grad)]
    full = [from_layout(t, lay) for t in gathered]
    return [full[0], unshard_sequence(lse, sharding=sh, dim=2)] + full[1:]


def error_checks(rank: int, world: int) -> list[str]:
    """Typed errors raised consistently on every rank (no hang)."""
    from attention_dispatch import AttentionInputError

    found = []
    x = torch.randn(1, 2, 4 if rank == 0 else 6, 8)
    try:  # shards of different lengths across ranks
        ring_attention(x, x, x)
    except AttentionInputError as exc:
        found.append(exc.argument + ":" + ("S_local" in str(exc)) * "S_local")
    y = torch.randn(1, 2, 3, 8)
    try:  # odd local length with zig-zag
        ring_attention(y, y, y, sharding="zigzag", causal=True)
    except AttentionInputError as exc:
        found.append(exc.argument)
    return found


def attend_check(rank: int, world: int) -> float:
    """Attend(context_parallel_group=WORLD) vs single-process attention (max error)."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 4 * world, 8, generator=g, dtype=torch.float64)
               for _ in range(3))
    attend = ad.Attend(causal=True, context_parallel_group=dist.group.WORLD)
    local = attend(*(shard_sequence(t, rank, world, "zigzag") for t in (q, k, v)))
    ref = reference_attention(q, k, v, causal=True)[0]
    return (unshard_sequence(local, sharding="zigzag") - ref).abs().max().item()


def sinks_check(rank: int, world: int) -> float:
    """ring_attention with sinks (the sink applied once, to the merged result) vs
    the reference: the gathered output, dq and the sinks' gradient summed over
    the group (each rank's covers its own query rows).  Max error."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(8)
    q, k, v, do = (torch.randn(2, h, 4 * world, 8, generator=g, dtype=torch.float64)
                   for h in (4, 2, 2, 4))
    sinks = torch.randn(4, generator=g, dtype=torch.float64)
    ql, kl, vl, dol = (shard_sequence(t, rank, world, "zigzag").contiguous()
                       for t in (q, k, v, do))
    ql.requires_grad_()
    sl = sinks.clone().requires_grad_()
    out = ring_attention(ql, kl, vl, causal=True, sharding="zigzag", sinks=sl)
    out.backward(dol)
    dist.all_reduce(sl.grad)
    qr, sr = q.clone().requires_grad_(), sinks.clone().requires_grad_()
    ref, _ = reference_attention(qr, k, v, causal=True, sinks=sr)
    ref.backward(do)
    pairs = ((unshard_sequence(out, sharding="zigzag"), ref),
             (unshard_sequence(ql.grad, sharding="zigzag"), qr.grad), (sl.grad, sr.grad))
    return max((a - b).abs().max().item() for a, b in pairs)


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank: every configuration, then the error and Attend checks; rank 0
    writes the findings (a comparison failure is data, an exception kills the spawn)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    report: dict[str, Any] = {"failures": {}, "count": 0}
    for c in configs(world):
        got = run_config(rank, world, c)
        bad = violations(c, got) if rank == 0 else []
        report["count"] += 1
        if bad:
            report["failures"][json.dumps(c)] = bad
    report["errors"] = error_checks(rank, world)
    report["attend_error"] = attend_check(rank, world)
    report["sinks_error"] = sinks_check(rank, world)
    dist.barrier()
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
def test_ring_matches_single_process(world: int, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:  # the children import this module by name
        sys.path.insert(0, here)
    mp.spawn(worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert reports[0]["count"] == len(configs(world)) == 24
    assert reports[0]["failures"] == {}, json.dumps(reports[0]["failures"], indent=1)
    for rep in reports:
        assert rep["errors"] == ["q:S_local", "q"]
        assert rep["attend_error"] < 1e-6
        assert rep["sinks_error"] < 1e-6


# --------------------------------------------------------------------------- one process


@pytest.mark.parametrize("world,causal,sharding,heads,dtype,impl", [
    (1, True, "zigzag", (4, 4), "float64", "torch"),
    (2, False, "contiguous", (4, 2), "float32", "auto"),
    (3, True, "contiguous", (4, 1), "float64", "auto"),
    (3, True, "zigzag", (4, 2), "float32", "torch"),
    (4, True, "zigzag", (4, 4), "float32", "fused"),
    (4, False, "zigzag", (4, 1), "float64", "fused"),
])
def test_simulated_ring(world, causal, sharding, heads, dtype, impl) -> None:
    c = dict(dtype=dtype, causal=causal, sharding=sharding, hq=heads[0], hkv=heads[1],
             layout="bshd" if world % 2 else "bhsd", impl=impl, scale=None, b=2, s=8 * world,
             d=16, seed=world)
    q, k, v, do = full_inputs(c)
    dt, lay = getattr(torch, dtype), c["layout"]
    qs, ks, vs = (to_layout(t.to(dt), lay).requires_grad_() for t in (q, k, v))
    out, lse = simulate_ring(qs, ks, vs, world, causal=causal, sharding=sharding, layout=lay,
                             return_lse=True, backward_impl=impl)
    out.backward(to_layout(do.to(dt), lay))
    got = [from_layout(out.detach(), lay), lse] + [from_layout(t.grad, lay)
                                                   for t in (qs, ks, vs)]
    assert violations(c, got) == []


def test_simulated_ring_bfloat16_within_contract() -> None:
    """bf16 blocks, fp32 merge and accumulators: within the bf16 accuracy rule."""
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, 4, 64, 32, generator=g) for _ in range(4))
    ref = reference_attention(*(t.double().requires_grad_() for t in (q, k, v)), causal=True)
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = simulate_ring(qb, kb, vb, 4, causal=True, sharding="zigzag")
    err = (out.double() - ref[0]).abs().max().item()
    assert err <= atol(torch.bfloat16) * (1 + ref[0].abs().max().item())
    out.backward(do.bfloat16())
    assert all(torch.isfinite(t.grad).all() for t in (qb, kb, vb))


@pytest.mark.parametrize("sharding", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_roundtrip(sharding: str, world: int) -> None:
    x = torch.arange(2 * 12 * 3).reshape(2, 12, 3)
    shards = [shard_sequence(x, r, world, sharding, dim=1) for r in range(world)]
    assert torch.equal(concat_shards(shards, sharding, dim=1), x)
    if sharding == "zigzag" and world == 2:  # chunks [0, 3] and [1, 2] of 4
        assert shards[0][0, :, 0].tolist() == [0, 3, 6, 27, 30, 33]


def test_bad_input_raises_typed_errors() -> None:
    from attention_dispatch import AttentionInputError, AttentionTypeError

    x = torch.randn(1, 2, 4, 8)
    cases = [
        (dict(sharding="diagonal"), AttentionInputError, "sharding"),
        (dict(layout="sbhd"), AttentionInputError, "layout"),
        (dict(dropout_p=0.1), AttentionInputError, "dropout_p"),
        (dict(backward_impl="cuda"), AttentionInputError, "backward_impl"),
        (dict(backward_impl="cudnn"), AttentionInputError, "backward_impl"),  # CUDA only
        (dict(grad_dtype=torch.int32), AttentionTypeError, "grad_dtype"),
        (dict(causal=1), AttentionTypeError, "causal"),
        (dict(backend="flsh"), AttentionInputError, "backend"),
        (dict(), AttentionInputError, "group"),  # torch.distributed not initialized here
        (dict(group="world"), AttentionInputError, "group"),
    ]
    for kw, exc, arg in cases:
        with pytest.raises(exc) as info:
            ring_attention(x, x, x, **kw)
        assert info.value.argument == arg, (kw, info.value)
    with pytest.raises(AttentionInputError) as info:
        ring_attention(x, x[:, :, :2], x[:, :, :2])
    assert info.value.argument == "k"
    with pytest.raises(AttentionInputError) as info:
        simulate_ring(x, x, x, 3)
    assert info.value.argument == "q"
    with pytest.raises(AttentionInputError) as info:
        shard_sequence(x, 2, 2)
    assert info.value.argument == "rank"
    with pytest.raises(AttentionInputError) as info:
        ad.Attend(context_parallel_group=object())(x, x, x, mask=torch.ones(1, 4).bool())
    assert info.value.argument == "mask"


def test_lazy_public_module() -> None:
    import attention_dispatch.distributed as mod

    assert ad.distributed is mod and "distributed" not in ad.__all__
    with pytest.raises(AttributeError):
        ad.no_such_name  # noqa: B018


# --------------------------------------------------------------------------- bench/ring_bench.py

BENCH = Path(__file__).resolve().parents[1] / "bench" / "ring_bench.py"


@pytest.fixture
def bench_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    import importlib.util

    for var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST"):
        monkeypatch.setenv(var, "unset-by-test")  # restored at teardown
    spec = importlib.util.spec_from_file_location("ring_bench_under_test", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"  # never NVLink multicast
    assert os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    return mod


def test_bench_arguments(bench_module: Any) -> None:
    a = bench_module.parse_args(["--gpus", "2", "--out", "ring.json"])
    assert (a.backward_impl, a.impls) == ("auto", ["auto"])
    assert bench_module.parse_args(["--backward-impl", "fused,cudnn"]).impls == ["fused", "cudnn"]
    assert (a.gpus, a.seq, a.heads, a.kv_heads, a.head_dim, a.dtype, a.sharding, a.causal) == (
        2, 131072, 8, 8, 128, "bfloat16", "zigzag", True)
    for bad in (["--seq", "130"], ["--gpus", "0"], ["--heads", "6", "--kv-heads", "4"],
                ["--device", "tpu"], ["--backward-impl", "auto,flash"]):
        with pytest.raises(SystemExit):
            bench_module.parse_args(bad)
    r0 = {"seq": 1 << 16, "peak_gib": 3.0, "free_gib": 79.0}
    r1 = {"seq": 1 << 17, "peak_gib": 5.0, "free_gib": 79.0}
    seq, _ = bench_module.predict(r0, r1, 1 << 23)  # 1 GiB + 2 GiB per 64k tokens
    assert seq == 1 << 21


def test_bench_cpu_gloo(tmp_path: Path) -> None:
    import subprocess

    out = tmp_path / "ring.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--gpus", "2",
                           "--seq", "256", "--heads", "4", "--head-dim", "32", "--warmup", "0",
                           "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["exactness"]["ok"] is True and len(data["exactness"]["configs"]) == 4
    assert set(data["timing"]["speedup"]) == {"fwd", "fwd_bwd"}
    assert "fit" not in data  # CUDA only
