"""GPU checks of the ``deterministic=True`` policy: every backend the policy
admits for a large multi-block training call gives bitwise identical outputs
and gradients over several runs, and the backends it refuses say why.

Run on a CUDA machine: ``python -m pytest tests/gpu/test_policies_gpu.py -m gpu -q``
(also ``bash bench/gpu_run.sh policies``).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import attention_dispatch as ad  # noqa: E402
from _helpers import skip_unless_usable  # noqa: E402  (tests/, on sys.path via conftest)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BACKENDS = ("flex", "flash-attn", "xformers", "sdpa-flash", "sdpa-mem-efficient",
            "sdpa-cudnn", "sdpa", "chunked", "math")
RUNS = 4
# many query and key blocks (128-row tiles) and a GQA group: the shapes where
# atomics-based backward passes differ from run to run
CASES = [dict(b=2, hq=8, hkv=2, sq=2048, sk=2048, d=128, causal=True),
         dict(b=1, hq=16, hkv=16, sq=1536, sk=4096, d=64, causal=False)]


def _inputs(c: dict) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = ((c["hq"], c["sq"]), (c["hkv"], c["sk"]), (c["hkv"], c["sk"]))
    q, k, v = (torch.randn(c["b"], h, s, c["d"], device="cuda", dtype=torch.bfloat16,
                           generator=g).requires_grad_() for h, s in shapes)
    dout = torch.randn(c["b"], c["hq"], c["sq"], c["d"], device="cuda", dtype=torch.bfloat16,
                       generator=g)
    return q, k, v, dout


def _run(q, k, v, dout, backend: str, causal: bool) -> list:
    out = ad.attention(q, k, v, causal=causal, backend=backend, deterministic=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    return [out.detach().clone()] + [g.clone() for g in grads]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("name", BACKENDS)
def test_deterministic_backends_are_bitwise_reproducible(name: str, case: int) -> None:
    skip_unless_usable(name)
    c = CASES[case]
    q, k, v, _ = _inputs(c)
    d = ad.explain(q, k, v, causal=c["causal"], backend=name, deterministic=True)
    if d.backend != name:
        why = d.reasons(name)
        if name in ("sdpa-flash", "sdpa-mem-efficient", "sdpa-cudnn", "xformers", "sdpa") \
                and any("backward is not deterministic" in r for r in why):
            return  # refused as declared: nothing to run
        pytest.skip(f"{name} refuses the call: {'; '.join(why)}")
    q, k, v, dout = _inputs(c)
    first = _run(q, k, v, dout, name, c["causal"])
    for _ in range(RUNS - 1):
        again = _run(q, k, v, dout, name, c["causal"])
        for what, a, b in zip(("out", "dq", "dk", "dv"), first, again):
            assert torch.equal(a, b), f"{name}: {what} differs between runs"


def test_auto_under_deterministic_is_reproducible() -> None:
    c = CASES[0]
    q, k, v, dout = _inputs(c)
    d = ad.explain(q, k, v, causal=True, deterministic=True)
    assert d.backend is not None, str(d)
    runs = [_run(q, k, v, dout, "auto", True) for _ in range(RUNS)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b), f"auto ({d.backend}) differs between runs"
