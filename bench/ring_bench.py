"""Ring attention on N GPUs (NCCL) against one GPU: exactness, speed-up, longest sequence.

    python bench/ring_bench.py --gpus 2 --out ring.json
    python bench/ring_bench.py --device cpu --gpus 2 --seq 256 --out ring-cpu.json   # gloo

Every phase runs in processes spawned here (torch.multiprocessing), one per
GPU, rank r on cuda:r, process group over 127.0.0.1 (NCCL; gloo with --device cpu):

1. exactness at --check-seq (default 4096): ring forward and backward
   (gathered) against the float64 reference by the contract's accuracy rule
   (``2 * |math - ref| + atol * (1 + max|ref|)``, math = the math backend on one
   device in the same dtype), and the largest difference to single-device
   ``ad.attention`` (auto backend); causal zig-zag, causal contiguous with GQA,
   non-causal, and the plain-torch block backward.
2. timing at --seq (default 131072; B=1, H=8, D=128, bfloat16, causal, zig-zag):
   fwd and fwd+bwd, median of --repeats, one GPU (plain ``ad.attention``) vs
   N GPUs (``ring_attention``, slowest rank); speed-up = t1 / tN (goal >= 1.8
   for N = 2).
3. longest sequence (CUDA only): peak memory of fwd+bwd at --fit-start and
   twice that gives a linear model; the largest power of two it predicts to
   fit is run for real (halving on OOM), on 1 GPU and on N GPUs, one fresh
   spawn per attempt (an OOM on one rank cannot hang the others).
   --fit-exhaustive keeps doubling for real until OOM or --fit-max.

NVLink multicast is never used: NCCL_NVLS_ENABLE=0 and
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set for every process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import attention_dispatch as ad  # noqa: E402
from attention_dispatch.distributed import ring_attention, shard_sequence, unshard_sequence
from attention_dispatch.testing import atol, reference_attention  # noqa: E402

Tensor = torch.Tensor
GOAL = 1.8


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line; raises SystemExit (argparse) on bad values."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=2, help="ranks (GPUs; CPU processes)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default="ring-bench.json", help="JSON results path")
    p.add_argument("--seq", type=int, default=131072, help="timed sequence length")
    p.add_argument("--check-seq", type=int, default=4096, help="exactness sequence length")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--sharding", choices=("zigzag", "contiguous"), default="zigzag")
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--backward-impl", default="auto",
                   help="block backward of the ring: auto, fused, cudnn or torch; a comma "
                        "list times each (the first is the one checked first and sized)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fit-start", type=int, default=65536)
    p.add_argument("--fit-max", type=int, default=1 << 23)
    p.add_argument("--fit-exhaustive", action="store_true")
    p.add_argument("--fit-on", choices=("both", "one", "ring"), default="both",
                   help="search the longest sequence on one GPU, on the ring, or both")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-fit", action="store_true")
    a = p.parse_args(argv)
    a.kv_heads = a.kv_heads or a.heads
    a.impls = [x.strip() for x in a.backward_impl.split(",") if x.strip()]
    if not a.impls or any(x not in ("auto", "fused", "cudnn", "torch") for x in a.impls):
        p.error("--backward-impl: a comma list of auto, fused, cudnn, torch")
    a.backward_impl = a.impls[0]
    parts = a.gpus * (2 if a.sharding == "zigzag" else 1)
    if a.gpus < 1:
        p.error("--gpus must be >= 1")
    for name in ("seq", "check_seq", "fit_start"):
        if getattr(a, name) % parts:
            p.error(f"--{name.replace('_', '-')} must be a multiple of {parts} "
                    f"({a.gpus} ranks, {a.sharding})")
    if a.heads % a.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    return a


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(rank: int, world: int, a: argparse.Namespace, port: int) -> torch.device:
    """Bind the GPU, start the process group; the device of this rank."""
    if a.device == "cuda":
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(minutes=5))
    return dev


def worker(rank: int, world: int, a: argparse.Namespace, port: int, phase: str,
           extra: Any, out_dir: str) -> None:
    """One rank of one phase; rank 0 writes ``<phase>.json`` into out_dir."""
    dev = setup(rank, world, a, port) if world > 1 or phase != "fit1" else _single(rank, a)
    try:
        result = PHASES[phase](rank, world, a, dev, extra)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        Path(out_dir, phase + ".json").write_text(json.dumps(result))


def _single(rank: int, a: argparse.Namespace) -> torch.device:
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def spawn(phase: str, nprocs: int, a: argparse.Namespace, extra: Any = None) -> dict:
    """Run a phase on nprocs fresh processes; its result, or {"error": ...}."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(worker, args=(nprocs, a, free_port(), phase, extra, tmp), nprocs=nprocs,
                     join=True)
        except Exception as exc:  # a rank raised (OOM included) or died
            text = str(exc)
            oom = "OutOfMemoryError" in text or "out of memory" in text
            return {"error": text[-2000:], "oom": oom}
        return json.loads(Path(tmp, phase + ".json").read_text())


