"""GPU checks of attention_paged: FA4's page_table route and flex's block-table
mask (both native), and the gathered route on the dense CUDA backends,
against the float64 reference built from the block table (tests/_paged.py),
with the contract's accuracy rule (math in the same dtype as the baseline).

Unused blocks hold NaN and the table's entries past each row's used blocks
hold out-of-range garbage (never read on any route).  The slots past a row's
length in its last block hold NaN for the routes that never read them
(gathered, math) and large finite values for the block-granular kernels
(``paged_reads_tail``: flex, FA4), which must change nothing.

Run on a CUDA machine: ``python -m pytest tests/gpu/test_gpu_paged.py -m gpu -q``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import attention_dispatch as ad  # noqa: E402
from attention_dispatch.testing import atol  # noqa: E402
from _helpers import skip_unless_usable  # noqa: E402  (tests/, on sys.path via conftest)
from _paged import make_case, max_err, paged_reference  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SHAPES = [  # (lengths, Sq, Hq, Hkv, D, block_size)
    ([1, 130, 700, 255, 4096, 33, 128, 512], 1, 32, 8, 128, 128),  # decode, GQA 4
    ([17, 300, 1000, 64], 1, 8, 8, 64, 16),                         # decode, small blocks
    ([40, 300, 129, 256], 7, 16, 4, 128, 128),                      # chunked prefill
    ([64, 300, 1000], 4, 8, 2, 128, 64),                            # block 64 (FA4 cp.async)
]
OPTS = [dict(), dict(window=(100, 0)), dict(softcap=20.0), dict(causal=False)]


def _check(backend: str, shape, opts: dict, dtype=torch.bfloat16, tail=1e3,
           expect_native: bool = True) -> None:
    skip_unless_usable(backend)
    lengths, sq, hq, hkv, d, bs = shape
    case = make_case(lengths, sq, hq, hkv, d, bs, dtype=dtype, device="cuda", seed=sq + bs,
                     tail=tail)
    kw = dict(block_table=case.block_table, cache_seqlens=case.cache_seqlens, **opts)
    dec = ad.explain_paged(case.q, case.k_cache, case.v_cache, backend=backend, **kw)
    if dec.backend is None:
        pytest.skip(f"{backend} refuses: {'; '.join(dec.reasons(backend))}")
    note = next(v.note for v in dec.verdicts if v.name == backend)
    if expect_native:
        assert note.startswith("route: native"), note
    ref, ref_lse = paged_reference(case, **opts)
    with torch.no_grad():
        base = ad.attention_paged(case.q, case.k_cache, case.v_cache, backend="math", **kw)
        out, lse = ad.attention_paged(case.q, case.k_cache, case.v_cache, backend=backend,
                                      return_lse=True, **kw)
    bound = 2 * max_err(base, ref) + atol(dtype) * (1 + ref.abs().max().item())
    err = max_err(out, ref)
    assert err <= bound, f"{backend} {shape} {opts}: out error {err} > {bound}"
    lse_err = max_err(lse, ref_lse)
    assert lse_err <= 1e-2 * (1 + ref_lse.abs().max().item()), f"lse error {lse_err}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"Sq{s[1]}-bs{s[5]}-d{s[4]}")
@pytest.mark.parametrize("opts", OPTS, ids=str)
def test_fa4_paged(shape, opts):
    _check("flash-attn", shape, opts)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: f"Sq{s[1]}-bs{s[5]}-d{s[4]}")
@pytest.mark.parametrize("opts", OPTS[:3], ids=str)
def test_flex_paged(shape, opts):
    _check("flex", shape, opts)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"Sq{s[1]}-bs{s[5]}-d{s[4]}")
@pytest.mark.parametrize("opts", OPTS + [dict(sinks=True)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_decode_paged(shape, opts, dtype):
    """triton-decode never reads past a row's length: NaN there."""
    if opts.get("sinks"):
        g = torch.Generator().manual_seed(5)
        opts = dict(sinks=(torch.randn(shape[2], generator=g) * 2).cuda())
    _check("triton-decode", shape, opts, dtype=dtype, tail=float("nan"))


@pytest.mark.parametrize("backend", ["sdpa-cudnn", "sdpa-flash", "sdpa-mem-efficient",
                                     "xformers"])
def test_gathered_route(backend):
    """Dense backends page through the gathered copy; NaN past each row's length."""
    _check(backend, SHAPES[0], dict(), tail=float("nan"), expect_native=False)


def test_auto_picks_a_native_route_on_cuda():
    case = make_case(*SHAPES[0][:1], 1, 32, 8, 128, 128, dtype=torch.bfloat16, device="cuda")
    dec = ad.explain_paged(case.q, case.k_cache, case.v_cache, block_table=case.block_table,
                           cache_seqlens=case.cache_seqlens)
    chosen = next(v for v in dec.verdicts if v.name == dec.backend)
    assert chosen.note.startswith("route: native"), str(dec)
