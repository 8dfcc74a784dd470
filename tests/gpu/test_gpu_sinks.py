"""GPU attention sinks: FA4 (``learnable_sink``) and flex (through its LSE),
bfloat16/float16, head dims 64/128, causal Sq != Sk, GQA, key padding; out,
lse and the gradients of q, k, v and sinks against the float64 reference,
within the contract's rule (2x math's error in the same dtype + atol).
A backend that refuses a case is skipped with its reasons.

Run on a CUDA machine: ``python -m pytest tests/gpu/test_gpu_sinks.py -m gpu -q``.
"""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")

import attention_dispatch as ad  # noqa: E402
from attention_dispatch import testing  # noqa: E402
from _helpers import skip_unless_usable  # noqa: E402  (tests/, on sys.path via conftest)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# (sq, sk, hq, hkv, causal, padded)
SHAPES = [(128, 128, 8, 8, False, False), (77, 200, 8, 2, True, False),
          (200, 77, 8, 4, True, False), (96, 160, 8, 2, False, True)]
CASES = [(n, dt, d, shape) for n, dt, d, shape in itertools.product(
    ("flash-attn", "flex"), (torch.bfloat16, torch.float16), (64, 128), SHAPES)
    if n == "flash-attn" or (dt == torch.bfloat16 and d == 128)]  # flex: one compile each


def _inputs(dtype, d, sq, sk, hq, hkv, padded, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(2, h, s, d, device="cuda", generator=g).to(dtype).requires_grad_()
               for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    sinks = (torch.randn(hq, device="cuda", generator=g) * 2).requires_grad_()
    kpm = None
    if padded:
        kpm = torch.arange(sk, device="cuda")[None, :] < torch.tensor([sk, sk // 3],
                                                                      device="cuda")[:, None]
    return q, k, v, sinks, kpm


def _run(name, q, k, v, sinks, kpm, causal):
    out, lse = ad.attention(q, k, v, sinks=sinks, key_padding_mask=kpm, causal=causal,
                            return_lse=True, backend=name)
    w = _weights(out)
    grads = torch.autograd.grad((out.float() * w).sum(), [q, k, v, sinks])
    return out, lse, grads, w


def _weights(out):
    """The upstream gradient: the same for every backend of a case."""
    g = torch.Generator(device="cuda").manual_seed(7)
    return torch.randn(out.shape, generator=g, device="cuda")


@pytest.mark.parametrize("name, dtype, d, shape", CASES,
                         ids=[f"{n}-{str(dt)[6:]}-d{d}-{s}" for n, dt, d, s in CASES])
def test_cuda_sinks_forward_and_gradients(name, dtype, d, shape) -> None:
    sq, sk, hq, hkv, causal, padded = shape
    skip_unless_usable(name)
    q, k, v, sinks, kpm = _inputs(dtype, d, sq, sk, hq, hkv, padded)
    try:
        out, lse, grads, w = _run(name, q, k, v, sinks, kpm, causal)
    except ad.BackendUnavailable as exc:
        why = exc.reasons.get(name, [])
        assert why, f"{name} refused without a reason"
        if not any("gradient" in r for r in why):
            pytest.skip(f"{name} refuses: {'; '.join(why)}")
        q, k, v, sinks = (t.detach() for t in (q, k, v, sinks))  # forward only, then
        out, lse = ad.attention(q, k, v, sinks=sinks, key_padding_mask=kpm, causal=causal,
                                return_lse=True, backend=name)
        grads, w = (), _weights(out)
    with torch.enable_grad():
        m_out, _, m_grads, _ = _run("math", *(t.detach().requires_grad_() for t in
                                              (q, k, v, sinks)), kpm, causal)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    ref, ref_lse = testing.reference_attention(*ref_in[:3], sinks=ref_in[3],
                                               key_padding_mask=kpm, causal=causal)
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), ref_in)
    pairs = [("out", out, m_out, ref)] + [
        (n, g, mg, rg) for n, g, mg, rg in zip(("dq", "dk", "dv", "dsinks"), grads, m_grads,
                                                ref_grads)]
    for label, got, base, want in pairs:
        err = (got.double() - want).abs().max().item()
        err_math = (base.double() - want).abs().max().item()
        assert testing.within_rule(err, err_math, want.abs().max().item(), dtype), \
            f"{label}: {err:.3g} vs math {err_math:.3g}"
    assert (lse.double() - ref_lse).abs().max().item() < 2e-2


@pytest.mark.parametrize("name", ["flash-attn", "flex"])
def test_cuda_sinks_rows_without_keys(name) -> None:
    """Causal Sq > Sk and a batch row with no real key: out 0, lse the sink."""
    skip_unless_usable(name)
    q, k, v, sinks, _ = _inputs(torch.bfloat16, 64, 160, 64, 4, 4, False)
    try:
        out, lse = ad.attention(q.detach(), k.detach(), v.detach(), sinks=sinks.detach(),
                                causal=True, return_lse=True, backend=name)
    except ad.BackendUnavailable as exc:
        pytest.skip(f"{name} refuses: {exc}")
    assert not out[:, :, :96].any()
    torch.testing.assert_close(lse[:, :, :96], sinks.detach()[None, :, None].expand(2, 4, 96))