# --------------------------------------------------------------------------- tensors


def make(a: argparse.Namespace, seq: int, dev: torch.device, seed: int = 0) -> list[Tensor]:
    """q, k, v, dout (B, H, seq, D) in the bench dtype, the same on every rank."""
    g = torch.Generator(device=dev).manual_seed(seed)
    dt = getattr(torch, a.dtype)
    heads = (a.heads, a.kv_heads, a.kv_heads, a.heads)
    return [torch.randn(a.batch, h, seq, a.head_dim, generator=g, device=dev, dtype=dt)
            for h in heads]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median_ms(fn: Callable[[], Any], a: argparse.Namespace, dev: torch.device,
              group: bool) -> float:
    """Median wall time of fn (synchronized); with group, the slowest rank per run."""
    for _ in range(a.warmup):
        fn()
    times = []
    for _ in range(a.repeats):
        if group:
            dist.barrier()
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    if group:
        t = torch.tensor(times, dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times = t.tolist()
    return statistics.median(times)


# --------------------------------------------------------------------------- phases


def check_configs(a: argparse.Namespace) -> list[dict[str, Any]]:
    """The exactness configurations (the timed one first)."""
    gqa = max(1, a.heads // 4)
    main = dict(causal=a.causal, sharding=a.sharding, kv_heads=a.kv_heads)
    return [
        dict(main, impl=a.backward_impl),
        dict(causal=True, sharding="contiguous", kv_heads=gqa, impl=a.backward_impl),
        dict(causal=False, sharding="contiguous", kv_heads=a.kv_heads, impl=a.backward_impl),
        dict(causal=True, sharding="zigzag", kv_heads=gqa, impl="torch"),
    ] + [dict(main, impl=x) for x in a.impls[1:] if x != "torch"]


def ring_full(rank: int, world: int, tensors: list[Tensor], c: dict[str, Any],
              impl: str) -> list[Tensor]:
    """Ring fwd+bwd on this rank's shards; gathered [out, dq, dk, dv] (full sequence)."""
    q, k, v, do = (shard_sequence(t, rank, world, c["sharding"]).contiguous() for t in tensors)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ring_attention(q, k, v, causal=c["causal"], sharding=c["sharding"],
                         backward_impl=impl)
    out.backward(do)
    return [unshard_sequence(t, sharding=c["sharding"]) for t in (out, q.grad, k.grad, v.grad)]


def single(tensors: list[Tensor], causal: bool, backend: str, f64: bool = False
           ) -> list[Tensor]:
    """One-device fwd+bwd: [out, dq, dk, dv] (float64 reference with f64)."""
    q, k, v, do = tensors
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if f64:
        out = reference_attention(q.double(), k.double(), v.double(), causal=causal)[0]
        out.backward(do.double())
    else:
        out = ad.attention(q, k, v, causal=causal, backend=backend)
        out.backward(do)
    return [out.detach(), q.grad, k.grad, v.grad]


def exact_one(rank: int, world: int, a: argparse.Namespace, dev: torch.device,
              c: dict[str, Any]) -> Optional[dict[str, Any]]:
    """One exactness configuration; the verdict on rank 0 (None elsewhere)."""
    b = argparse.Namespace(**{**vars(a), "kv_heads": c["kv_heads"]})
    tensors = make(b, a.check_seq, dev, seed=1)
    got = ring_full(rank, world, tensors, c, c["impl"])
    if rank != 0:
        return None
    ref = single([t.detach() for t in tensors], c["causal"], "", f64=True)
    base = single(tensors, c["causal"], "math")
    one = single(tensors, c["causal"], "auto")
    row: dict[str, Any] = {**c, "seq": a.check_seq, "ok": True}
    for name, g_, m, r, o in zip(("out", "dq", "dk", "dv"), got, base, ref, one):
        err = (g_.double() - r).abs().max().item()
        bound = 2 * (m.double() - r).abs().max().item() + atol(g_.dtype) * (
            1 + r.abs().max().item())
        row[name] = {"error": err, "bound": bound,
                     "vs_single_device": (g_.double() - o.double()).abs().max().item()}
        row["ok"] = row["ok"] and err <= bound
    return row


def phase_check(rank: int, world: int, a: argparse.Namespace, dev: torch.device,
                extra: Any) -> Any:
    rows = [exact_one(rank, world, a, dev, c) for c in check_configs(a)]
    return {"configs": rows, "ok": rank != 0 or all(r["ok"] for r in rows)}


def fwd_bwd(call: Callable[[Tensor, Tensor, Tensor], Tensor], t: list[Tensor]
            ) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(forward-only, forward+backward) closures over q, k, v, dout."""
    q, k, v, do = t
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def fwd() -> None:
        with torch.no_grad():
            call(q, k, v)

    def both() -> None:
        call(q, k, v).backward(do)
        q.grad = k.grad = v.grad = None

    return fwd, both


def phase_timing(rank: int, world: int, a: argparse.Namespace, dev: torch.device,
                 extra: Any) -> Any:
    res: dict[str, Any] = {"seq": a.seq, "ranks": world}
    if rank == 0:  # one device, plain ad.attention on the full sequence
        full = make(a, a.seq, dev)
        res["one_backend"] = {"fwd_bwd": ad.explain(*[t.requires_grad_() for t in full[:3]],
                                                    causal=a.causal).backend}
        fwd, both = fwd_bwd(lambda q, k, v: ad.attention(q, k, v, causal=a.causal), full)
        res["one_ms"] = {"fwd": median_ms(fwd, a, dev, False),
                         "fwd_bwd": median_ms(both, a, dev, False)}
        del fwd, both, full
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    dist.barrier()
    shards = [shard_sequence(t, rank, world, a.sharding).contiguous() for t in make(a, a.seq, dev)]
    res["ring_ms_by_impl"] = {}
    for impl in a.impls:
        fwd, both = fwd_bwd(lambda q, k, v: ring_attention(
            q, k, v, causal=a.causal, sharding=a.sharding, backward_impl=impl), shards)
        res["ring_ms_by_impl"][impl] = {"fwd": median_ms(fwd, a, dev, True),
                                        "fwd_bwd": median_ms(both, a, dev, True)}
    res["ring_ms"] = res["ring_ms_by_impl"][a.impls[0]]
    if rank == 0:
        res["speedup_by_impl"] = {
            impl: {k: res["one_ms"][k] / ms[k] for k in ("fwd", "fwd_bwd")}
            for impl, ms in res["ring_ms_by_impl"].items()}
        res["speedup"] = res["speedup_by_impl"][a.impls[0]]
        res["goal"] = GOAL
        res["meets_goal"] = min(res["speedup"].values()) >= GOAL
    return res


def fit_run(rank: int, world: int, a: argparse.Namespace, dev: torch.device,
            seq: int) -> dict[str, Any]:
    """One fwd+bwd at ``seq`` (ring over the group when world > 1); peak memory."""
    free = torch.cuda.mem_get_info(dev)[0]
    torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    t = make(a, seq // world, dev, seed=rank)
    if world > 1:
        _, both = fwd_bwd(lambda q, k, v: ring_attention(
            q, k, v, causal=a.causal, sharding=a.sharding, backward_impl=a.backward_impl,
            check_shards=False), t)
    else:
        _, both = fwd_bwd(lambda q, k, v: ad.attention(q, k, v, causal=a.causal), t)
    both()
    sync(dev)
    peak = torch.tensor([float(torch.cuda.max_memory_allocated(dev)), float(free)], device=dev)
    if world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return {"seq": seq, "ok": True, "peak_gib": peak[0].item() / 2**30,
            "free_gib": peak[1].item() / 2**30, "seconds": time.perf_counter() - t0}


PHASES: dict[str, Callable[..., Any]] = {
    "check": phase_check, "timing": phase_timing,
    "fit1": lambda r, w, a, d, seq: fit_run(r, w, a, d, seq),
    "fitn": lambda r, w, a, d, seq: fit_run(r, w, a, d, seq),
}


def attempt(a: argparse.Namespace, ranks: int, seq: int) -> dict[str, Any]:
    res = spawn("fit1" if ranks == 1 else "fitn", ranks, a, seq)
    if "error" in res:
        res = {"seq": seq, "ok": False, "oom": res["oom"], "error": res["error"][-600:]}
    print(f"  fit {ranks} GPU(s) seq {seq}: {'ok' if res['ok'] else 'failed'}", flush=True)
    return res


def predict(r0: dict[str, Any], r1: dict[str, Any], cap: int) -> tuple[int, float]:
    """Largest power of two the linear peak-memory model fits in free memory."""
    slope = (r1["peak_gib"] - r0["peak_gib"]) / (r1["seq"] - r0["seq"])
    base = r0["peak_gib"] - slope * r0["seq"]
    budget = 0.95 * min(r0["free_gib"], r1["free_gib"])
    seq = r1["seq"]
    while 2 * seq <= cap and base + slope * 2 * seq <= budget:
        seq *= 2
    return seq, base + slope * 2 * seq


def search(a: argparse.Namespace, ranks: int) -> dict[str, Any]:
    """The longest power-of-two sequence whose fwd+bwd runs on ``ranks`` GPUs."""
    runs = [attempt(a, ranks, a.fit_start), attempt(a, ranks, 2 * a.fit_start)]
    if not (runs[0]["ok"] and runs[1]["ok"]):
        ok = [r["seq"] for r in runs if r["ok"]]
        return {"largest": max(ok) if ok else None, "runs": runs}
    seq, next_gib = predict(runs[0], runs[1], a.fit_max)
    best = runs[1]["seq"]
    while seq > best:
        runs.append(attempt(a, ranks, seq))
        if runs[-1]["ok"]:
            best = seq
            break
        seq //= 2
    while a.fit_exhaustive and 2 * best <= a.fit_max:
        runs.append(attempt(a, ranks, 2 * best))
        if not runs[-1]["ok"]:
            break
        best *= 2
    return {"largest": best, "predicted_peak_gib_at_double": next_gib, "runs": runs}


def fit(a: argparse.Namespace) -> dict[str, Any]:
    """Longest sequences on one GPU and/or the ring (``--fit-on``), and their ratio."""
    one = search(a, 1) if a.fit_on in ("both", "one") else {"largest": None}
    ring = search(a, a.gpus) if a.fit_on in ("both", "ring") else {"largest": None}
    ratio = ring["largest"] / one["largest"] if one["largest"] and ring["largest"] else None
    print("fit:", one["largest"], "on 1 GPU,", ring["largest"], f"on {a.gpus}", flush=True)
    return {"one_gpu": one, "ring": ring, "ratio": ratio}


def environment(a: argparse.Namespace) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "NCCL_NVLS_ENABLE": os.environ["NCCL_NVLS_ENABLE"],
                           "TORCH_SYMM_MEM_DISABLE_MULTICAST":
                               os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"]}
    if a.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
    return env


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    if a.device == "cuda" and torch.cuda.device_count() < a.gpus:
        print(f"need {a.gpus} CUDA devices, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    a.check_seq = min(a.check_seq, a.seq)
    report: dict[str, Any] = {"config": vars(a), "environment": environment(a)}
    if not a.skip_check:
        report["exactness"] = spawn("check", a.gpus, a)
        print("exactness:", json.dumps(report["exactness"].get("ok")), flush=True)
    if not a.skip_timing:
        report["timing"] = spawn("timing", a.gpus, a)
        print("timing:", json.dumps(report["timing"]), flush=True)
    if a.device == "cuda" and not a.skip_fit:
        report["fit"] = fit(a)
    Path(a.out).write_text(json.dumps(report, indent=1))
    ok = report.get("exactness", {}).get("ok", True) is True
    return 0 if ok and "error" not in report.get("timing", {}) else 1


if __name__ == "__main__":
    from attention_dispatch._core.autotuning import isolated_cache

    with isolated_cache():  # stored tuning decisions neither apply nor change
        sys.exit(main())
