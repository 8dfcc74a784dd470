"""Shared fixtures for the attention_dispatch test suite.

* every test starts and ends with an empty decision cache, without the
  ATTENTION_DISPATCH_BACKEND / ATTENTION_DISPATCH_PLUGINS /
  ATTENTION_DISPATCH_AUTOTUNE / ATTENTION_DISPATCH_DETERMINISTIC /
  ATTENTION_DISPATCH_MAX_EXTRA_BYTES variables and with the default autotune mode;
* the autotune cache of the whole session is a temporary folder (see the
  conftest.py at the repository root);
* tests marked ``gpu`` (the marker is registered in pyproject.toml) are
  deselected when torch sees no CUDA device, with one line in the summary;
* ``spy_backend`` registers a backend that records every forward call and
  removes it again afterwards.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch.testing import reference_attention

ENV_VARS = ("ATTENTION_DISPATCH_BACKEND", "ATTENTION_DISPATCH_PLUGINS",
            "ATTENTION_DISPATCH_AUTOTUNE", "ATTENTION_DISPATCH_DETERMINISTIC",
            "ATTENTION_DISPATCH_MAX_EXTRA_BYTES")
_CUDA_ONLY = pytest.StashKey[int]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect every test marked ``gpu`` when no CUDA device is available
    (counted for :func:`pytest_terminal_summary`; no per-test skip lines)."""
    if torch.cuda.is_available():
        return
    cuda_only = [i for i in items if i.get_closest_marker("gpu") is not None]
    if cuda_only:
        config.hook.pytest_deselected(items=cuda_only)
        items[:] = [i for i in items if i.get_closest_marker("gpu") is None]
    config.stash[_CUDA_ONLY] = len(cuda_only)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config
                            ) -> None:
    """One line saying how many CUDA-only tests were left out, and why."""
    n = config.stash.get(_CUDA_ONLY, 0)
    if n:
        terminalreporter.write_line(f"{n} CUDA-only tests (marked gpu) deselected: no CUDA "
                                    "device (torch.cuda.is_available() is False)")


@pytest.fixture(autouse=True)
def _clean_dispatch_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fresh decision cache and no selection/plugin/autotune variables for
    every test; the autotune mode is the default ("stored").

    The numeric canary is off (it would add a forward call to backends whose
    calls tests count); tests/test_reliability.py turns it on where it is tested.
    """
    from attention_dispatch._core import autotuning as _autotune

    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ATTENTION_DISPATCH_CANARY", "0")
    _autotune.autotune(None)
    ad.clear_cache()
    yield
    _autotune.autotune(None)
    ad.clear_cache()


class SpyBackend(ad.Backend):
    """A CPU backend computing the float64 reference (no dropout) and
    recording every call: ``calls`` holds (thread id, spec) tuples."""

    capabilities = ad.Capabilities(
        device_types=frozenset({"cpu"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        dropout=False,
        empty_rows_exact=True,
    )

    def __init__(self) -> None:
        self.calls: list[tuple[int, ad.CallSpec]] = []
        self._lock = threading.Lock()

    def forward(self, q, k, v, *, spec, mask, key_padding_mask, dropout_p, scale):
        with self._lock:
            self.calls.append((threading.get_ident(), spec))
        out, lse = reference_attention(q, k, v, mask=mask, key_padding_mask=key_padding_mask,
                                       causal=spec.causal, scale=scale)
        return out.to(q.dtype), (lse.float() if spec.return_lse else None)


@pytest.fixture
def register_temp() -> Iterator[Callable[..., Any]]:
    """``register_temp(name, cls_or_path, replace=False)``: register a backend
    for the duration of one test.  At teardown the registry is put back as it
    was (same names, same order, the same instances), whatever happened."""
    from attention_dispatch._core.registry import REGISTRY

    REGISTRY.names()  # entry points are discovered before the snapshot
    with REGISTRY._lock:
        entries = dict(REGISTRY._entries)
        plugin_errors = dict(REGISTRY.plugin_errors)

    def register(name: str, target: Any, *, replace: bool = False) -> Any:
        REGISTRY.register(name, target, replace=replace)
        return target

    yield register
    with REGISTRY._lock:
        REGISTRY._entries.clear()
        REGISTRY._entries.update(entries)
        REGISTRY.plugin_errors.clear()
        REGISTRY.plugin_errors.update(plugin_errors)
    ad.clear_cache()


@pytest.fixture
def spy_backend(register_temp: Callable[..., Any]) -> SpyBackend:
    """A registered :class:`SpyBackend` named "spy"; returns its instance."""
    register_temp("spy", SpyBackend)
    inst = ad.get_backend("spy")
    assert isinstance(inst, SpyBackend)
    return inst


@pytest.fixture
def spy_class() -> type:
    """The :class:`SpyBackend` class, to register several spies."""
    return SpyBackend


#: Backends that compile a kernel per call signature on first use (seconds per
#: signature on the CPU): left out of the generic per-backend loops, which use
#: many shapes; tests/test_flex.py covers flex with a few signatures.
COMPILED_BACKENDS = ("flex",)


def cpu_backends() -> list[str]:
    """Registered backends whose probe accepts the CPU (math always does),
    except the compiled ones (:data:`COMPILED_BACKENDS`)."""
    from _helpers import cpu_backends as available

    return available(exclude=COMPILED_BACKENDS)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking ``cpu_backend`` runs once per backend available on the CPU."""
    if "cpu_backend" in metafunc.fixturenames:
        metafunc.parametrize("cpu_backend", cpu_backends())
