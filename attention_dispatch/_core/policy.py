"""Policies: constraints on which backend may run a call, beside the selection.

Two policies, each ``None`` (no constraint) unless set:

* ``deterministic=True``: only backends whose forward - and, when the call
  needs gradients, backward - is deterministic are eligible
  (``Backend.determinism``: ``Capabilities.deterministic_forward`` /
  ``deterministic_backward``, narrowed per device by ``capabilities_on``).
  With no explicit value anywhere, ``torch.are_deterministic_algorithms_enabled()``
  stands for True.
* ``max_extra_bytes=N``: paths whose estimated extra memory
  (``Backend.extra_bytes`` plus the copies the memory plan makes) exceeds N
  bytes are refused.

Precedence, as for backends: the call's argument > :func:`use_policy` (a
context variable; nested blocks inherit what they do not set) >
``ATTENTION_DISPATCH_DETERMINISTIC`` / ``ATTENTION_DISPATCH_MAX_EXTRA_BYTES``
(read once; ``ad.clear_cache()`` re-reads them) > None.  The public functions
store the effective values in ``CallOptions``, so the decision cache keys on
them: a call under another policy is decided again.

Without ``max_extra_bytes``, auto warns once (:class:`MemoryWarning`, and a
"memory" event) the first time the path it chose for a call signature
materialises an O(Sq * Sk) buffer of :data:`WARN_QUADRATIC_BYTES` or more.
"""

from __future__ import annotations

import contextvars
import os
import threading
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch

from . import eventlog as _events
from .backend import Backend
from .caches import register_cache
from .errors import AttentionInputError, MemoryWarning
from .layout import Buffer, describe_bytes
from .spec import CallSpec, check_deterministic, check_max_extra_bytes

ENV_DETERMINISTIC = "ATTENTION_DISPATCH_DETERMINISTIC"
ENV_MAX_EXTRA_BYTES = "ATTENTION_DISPATCH_MAX_EXTRA_BYTES"
#: O(Sq * Sk) bytes from which auto warns once per signature (MemoryWarning).
WARN_QUADRATIC_BYTES = 1 << 30
MEMORY = "memory"  # the event kind of that warning

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


class Policy(NamedTuple):
    """A set of policies; None = not set here (defer to the next source)."""

    deterministic: Optional[bool] = None
    max_extra_bytes: Optional[int] = None


_NONE = Policy()
_context: contextvars.ContextVar[Optional[Policy]] = contextvars.ContextVar(
    "attention_dispatch_policy", default=None)
_env: dict[str, Policy] = {}
#: torch's flag, read per call (the C function: torch.are_deterministic_algorithms_enabled
#: wraps it); a call that sets ``deterministic`` itself does not read it
_torch_deterministic = getattr(torch._C, "_get_deterministic_algorithms",
                               torch.are_deterministic_algorithms_enabled)
_context_get = _context.get
_env_get = _env.get


def _parse_bool(raw: str) -> Optional[bool]:
    text = raw.strip().lower()
    if not text:
        return None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise AttentionInputError(ENV_DETERMINISTIC, "1/true/yes/on or 0/false/no/off", repr(raw))


def parse_bytes(raw: str, argument: str = ENV_MAX_EXTRA_BYTES) -> Optional[int]:
    """"2GiB" / "512 MiB" / "1e9" / "1000000" -> bytes; "" -> None."""
    text = raw.strip().lower().replace(" ", "")
    if not text:
        return None
    digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(digits):]
    try:
        value = float(digits) * _UNITS[unit]
    except (KeyError, ValueError):
        raise AttentionInputError(argument, "bytes: an int >= 0, optionally with a unit "
                                  "(KiB, MiB, GiB, KB, MB, GB)", repr(raw)) from None
    if value < 0:
        raise AttentionInputError(argument, "bytes >= 0", repr(raw))
    return int(value)


def env_policy() -> Policy:
    """The process default from the environment, read once (see clear_cache)."""
    pol = _env.get("p")
    if pol is None:
        pol = Policy(_parse_bool(os.environ.get(ENV_DETERMINISTIC, "")),
                     parse_bytes(os.environ.get(ENV_MAX_EXTRA_BYTES, "")))
        _env["p"] = pol
    return pol


register_cache("policy.environment", _env.clear)
_warned: set[tuple[str, CallSpec]] = set()
_lock = threading.Lock()
register_cache("policy.memory_warnings", _warned.clear)


def context_policy() -> Policy:
    """What :func:`use_policy` blocks around this point set (None where unset)."""
    return _context.get() or _NONE


def effective(deterministic: Any, max_extra_bytes: Any) -> tuple[Any, Any]:
    """The policies a call runs under: its arguments, else use_policy, else the
    environment; ``deterministic`` finally from torch's deterministic mode.
    Values are not checked here (``validate`` does, on a cache miss).  On the hot
    path of every call: a context-variable read, a dict read and torch's flag."""
    env = _env_get("p") or env_policy()
    ctx = _context_get()
    if ctx is not None:  # inside use_policy: its values first, the environment's next
        if deterministic is None:
            deterministic = ctx[0]
        if max_extra_bytes is None:
            max_extra_bytes = ctx[1]
    if deterministic is None:
        deterministic = env[0]
        if deterministic is None:
            deterministic = _torch_deterministic()
    if max_extra_bytes is None:
        max_extra_bytes = env[1]
    return deterministic, max_extra_bytes


