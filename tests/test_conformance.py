"""Every backend against the float64 reference (attention_dispatch.testing).

CPU: each registered backend whose probe accepts the CPU, over
``testing.default_cases()`` (fp32/bf16/fp16), the same matrix in float64 and
a few extra shapes.  A backend may refuse a case (BackendUnavailable: skipped
with its reasons), except math, which must take every case.

CUDA (marked gpu, skipped without CUDA): the GPU backends over bf16/fp16 and
head dims 64 and 128.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch import testing
from _helpers import skip_unless_usable

FP64_CASES = testing.default_cases(dtypes=(torch.float64,))
_base = testing.Case()
EXTRA_CASES = [
    replace(_base, head_dim=17, seq_q=5, seq_k=9, mask="bool+padding", causal=True),
    replace(_base, head_dim=8, seq_q=1, seq_k=1, causal=True, lse=True),
    replace(_base, batch=1, heads_q=6, heads_kv=3, seq_q=1, seq_k=40, mask="padding",
            causal=True, lse=True, grad=True),
    replace(_base, head_dim=64, seq_q=70, seq_k=70, causal=True, grad=True, layout="bshd"),
    replace(_base, dtype=torch.float64, mask="float+padding", empty_rows=True, grad=True,
            lse=True, causal=True, seq_q=9, seq_k=12),
    replace(_base, scale=1.5, heads_kv=1, mask="bool", causal=True, seq_q=13, seq_k=6,
            grad=True),
]
CPU_CASES = testing.default_cases() + FP64_CASES + EXTRA_CASES

GPU_BACKENDS = ("math", "sdpa-flash", "sdpa-mem-efficient", "sdpa-cudnn", "flash-attn",
                "xformers")
GPU_CASES = testing.default_cases(dtypes=(torch.bfloat16, torch.float16), head_dims=(64, 128))


def _check(name: str, case: testing.Case, device: str) -> testing.CheckResult:
    try:
        return testing.check_backend(name, case, device)
    except ad.BackendUnavailable as exc:
        if name == "math":
            pytest.fail(f"math must take every case, refused {case}:\n{exc}")
        pytest.skip(f"{name} refuses {case}: {'; '.join(exc.reasons.get(name, []))}")


def test_math_is_available_on_cpu():
    assert "math" in ad.list_backends()
    assert ad.get_backend("math").probe(torch.device("cpu")) == []


def test_cpu_refusals_have_reasons():
    """A backend that cannot run on the CPU at all says why."""
    for name in ad.list_backends():
        try:
            reasons = ad.get_backend(name).probe(torch.device("cpu"))
        except ad.BackendRegistrationError:
            continue
        assert isinstance(reasons, list)
        assert all(isinstance(r, str) and r for r in reasons), (name, reasons)


@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_cpu_conformance(cpu_backend, case):
    result = _check(cpu_backend, case, "cpu")
    assert result.ok
    assert set(result.errors) >= {"out"}


def test_case_matrix_covers_the_contract():
    """The default matrix holds what the contract needs (guards against a
    shrunken case list making the conformance run vacuous)."""
    cases = testing.default_cases(dtypes=(torch.float32,))
    assert any(c.seq_q < c.seq_k and c.causal for c in cases)
    assert any(c.seq_q > c.seq_k and c.causal for c in cases)
    assert any(c.heads_kv == 1 for c in cases) and any(1 < c.heads_kv < c.heads_q for c in cases)
    assert {c.layout for c in cases} == {"bhsd", "bshd"}
    assert {c.mask for c in cases} >= {"none", "bool", "float", "padding", "bool+padding",
                                       "float+padding"}
    assert any(c.empty_rows and c.grad for c in cases)
    assert any(c.lse for c in cases)
    assert any(c.head_dim_v for c in cases)


def test_check_backend_detects_a_wrong_backend(register_temp):
    """The checker is not vacuous: a backend ignoring the causal mask fails."""

    class NoCausal(ad.Backend):
        capabilities = ad.Capabilities(device_types=frozenset({"cpu"}),
                                       dtypes=frozenset({torch.float32}))

        def forward(self, q, k, v, *, spec, mask, key_padding_mask, dropout_p, scale):
            out, lse = testing.reference_attention(q, k, v, mask=mask,
                                                   key_padding_mask=key_padding_mask,
                                                   causal=False, scale=scale)
            return out.to(q.dtype), lse.float()

    register_temp("no-causal", NoCausal)
    case = replace(_base, causal=True)
    with pytest.raises(AssertionError, match="no-causal"):
        testing.check_backend("no-causal", case, "cpu")
    testing.check_backend("no-causal", replace(_base, causal=False), "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_cuda_conformance(name, case):
    skip_unless_usable(name)
    assert _check(name, case, "cuda").ok


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", GPU_BACKENDS + ("auto",))
def test_cuda_float_mask_gradient(name, dtype):
    """A float mask that requires grad (a learned bias) gets the right
    gradient, or the backend refuses the call; auto always finds one."""
    if name != "auto" and name not in ad.list_backends():
        pytest.skip(f"{name} is not registered")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, s, 64, generator=g) for s in (33, 47, 47))
    bias = torch.randn(1, 4, 33, 47, generator=g)
    go = torch.randn(2, 4, 33, 64, generator=g)
    dq, dk, dv, db = (t.to("cuda", dtype).requires_grad_() for t in (q, k, v, bias))
    try:
        out = ad.attention(dq, dk, dv, mask=db, causal=True, backend=name)
    except ad.BackendUnavailable as exc:
        assert name not in ("math", "auto"), exc
        pytest.skip(f"{name} refuses: {exc.reasons}")
    out.backward(go.to("cuda", dtype))
    rq, rk, rv, rb = (t.double().requires_grad_() for t in (q, k, v, bias))
    ref, _ = testing.reference_attention(rq, rk, rv, mask=rb, causal=True)
    ref.backward(go.double())
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for got, want in ((out, ref), (dq.grad, rq.grad), (db.grad, rb.grad)):
        assert got is not None
        scale = 1.0 + want.abs().max().item()
        assert (got.double().cpu() - want.detach()).abs().max().item() <= tol * scale
