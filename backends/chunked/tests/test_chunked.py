"""Tests of the ``chunked`` plugin backend, through attention_dispatch's public API.

Run from the repository root: ``python -m pytest backends/chunked/tests -q``
(the distribution must be installed: ``pip install -e backends/chunked``).
"""

from __future__ import annotations

import dataclasses
from importlib import metadata
from typing import Any, Iterator

import pytest
import torch
from torch.overrides import TorchFunctionMode

import attention_dispatch as ad
from attention_dispatch import testing
from attention_dispatch_chunked import CHUNK_SIZE_ENV, ChunkedBackend

SMALL_CHUNK = 4  # every conformance case with Sq > 4 spans several chunks

CASES = testing.default_cases() + testing.default_cases(dtypes=(torch.float64,))


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[ChunkedBackend]:
    """A clean decision cache and the registered instance with a small chunk
    size (restored by monkeypatch afterwards)."""
    ad.clear_cache()
    backend = ad.get_backend("chunked")
    monkeypatch.setattr(backend, "chunk_size", SMALL_CHUNK)
    yield backend  # type: ignore[misc]
    ad.clear_cache()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conformance(case: testing.Case) -> None:
    testing.check_backend("chunked", case, "cpu")


_GRAD_CASES = [c for c in testing.default_cases(dtypes=(torch.float32,)) if c.grad or c.lse]


@pytest.mark.parametrize("chunk", [1, 3, 1024])
@pytest.mark.parametrize("case", _GRAD_CASES, ids=str)
def test_conformance_other_chunk_sizes(case: testing.Case, chunk: int,
                                       _fresh: ChunkedBackend) -> None:
    _fresh.chunk_size = chunk
    testing.check_backend("chunked", case, "cpu")


@pytest.mark.parametrize("case", [c for c in _GRAD_CASES if c.grad], ids=str)
def test_gradients_without_recompute(case: testing.Case, _fresh: ChunkedBackend,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fresh, "recompute", False)
    testing.check_backend("chunked", case, "cpu")


def _inputs(b: int, hq: int, hkv: int, sq: int, sk: int, d: int, dtype: torch.dtype,
            grad: bool = False, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g, dtype=dtype).requires_grad_(grad)
            for h, s in ((hq, sq), (hkv, sk), (hkv, sk))]


@pytest.mark.parametrize("shape, kind", [
    ((11, 9), "bool"), ((11, 1), "bool"), ((1, 9), "float"), ((4, 11, 9), "float"),
    ((2, 1, 1, 9), "bool"), ((1, 4, 11, 1), "float"),
], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_broadcast_masks(shape: tuple[int, ...], kind: str, causal: bool,
                         _fresh: ChunkedBackend) -> None:
    """Masks of every broadcast shape, sliced per chunk, against the float64 reference."""
    _fresh.chunk_size = 3
    q, k, v = _inputs(2, 4, 2, 11, 9, 8, torch.float64, grad=True)
    g = torch.Generator().manual_seed(1)
    if kind == "bool":
        mask = torch.rand(shape, generator=g) > 0.3
    else:
        mask = torch.randn(shape, generator=g, dtype=torch.float64)
        mask = mask.masked_fill(torch.rand(shape, generator=g) < 0.2, float("-inf"))
    out, lse = ad.attention(q, k, v, mask=mask, causal=causal, backend="chunked",
                            return_lse=True)
    ref_in = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = testing.reference_attention(*ref_in, mask=mask, causal=causal)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)  # lse is float32
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(go)
    ref_out.backward(go)
    for got, ref in zip((q, k, v), ref_in):
        assert torch.isfinite(got.grad).all()
        torch.testing.assert_close(got.grad, ref.grad, atol=1e-10, rtol=1e-10)


