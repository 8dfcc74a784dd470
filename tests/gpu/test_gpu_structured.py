"""GPU conformance of structured attention: sliding windows, softcap, ALiBi,
LSE, packed varlen batches and merge_attention, for every CUDA backend that
declares the feature (flex, flash-attn (FA4), xformers, sdpa-*; math as the
baseline), against the float64 reference.  A backend that refuses a case is
skipped with its reasons; a declared feature that gives wrong numbers fails.

flex compiles one kernel per signature (tens of seconds on a GPU), so it runs
a curated subset of the structured and varlen cases.

Run on a CUDA machine: ``python -m pytest tests/gpu/test_gpu_structured.py -m gpu -q``.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

import attention_dispatch as ad  # noqa: E402
from attention_dispatch import testing  # noqa: E402
from _helpers import skip_unless_usable  # noqa: E402  (tests/, on sys.path via conftest)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BACKENDS = ("flex", "flash-attn", "xformers", "sdpa-flash", "sdpa-mem-efficient",
            "sdpa-cudnn", "math")
DTYPES = (torch.bfloat16, torch.float16)


def _with_head_dims(cases: list, dims: tuple[int, ...] = (64, 128)) -> list:
    return [replace(c, head_dim=d) for c, d in itertools.product(cases, dims)]


STRUCTURED = _with_head_dims(testing.structured_cases(dtypes=DTYPES))
VARLEN = _with_head_dims(testing.varlen_cases(dtypes=DTYPES))
# flex: one kernel per signature; a subset that still touches every feature
FLEX_STRUCTURED = [c for c in STRUCTURED if c.head_dim == 128 and c.dtype == torch.bfloat16
                   and (c.grad or c.lse or c.alibi != "none" or c.softcap)]
FLEX_VARLEN = [c for c in VARLEN if c.head_dim == 128 and c.dtype == torch.bfloat16][-6:]


def _run(check, name: str, case) -> None:
    skip_unless_usable(name)
    try:
        assert check(name, case, "cuda").ok
    except ad.BackendUnavailable as exc:
        assert name != "math", f"math must take every case: {exc}"
        why = exc.reasons.get(name, [])
        assert why, f"{name} refused {case} without a reason"
        pytest.skip(f"{name} refuses {case}: {'; '.join(why)}")


def _params(cases: list, flex_cases: list) -> list:
    return ([pytest.param(n, c, id=f"{n}-{c}") for n in BACKENDS if n != "flex" for c in cases]
            + [pytest.param("flex", c, id=f"flex-{c}") for c in flex_cases])


@pytest.mark.parametrize("name,case", _params(STRUCTURED, FLEX_STRUCTURED))
def test_cuda_structured(name, case):
    _run(testing.check_backend, name, case)


@pytest.mark.parametrize("name,case", _params(VARLEN, FLEX_VARLEN))
def test_cuda_varlen(name, case):
    _run(testing.check_backend_varlen, name, case)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("n", [2, 4, 8])
def test_cuda_merge_of_key_chunks(name, n):
    """LSE from each backend merges over key chunks to the one-call result
    (plain calls: every backend takes them; fully masked partials are covered
    on the CPU in tests/test_merge.py)."""
    skip_unless_usable(name)
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 8, s, 128, generator=g).to("cuda", torch.bfloat16)
               for s in (64, 512, 512))
    bounds = [0, *sorted(torch.randint(0, 513, (n - 1,), generator=g).tolist()), 512]
    try:
        parts = [ad.attention(q, k[:, :, a:e], v[:, :, a:e], backend=name, return_lse=True)
                 for a, e in zip(bounds, bounds[1:]) if e > a]
    except ad.BackendUnavailable as exc:
        pytest.skip(f"{name} refuses: {exc.reasons.get(name)}")
    out, lse = ad.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    ref, ref_lse = testing.reference_attention(q.cpu(), k.cpu(), v.cpu())
    assert (out.double().cpu() - ref).abs().max() < 3e-2
    assert (lse.double().cpu() - ref_lse).abs().max() < 1e-2


def test_cuda_flex_long_window_softcap_with_gradients():
    """flex at a training shape (bf16, hdim 128, 4k tokens): causal sliding
    window + softcap + ALiBi, forward and backward, against math in float32."""
    skip_unless_usable("flex")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 4096, 128, generator=g) for _ in range(3))
    slopes = testing.alibi_slopes_for(8).cuda()
    kw = dict(causal=True, window=(1024, 0), softcap=30.0, alibi_slopes=slopes)
    go = torch.randn(1, 8, 4096, 128, generator=g).cuda()
    res = {}
    for name, dtype in (("flex", torch.bfloat16), ("math", torch.float32)):
        t = [x.to("cuda", dtype).requires_grad_() for x in (q, k, v)]
        out = ad.attention(*t, backend=name, **kw)
        out.backward(go.to(dtype))
        res[name] = [out.float()] + [x.grad.float() for x in t]
    for a, b in zip(res["flex"], res["math"]):
        assert (a - b).abs().max() <= 2e-2 * (1 + b.abs().max())


def test_cuda_flex_steady_state_compiles_nothing():
    skip_unless_usable("flex")
    from attention_dispatch.adapters import flex

    q, k, v = (torch.randn(2, 8, 1024, 64, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    ad.attention(q, k, v, causal=True, window=(256, 0), softcap=20.0, backend="flex")
    n, masks = len(flex._compiled), dict(flex._block_masks)
    for _ in range(3):
        ad.attention(q, k, v, causal=True, window=(256, 0), softcap=20.0, backend="flex")
    assert len(flex._compiled) == n
    assert all(flex._block_masks[key] is bm for key, bm in masks.items())
