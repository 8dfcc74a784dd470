"""Structured events: every decision, fallback, demotion and canary result.

``ad.events()`` returns the recent events (a bounded buffer, newest last) as
:class:`Event` records; each is also logged once on the ``attention_dispatch``
logger with the record's fields under ``extra={"attention_dispatch": {...}}``.
``ATTENTION_DISPATCH_LOG=debug`` (or info/warning) attaches a stderr handler to
that logger at the first call, so each new decision is printed once.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .caches import register_cache

logger = logging.getLogger("attention_dispatch")
ENV_LOG = "ATTENTION_DISPATCH_LOG"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}

DECISION = "decision"
FALLBACK = "fallback"
DEMOTION = "demotion"
CANARY = "canary"
PLUGIN = "plugin"
VERIFY = "verify"


@dataclass(frozen=True)
class Event:
    """One thing the dispatcher did.

    kind: "decision", "fallback", "demotion", "canary", "plugin" or "verify";
    backend: the backend concerned; detail: what happened (reasons, errors);
    spec: the call signature (a CallSpec) where there is one.
    """

    kind: str
    backend: Optional[str]
    detail: str
    spec: Any = None
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = None if self.spec is None else repr(self.spec)
        return d


_buffer: collections.deque[Event] = collections.deque(maxlen=1000)
_lock = threading.Lock()
_configured: dict[str, bool] = {}


def configure_from_env() -> None:
    """Attach a stderr handler if ATTENTION_DISPATCH_LOG asks for one (once)."""
    if _configured.get("done"):
        return
    _configured["done"] = True
    level = _LEVELS.get(os.environ.get(ENV_LOG, "").strip().lower())
    if level is not None:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level)


register_cache("events.log_environment", _configured.clear)


def emit(kind: str, backend: Optional[str], detail: str, spec: Any = None,
         level: int = logging.DEBUG) -> Event:
    """Record an event and log it."""
    ev = Event(kind, backend, detail, spec)
    with _lock:
        _buffer.append(ev)
    if logger.isEnabledFor(level):
        logger.log(level, "%s %s: %s", kind, backend, detail,
                   extra={"attention_dispatch": ev.as_dict()})
    return ev


def events(kind: Optional[str] = None) -> list[Event]:
    """Recent events, oldest first; only those of ``kind`` if given."""
    with _lock:
        return [e for e in _buffer if kind is None or e.kind == kind]


def clear_events() -> None:
    with _lock:
        _buffer.clear()