def test_discovered_through_entry_point() -> None:
    eps = metadata.entry_points(group="attention_dispatch.backends")
    ours = [ep for ep in eps if ep.name == "chunked"]
    assert len(ours) == 1
    assert ours[0].value == "attention_dispatch_chunked:ChunkedBackend"
    assert "chunked" in ad.list_backends()
    backend = ad.get_backend("chunked")
    assert isinstance(backend, ChunkedBackend)
    assert backend.name == "chunked"
    assert backend.version() == "0.1.0"
    assert "attention-dispatch-chunked" in backend.describe()


def test_auto_places_it_just_before_math() -> None:
    q, k, v = _inputs(1, 2, 2, 8, 8, 16, torch.float32)
    plain = ad.explain(q, k, v)
    assert plain.backend != "chunked"  # a fused kernel still wins common CPU calls
    order = [vd.name for vd in sorted((vd for vd in plain.verdicts if vd.rank is not None),
                                      key=lambda vd: vd.rank)]
    assert order.index("chunked") == order.index("math") - 1
    v_wide = torch.randn(1, 2, 8, 32)  # Dv != D: sdpa-flash refuses, chunked is next
    assert ad.explain(q, k, v_wide).backend == "chunked"


def test_dropout_is_refused_not_ignored() -> None:
    q, k, v = _inputs(1, 2, 2, 8, 8, 16, torch.float32)
    with pytest.raises(ad.BackendUnavailable, match="dropout") as info:
        ad.attention(q, k, v, dropout_p=0.1, backend="chunked")
    assert "chunked" in info.value.reasons
    assert any("dropout" in r for r in info.value.reasons["chunked"])
    # direct calls to forward refuse too
    spec = ad.explain(q, k, v, dropout_p=0.1, backend="math").spec
    with pytest.raises(ad.BackendUnavailable, match="dropout"):
        ChunkedBackend().forward(q, k, v, spec=spec, mask=None, key_padding_mask=None,
                                 dropout_p=0.1, scale=0.25)


def test_chunk_size_env_read_at_instantiation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CHUNK_SIZE_ENV, raising=False)
    assert ChunkedBackend().chunk_size == ChunkedBackend.chunk_size == 1024
    monkeypatch.setenv(CHUNK_SIZE_ENV, "7")
    assert ChunkedBackend().chunk_size == 7
    assert ChunkedBackend.chunk_size == 1024
    for bad in ("0", "-3", "many"):
        monkeypatch.setenv(CHUNK_SIZE_ENV, bad)
        with pytest.raises(ValueError, match=CHUNK_SIZE_ENV):
            ChunkedBackend()


class _LargestTensor(TorchFunctionMode):
    """Records the largest tensor (in elements) any torch function returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.shape: Any = None

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        res = func(*args, **(kwargs or {}))
        for t in res if isinstance(res, (tuple, list)) else (res,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.shape = t.numel(), tuple(t.shape)
        return res


def test_memory_bound_chunk_times_sk(_fresh: ChunkedBackend) -> None:
    """Sq = Sk = 2048, chunk 256: no tensor made during the call (scores,
    probabilities, masks) exceeds chunk * Sk elements per (batch, head)."""
    _fresh.chunk_size = chunk = 256
    b, hq, hkv, s, d = 1, 2, 1, 2048, 16
    q, k, v = _inputs(b, hq, hkv, s, s, d, torch.float32)
    mask = torch.randn(1, 1, s, s)  # a full float mask given by the caller: sliced, not copied
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[:, -5:] = False
    kw = dict(mask=mask, key_padding_mask=kpm, causal=True)
    with torch.no_grad():
        spy = _LargestTensor()
        with spy:
            out = ad.attention(q, k, v, backend="chunked", **kw)
        assert spy.largest <= b * hq * chunk * s, spy.shape
        control = _LargestTensor()  # the spy does see full score tensors
        with control:
            ref = ad.attention(q, k, v, backend="math", **kw)
        assert control.largest >= b * hq * s * s
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_frozen_capabilities() -> None:
    caps = ChunkedBackend.capabilities
    assert not caps.dropout and caps.empty_rows_exact and caps.gqa and caps.lse
    assert caps.device_types == frozenset({"cpu", "cuda"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.dropout = True  # type: ignore[misc]
