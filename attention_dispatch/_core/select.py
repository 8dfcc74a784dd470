"""Backend selection: call argument > use_backend > ATTENTION_DISPATCH_BACKEND > auto."""

from __future__ import annotations

import contextvars
import os
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

from .errors import AttentionTypeError, UnknownBackendError
from .registry import REGISTRY
from .caches import register_cache

ENV_BACKEND = "ATTENTION_DISPATCH_BACKEND"
AUTO: tuple[str, ...] = ("auto",)

BackendArg = Union[str, Sequence[str], None]

_context: contextvars.ContextVar[Optional[tuple[str, ...]]] = contextvars.ContextVar(
    "attention_dispatch_backend", default=None)
_env: dict[str, Optional[tuple[str, ...]]] = {}


def normalize(argument: str, backend: BackendArg) -> tuple[str, ...]:
    """"a,b" / ["a", "b"] -> ("a", "b"), every name checked against the registry."""
    if isinstance(backend, str):
        names = tuple(p.strip() for p in backend.split(","))
    elif isinstance(backend, (list, tuple)) and all(isinstance(n, str) for n in backend):
        names = tuple(n.strip() for n in backend)
    else:
        raise AttentionTypeError(argument, "a backend name, a comma separated string of names "
                                 "or a list of names", repr(backend))
    if not names or any(not n for n in names):
        raise AttentionTypeError(argument, "at least one non-empty backend name", repr(backend))
    known = REGISTRY.names()
    for n in names:
        if n != "auto" and n not in known:
            raise UnknownBackendError(argument, n, known)
    return names


def env_selection() -> Optional[tuple[str, ...]]:
    """The process default from ATTENTION_DISPATCH_BACKEND, read once (see clear_cache)."""
    if "sel" not in _env:
        raw = os.environ.get(ENV_BACKEND, "").strip()
        _env["sel"] = normalize(ENV_BACKEND, raw) if raw else None
    return _env["sel"]


def forget_env() -> None:
    _env.clear()


def context_selection() -> Optional[tuple[str, ...]]:
    return _context.get()


_memo: dict[object, tuple[str, ...]] = {}


def forget_names() -> None:
    """Drop memoised name checks (the registry changed)."""
    _memo.clear()


register_cache("select.environment", forget_env)
register_cache("select.names", forget_names)


def _argument(backend: Union[str, Sequence[str]]) -> tuple[str, ...]:
    key = backend if isinstance(backend, str) else (
        tuple(backend) if isinstance(backend, (list, tuple)) else None)
    hit = _memo.get(key) if key is not None else None
    if hit is None:
        hit = normalize("backend", backend)
        if key is not None:
            _memo[key] = hit
    return hit


def resolve(backend: BackendArg) -> tuple[tuple[str, ...], str]:
    """The effective selection and where it came from.

    ``backend="auto"`` (the default) defers to use_backend, then the
    environment variable.
    """
    if backend is not None and backend != "auto":
        return _argument(backend), "argument"
    sel = _context.get()
    if sel is not None:
        return sel, "use_backend"
    sel = env_selection()
    if sel is not None:
        return sel, ENV_BACKEND
    return AUTO, "default"


@contextmanager
def use_backend(backend: Union[str, Sequence[str]]) -> Iterator[tuple[str, ...]]:
    """Use ``backend`` (a name, "a,b" or a list, "auto" allowed) for every call
    inside the block that does not name one itself.

    Context-local (contextvars): other threads and asyncio tasks keep their own
    choice.  The previous choice is restored on exit, also on error.
    """
    sel = normalize("backend", backend)
    token = _context.set(sel)
    try:
        yield sel
    finally:
        _context.reset(token)


def selection_of(backend: BackendArg) -> tuple[str, ...]:
    """The selection a call's ``backend`` argument stands for: "auto" defers to
    :func:`use_backend`, then ATTENTION_DISPATCH_BACKEND."""
    if backend == "auto":
        return _context.get() or env_selection() or AUTO
    return resolve(backend)[0]
