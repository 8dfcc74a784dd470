"""Ring attention's per-step kernels on CUDA, through the one-process simulation.

``simulate_ring`` runs every rank's steps in one process with the code the
real ring runs: each block on the dispatcher's best CUDA backend with
``return_lse=True`` + the exact LSE merge, and the block backward against the
global out/lse, by torch's fused flash backward kernel ("fused"), cuDNN's
backward kernel ("cudnn") or plain torch ("torch").  Judged like the conformance suite: for out, lse, dq, dk, dv,
``|ring - ref| <= 2 * |math - ref| + atol(dtype) * (1 + max|ref|)`` with ref the
float64 reference and math the math backend on one device in the same dtype.

Run on a CUDA machine: ``python -m pytest tests/gpu/test_gpu_ring.py -m gpu -q``.
The multi-GPU NCCL run is ``bench/ring_bench.py`` (docs/distributed.md).
"""

from __future__ import annotations

import itertools
import warnings

import pytest

torch = pytest.importorskip("torch")

import attention_dispatch as ad  # noqa: E402
from attention_dispatch.distributed import simulate_ring  # noqa: E402
from attention_dispatch.testing import atol, reference_attention  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CASES = [
    # world, causal, sharding, (Hq, Hkv), head dim, layout
    (2, True, "zigzag", (8, 8), 128, "bhsd"),
    (2, True, "contiguous", (8, 2), 64, "bshd"),
    (2, False, "contiguous", (8, 8), 64, "bhsd"),
    (4, True, "zigzag", (8, 2), 128, "bshd"),
    (4, True, "zigzag", (8, 1), 64, "bhsd"),
    (4, False, "zigzag", (8, 8), 128, "bhsd"),
    (3, True, "contiguous", (8, 8), 128, "bhsd"),
]


def _inputs(heads: tuple[int, int], d: int, seq: int, dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = [(2, heads[0]), (2, heads[1]), (2, heads[1]), (2, heads[0])]
    return [torch.randn(b, h, seq, d, generator=g, device="cuda", dtype=dtype)
            for b, h in shape]


def _lay(t, layout):
    return t.transpose(1, 2).contiguous() if layout == "bshd" else t


def _unlay(t, layout):
    return t.transpose(1, 2) if layout == "bshd" else t


def _run(fn, tensors, layout):
    """[out, lse, dq, dk, dv] (bhsd) of fn(q, k, v) -> (out, lse), backward with dout."""
    q, k, v, do = (_lay(t, layout) for t in tensors)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    out.backward(do.to(out.dtype))
    return [_unlay(out.detach(), layout), lse] + [_unlay(t.grad, layout) for t in (q, k, v)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("impl", ["fused", "cudnn", "torch"])
@pytest.mark.parametrize("world,causal,sharding,heads,d,layout", CASES)
def test_simulated_ring_on_cuda(world, causal, sharding, heads, d, layout, impl, dtype):
    seq = 192 * world
    tensors = _inputs(heads, d, seq, dtype, seed=world * 10 + d)
    ring = _run(lambda q, k, v: simulate_ring(q, k, v, world, causal=causal, sharding=sharding,
                                              layout=layout, return_lse=True,
                                              backward_impl=impl), tensors, layout)
    base = _run(lambda q, k, v: ad.attention(q, k, v, causal=causal, layout=layout,
                                             backend="math", return_lse=True), tensors, layout)
    ref = _run(lambda q, k, v: reference_attention(q, k, v, causal=causal),
               [t.double() for t in tensors], "bhsd")
    bad = []
    for name, a, m, r in zip(("out", "lse", "dq", "dk", "dv"), ring, base, ref):
        err = (a.double() - r).abs().max().item()
        bound = 2 * (m.double() - r).abs().max().item() + atol(dtype) * (1 + r.abs().max().item())
        if not err <= bound:
            bad.append(f"{name}: {err:.3g} > {bound:.3g}")
    assert not bad, bad


@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
def test_fused_backward_is_used_and_agrees_with_plain_torch(heads):
    """"auto" takes the fused kernel on CUDA bf16 without falling back (no warning),
    and its gradients match the plain-torch block backward closely."""
    tensors = _inputs(heads, 128, 1024, torch.bfloat16, seed=5)
    runs = {}
    for impl in ("auto", "torch"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            runs[impl] = _run(lambda q, k, v: simulate_ring(
                q, k, v, 2, causal=True, sharding="zigzag", return_lse=True,
                backward_impl=impl), tensors, "bhsd")
    for name, a, b in zip(("dq", "dk", "dv"), runs["auto"][2:], runs["torch"][2:]):
        scale = 1 + b.abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 2e-2 * scale, name


def test_long_blocks_fused_backward_head_chunks(monkeypatch):
    """The fused path in several head chunks gives the same gradients as one chunk."""
    from attention_dispatch.distributed import ring_bwd as _ring_bwd

    tensors = _inputs((8, 2), 64, 2048, torch.bfloat16, seed=9)

    def run():
        return _run(lambda q, k, v: simulate_ring(q, k, v, 2, causal=True, sharding="zigzag",
                                                  return_lse=True, backward_impl="fused"),
                    tensors, "bhsd")

    whole = run()
    monkeypatch.setattr(_ring_bwd, "HEAD_CHUNK_BYTES", 1)  # one kv head per call
    chunked = run()
    for a, b in itertools.islice(zip(whole, chunked), 2, None):  # flash dq uses atomics
        assert (a.float() - b.float()).abs().max().item() <= 1e-2 * (1 + b.abs().max().item())