@contextmanager
def use_policy(deterministic: Optional[bool] = None,
               max_extra_bytes: Optional[int] = None) -> Iterator[Policy]:
    """Apply policies to every call inside the block that does not set them itself.

    ``deterministic``: True = only deterministic kernels (forward, and backward
    when gradients are needed); False = no constraint, even under torch's
    deterministic mode.  ``max_extra_bytes``: refuse paths whose estimated extra
    memory exceeds this many bytes.  None leaves the enclosing block's (or the
    environment's) value.  Context-local (contextvars): other threads and asyncio
    tasks keep their own; restored on exit, also on error.  Compiled graphs keep
    the policy they were traced under (see ``use_backend``).

    Raises:
        AttentionTypeError / AttentionInputError: a value of the wrong type or range.
    """
    det = check_deterministic(deterministic)
    limit = check_max_extra_bytes(max_extra_bytes)
    outer = context_policy()
    pol = Policy(outer.deterministic if det is None else det,
                 outer.max_extra_bytes if limit is None else limit)
    token = _context.set(pol)
    try:
        yield pol
    finally:
        _context.reset(token)


# ------------------------------------------------------------------ checking


def _determinism_reason(inst: Backend, spec: CallSpec) -> Optional[str]:
    fwd, bwd = inst.determinism(spec)
    if not fwd:
        return ("deterministic=True; this kernel's forward is not deterministic "
                + inst.nondeterminism_note(spec, backward=False))
    if spec.requires_grad and not bwd:
        return ("deterministic=True; this kernel's backward is not deterministic "
                + inst.nondeterminism_note(spec, backward=True))
    return None


def reasons(inst: Backend, spec: CallSpec,
            copies: Optional[Callable[[Backend], int]] = None) -> list[str]:
    """Why the policies of ``spec`` refuse backend ``inst`` (empty: they do not).
    ``copies(inst)``: the bytes the memory plan copies for it (when known)."""
    out = []
    if spec.deterministic:
        why = _determinism_reason(inst, spec)
        if why:
            out.append(why)
    if spec.max_extra_bytes is not None:
        total = extra_bytes(inst, spec, copies)
        if total > spec.max_extra_bytes:
            out.append(f"max_extra_bytes={spec.max_extra_bytes} "
                       f"({describe_bytes(spec.max_extra_bytes)}); this path allocates "
                       f"~{describe_bytes(total)} extra ({summary(buffers(inst, spec, copies))})")
    return out


def buffers(inst: Backend, spec: CallSpec,
            copies: Optional[Callable[[Backend], int]] = None) -> tuple[Buffer, ...]:
    """The backend's estimate plus the memory plan's copies (when known)."""
    out = tuple(inst.buffers(spec))
    if copies is not None:
        n = copies(inst)
        if n:
            out += (Buffer("copies for the memory layout / key padding", n),)
    return out


def extra_bytes(inst: Backend, spec: CallSpec,
                copies: Optional[Callable[[Backend], int]] = None) -> int:
    return sum(b.nbytes for b in buffers(inst, spec, copies))


def summary(bufs: tuple[Buffer, ...]) -> str:
    """"score matrix 1 GiB; ..." (the largest first)."""
    if not bufs:
        return "nothing beyond inputs and output"
    ordered = sorted(bufs, key=lambda b: -b.nbytes)
    return "; ".join(f"{b.what} {describe_bytes(b.nbytes)}" for b in ordered)


def warn_if_large(inst: Backend, spec: CallSpec, selection: tuple[str, ...]) -> None:
    """Auto without ``max_extra_bytes``: warn once per (backend, signature)
    when the chosen path materialises O(Sq * Sk) buffers of
    :data:`WARN_QUADRATIC_BYTES` or more (a MemoryWarning and a "memory" event)."""
    if "auto" not in selection or spec.max_extra_bytes is not None:
        return
    try:
        bufs = tuple(inst.buffers(spec))
    except Exception:  # a plugin's estimate must never break a call
        return
    quad = sum(b.nbytes for b in bufs if b.quadratic)
    if quad < WARN_QUADRATIC_BYTES:
        return
    with _lock:
        if (inst.name, spec) in _warned:
            return
        _warned.add((inst.name, spec))
    detail = (f"{inst.name} materialises ~{describe_bytes(quad)} of O(Sq*Sk) buffers "
              f"(B={spec.batch} Hq={spec.heads_q} Sq={spec.seq_q} Sk={spec.seq_k}): "
              f"{summary(tuple(b for b in bufs if b.quadratic))}")
    _events.emit(MEMORY, inst.name, detail, spec)
    warnings.warn(f"attention_dispatch: {detail}. No fused kernel took this call "
                  "(ad.explain() says why); set max_extra_bytes (ad.use_policy) to refuse "
                  "such paths instead.", MemoryWarning, stacklevel=5)
