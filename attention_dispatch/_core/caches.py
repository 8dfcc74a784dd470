"""The registry of in-memory caches that :func:`clear_all` (``ad.clear_cache()``) walks.

Every module that keeps process-wide state derived from the environment, the
registry or earlier calls (decisions, probes, demotions, environment reads)
registers a function that forgets it, once, at import::

    register_cache("dispatch.plans", _plans.clear)

On-disk caches (stored tuning decisions, the quarantine file) are not cleared
here: ``attention-dispatch cache clear`` and their own ``clear()`` functions do.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

_lock = threading.Lock()
_clearers: dict[str, Callable[[], None]] = {}


def register_cache(name: str, clear: Callable[[], None]) -> None:
    """Make :func:`clear_all` call ``clear`` (``name`` identifies the cache;
    registering a name again replaces its function)."""
    with _lock:
        _clearers[name] = clear


def registered() -> list[str]:
    """The registered caches' names, in registration order."""
    with _lock:
        return list(_clearers)


def clear_all() -> None:
    """Forget every registered in-memory cache."""
    with _lock:
        clearers = list(_clearers.values())
    for clear in clearers:
        clear()


class PlanCache(dict):
    """A process-wide decision cache of one entry point: a dict that registers
    itself with :func:`register_cache` under ``name`` and, past ``limit``
    entries, starts over (a bound on memory, not an eviction policy)."""

    def __init__(self, name: str, limit: int) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._limit = limit
        register_cache(name, self.clear)

    def store(self, key: Any, value: Any) -> None:
        """Remember ``value`` under ``key`` (a None key stores nothing)."""
        if key is None:
            return
        with self._lock:
            if len(self) >= self._limit:
                super().clear()
            self[key] = value

    def clear(self) -> None:
        with self._lock:
            super().clear()
