"""GPU conformance: each backend on CUDA against the float64 reference.

Runs :func:`attention_dispatch.testing.check_backend` (output, LSE and gradients
within ``2 * |math - ref| + atol``) over a matrix in bfloat16/float16 at head
dims 64 and 128: bottom-right causal with Sq < Sk and Sq > Sk (rows with no
key), GQA and decode, key padding (including a batch row with no key), fully
masked rows with gradients, LSE.  A backend that refuses a case is skipped
with its reasons.  ``bench/backend_matrix.py`` runs the same matrix and writes
docs/backend-matrix.md.

Run on a CUDA machine: ``python -m pytest tests/gpu -m gpu -q``.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

import attention_dispatch as ad  # noqa: E402
from attention_dispatch.testing import Case, check_backend  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BACKENDS = ("flash-attn", "xformers", "math", "sdpa-flash", "sdpa-mem-efficient", "sdpa-cudnn")


def gpu_cases(dtypes: tuple = (torch.bfloat16, torch.float16),
              head_dims: tuple = (64, 128)) -> list[Case]:
    """The GPU case matrix (shared with bench/backend_matrix.py)."""
    cases: list[Case] = []
    for dtype, d in itertools.product(dtypes, head_dims):
        base = Case(dtype=dtype, head_dim=d)
        cases += [
            replace(base, seq_q=96, seq_k=96, layout="bshd"),
            replace(base, causal=True, seq_q=37, seq_k=101),
            replace(base, causal=True, seq_q=80, seq_k=33, grad=True),  # Sq > Sk: empty rows
            replace(base, causal=True, seq_q=128, seq_k=128, grad=True, layout="bshd"),
            replace(base, heads_q=8, heads_kv=2, causal=True, seq_q=50, seq_k=70, grad=True),
            replace(base, heads_q=8, heads_kv=2, causal=True, seq_q=1, seq_k=257),  # decode
            replace(base, mask="padding", seq_q=40, seq_k=90, layout="bshd"),
            replace(base, mask="padding", heads_q=8, heads_kv=2, causal=True, seq_q=1, seq_k=90),
            replace(base, mask="padding", empty_rows=True, seq_q=16, seq_k=48),
            replace(base, mask="padding", seq_q=24, seq_k=60, grad=True),
            replace(base, mask="padding", causal=True, seq_q=30, seq_k=64),
            replace(base, mask="bool", empty_rows=True, grad=True),
            replace(base, mask="float", causal=True, seq_q=20, seq_k=45),
            replace(base, lse=True, causal=True, seq_q=30, seq_k=70),
            replace(base, lse=True, mask="padding", seq_q=16, seq_k=40, heads_q=8, heads_kv=2),
            replace(base, lse=True, causal=True, seq_q=64, seq_k=64, grad=True),
        ]
    return cases


CASES = gpu_cases()


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_conformance_cuda(backend: str, case: Case) -> None:
    try:
        check_backend(backend, case, device="cuda")
    except ad.BackendUnavailable as exc:
        pytest.skip(f"{backend} refuses: " + "; ".join(exc.reasons.get(backend, ["?"])))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_probe_and_describe_cuda(backend: str) -> None:
    """The probe never raises; print what runs (visible with -rs / -s)."""
    reasons = ad.get_backend(backend).probe(torch.device("cuda"))
    print(f"{backend}: {ad.get_backend(backend).describe()}; probe: {reasons or 'ok'}")
    assert isinstance(reasons, list)


def test_auto_accepts_every_case_cuda() -> None:
    """"auto" always finds a backend (math accepts everything)."""
    for case in CASES[:8]:
        spec_case = replace(case, grad=False)
        check_backend("auto", spec_case, device="cuda")
