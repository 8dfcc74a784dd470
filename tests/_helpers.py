"""Helpers shared by test modules: inputs and checks for the tests that drive
adapters through fake kernels, and the skip of a backend a device cannot run."""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch import testing

Tensor = torch.Tensor


def make_qkv(b: int = 2, hq: int = 4, hkv: int = 4, sq: int = 6, sk: int = 10, d: int = 16,
             dv: Optional[int] = None, layout: str = "bshd", dtype: torch.dtype = torch.float16,
             grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Contiguous tensors in ``layout``."""
    g = torch.Generator().manual_seed(0)

    def rnd(h: int, s: int, dd: int) -> Tensor:
        t = torch.randn(b, s, h, dd, generator=g)
        t = t if layout == "bshd" else t.transpose(1, 2).contiguous()
        return t.to(dtype).requires_grad_(grad)

    return rnd(hq, sq, d), rnd(hkv, sk, d), rnd(hkv, sk, dv or d)


def bshd(t: Tensor, layout: str) -> Tensor:
    return t if layout == "bshd" else t.transpose(1, 2)


def bhsd(t: Tensor, layout: str) -> Tensor:
    return t.transpose(1, 2) if layout == "bshd" else t


def reference(q: Tensor, k: Tensor, v: Tensor, layout: str, **kw: Any) -> tuple[Tensor, Tensor]:
    return testing.reference_attention(*(bhsd(t, layout).detach() for t in (q, k, v)), **kw)


def assert_close(got: Tensor, want: Tensor, tol: float = 3e-3) -> None:
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    err = (got - want)[finite].abs().max().item() if finite.any() else 0.0
    assert err <= tol * (1 + want[finite].abs().max().item()), err


def padding_mask(lengths: list[int], sk: int) -> Tensor:
    return torch.arange(sk)[None, :] < torch.tensor(lengths)[:, None]


def skip_unless_usable(name: str, device: str = "cuda") -> None:
    """Skip the test unless backend ``name`` is registered and runs on ``device``
    (math must always run: its unavailability fails the test)."""
    if name not in ad.list_backends():
        pytest.skip(f"{name} is not registered")
    try:
        reasons = ad.get_backend(name).probe(torch.device(device))
    except ad.BackendRegistrationError as exc:
        pytest.skip(str(exc))
    if reasons:
        assert name != "math", reasons
        pytest.skip(f"{name} unavailable on {device}: {'; '.join(reasons)}")


def cpu_backends(exclude: tuple[str, ...] = ()) -> list[str]:
    """Registered backends whose probe accepts the CPU (math always does), in
    registry order, except those named in ``exclude``; a backend that fails to
    load is left out (explain() reports it, test_registry covers that)."""
    out = []
    for name in ad.list_backends():
        if name in exclude:
            continue
        try:
            if not ad.get_backend(name).probe(torch.device("cpu")):
                out.append(name)
        except ad.AttentionDispatchError:
            continue
    ad.clear_cache()
    return out
