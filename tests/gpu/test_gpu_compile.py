"""torch.compile(fullgraph=True) of attention() on CUDA: the dispatcher decides at
trace time, so the compiled call runs the chosen kernel with nothing left per
call.  Outputs (and gradients) against the float64 reference, with the
contract's rule (math in the same dtype as the baseline), for the CUDA
backends, tiny and ordinary shapes, causal and GQA.

Run on a CUDA machine: ``python -m pytest tests/gpu/test_gpu_compile.py -m gpu -q``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import attention_dispatch as ad  # noqa: E402
from attention_dispatch.testing import reference_attention  # noqa: E402
from _helpers import skip_unless_usable  # noqa: E402  (tests/, on sys.path via conftest)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    """Each test traces from scratch: the lambdas of one test share a code
    object across its parametrisations, and dynamo's recompile limit (8 per
    code object) would end a fullgraph compile after the eighth."""
    torch._dynamo.reset()


SHAPES = [  # (B, Hq, Hkv, S, D, causal)
    (1, 2, 2, 8, 16, False),      # tiny: bench/overhead.py's call
    (2, 4, 4, 256, 64, True),
    (2, 8, 2, 192, 128, True),    # GQA 4
]
BACKENDS = ["auto", "sdpa-flash", "sdpa-cudnn", "sdpa-mem-efficient", "flash-attn"]


def _inputs(shape: tuple, grad: bool) -> tuple:
    b, hq, hkv, s, d, _ = shape
    g = torch.Generator(device="cuda").manual_seed(s + d)
    return tuple(torch.randn(b, h, s, d, device="cuda", dtype=torch.float16, generator=g)
                 .requires_grad_(grad) for h in (hq, hkv, hkv))


def _errors(out: torch.Tensor, q, k, v, causal: bool) -> tuple[float, float]:
    """(error of ``out``, error of math in float16) against the float64 reference."""
    ref = reference_attention(q.detach().double(), k.detach().double(),
                              v.detach().double(), causal=causal)[0]
    with torch.no_grad():
        base = ad.attention(q, k, v, causal=causal, backend="math")
    return ((out.detach().double() - ref).abs().max().item(),
            (base.double() - ref).abs().max().item())


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_compiled_forward_matches_the_reference(name: str, shape: tuple) -> None:
    if name != "auto":
        skip_unless_usable(name)
    causal = shape[-1]
    q, k, v = _inputs(shape, grad=False)
    try:
        ad.explain(q, k, v, causal=causal, backend=name)
    except ad.BackendUnavailable as exc:
        pytest.skip(f"{name} refuses: {exc}")
    f = torch.compile(lambda q, k, v: ad.attention(q, k, v, causal=causal, backend=name),
                      fullgraph=True)
    with torch.no_grad():
        out = f(q, k, v)
        eager = ad.attention(q, k, v, causal=causal, backend=name)
    err, err_math = _errors(out, q, k, v, causal)
    assert err <= 2 * err_math + 2e-3, (err, err_math)
    assert (out - eager).abs().max().item() <= 2e-3


@pytest.mark.parametrize("name", ["auto", "sdpa-cudnn", "sdpa-flash"])
def test_compiled_backward_matches_eager(name: str) -> None:
    if name != "auto":
        skip_unless_usable(name)
    shape = SHAPES[1]
    q, k, v = _inputs(shape, grad=True)
    f = torch.compile(lambda q, k, v: ad.attention(q, k, v, causal=True, backend=name),
                      fullgraph=True)
    out = f(q, k, v)
    err, err_math = _errors(out, q, k, v, True)
    assert err <= 2 * err_math + 2e-3, (err, err_math)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    want = torch.autograd.grad(ad.attention(q, k, v, causal=True, backend=name)
                               .float().square().sum(), (q, k, v))
    for g, w in zip(grads, want):
        assert (g - w).abs().max().item() <= 1e-2 * (1 + w.abs().max().item())


@pytest.mark.parametrize("name", ["sdpa-cudnn", "sdpa-mem-efficient"])
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd+bwd"])
def test_compiled_key_padding_and_lse(name: str, grad: bool) -> None:
    # under compile these adapters call F.sdpa restricted to their kernel (or
    # the aten overload for the LSE): causal goes into the bias beside padding
    skip_unless_usable(name)
    q, k, v = _inputs((2, 4, 2, 128, 64, True), grad=grad)
    kpm = torch.ones(2, 128, dtype=torch.bool, device="cuda")
    kpm[1, 70:] = False
    kpm[0, :5] = False
    kw = dict(causal=True, key_padding_mask=kpm, backend=name)
    f = torch.compile(lambda q, k, v: ad.attention(q, k, v, **kw), fullgraph=True)
    out = f(q, k, v)
    ref = reference_attention(q.detach().double(), k.detach().double(), v.detach().double(),
                              causal=True, key_padding_mask=kpm)[0]
    with torch.no_grad():
        base = ad.attention(q, k, v, causal=True, key_padding_mask=kpm, backend="math")
    err_math = (base.double() - ref).abs().max().item()
    assert (out.detach().double() - ref).abs().max().item() <= 2 * err_math + 2e-3
    if grad:
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        want = torch.autograd.grad(ad.attention(q, k, v, **kw).float().square().sum(),
                                   (q, k, v))
        for g, w in zip(grads, want):
            assert (g - w).abs().max().item() <= 1e-2 * (1 + w.abs().max().item())
    with torch.no_grad():
        g = torch.compile(lambda q, k, v: ad.attention(q, k, v, return_lse=True, **kw),
                          fullgraph=True)
        out2, lse = g(q, k, v)
        ref_lse = reference_attention(q.double(), k.double(), v.double(), causal=True,
                                      key_padding_mask=kpm)[1]
    assert (out2.double() - ref).abs().max().item() <= 2 * err_math + 2e-3
    live = torch.isfinite(ref_lse)
    assert (lse.double()[live] - ref_lse[live]).abs().max().item() <= 2e-2
