"""Conformance suite for backends: an independent float64 reference, a case
matrix and a checker, public so plugin authors can test their own backends.

Example (in a plugin's tests)::

    import pytest
    from attention_dispatch import testing

    @pytest.mark.parametrize("case", testing.default_cases(), ids=str)
    def test_conformance(case):
        testing.check_backend("my-kernel", case, device="cpu")

The accuracy rule of the contract: for the output (and each gradient),
``max|backend - ref| <= 2 * max|math - ref| + atol(dtype)`` where ``ref`` is
:func:`reference_attention` in float64 and ``math`` is the ``math`` backend in
the case's dtype.
"""

from .dense import (ATOL, Case, CheckResult, alibi_slopes_for, atol, check_backend,
                    default_cases, judge, make_inputs, reduced_case, reference_attention,
                    reference_for, structure_label, structured_cases, within_rule)
from .memory import (MEMORY_KINDS, MemoryDraw, draw_memory, kpm_view, mask_view, memory_view,
                     packed_qkv, poison_padded, qkv_makers, split_packed)
from .varlen import (VarlenCase, check_backend_varlen, make_varlen_inputs, reference_varlen,
                     varlen_cases)

__all__ = [
    "ATOL",
    "Case",
    "CheckResult",
    "MEMORY_KINDS",
    "MemoryDraw",
    "VarlenCase",
    "alibi_slopes_for",
    "atol",
    "check_backend",
    "check_backend_varlen",
    "default_cases",
    "draw_memory",
    "judge",
    "kpm_view",
    "make_inputs",
    "make_varlen_inputs",
    "mask_view",
    "memory_view",
    "packed_qkv",
    "poison_padded",
    "qkv_makers",
    "reduced_case",
    "reference_attention",
    "reference_for",
    "reference_varlen",
    "split_packed",
    "structure_label",
    "structured_cases",
    "varlen_cases",
    "within_rule",
]
