"""Quarantine: kinds of calls on which a backend is known to give wrong answers.

Two sources, both consulted when ``backend="auto"`` decides (never per call):

* ``known_bugs.json`` (shipped): upstream kernel bugs with silently wrong
  results, each with the versions, device and call conditions it needs and a
  reference to the upstream report.  Auto avoids them from the first call.
* ``quarantine.json`` in the per-user cache directory (written by verify mode
  when a backend's result breaks the contract's accuracy rule): keyed by
  backend, backend version, torch version, device name and a signature class
  (dtype, head dims, flags and the sequence lengths in power-of-two buckets).
  Writers take a file lock; later processes read it on their first decision.
  ``attention-dispatch cache show`` lists it, ``cache clear`` removes it.

A forced backend still runs (the user chose it); explain() shows why auto
would not.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from .autotuning import cache_dir
from .backend import Backend
from .spec import CallSpec
from .caches import register_cache

FILE = "quarantine.json"
_lock = threading.Lock()
_state: dict[str, Any] = {}  # "entries": list (the file's), "known": list (the shipped bugs)


def _bucket(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def signature_class(spec: CallSpec) -> dict[str, Any]:
    """What a quarantine entry is keyed by, beyond backend and versions."""
    return {"dtype": str(spec.dtype).replace("torch.", ""), "head_dim": spec.head_dim,
            "head_dim_v": spec.head_dim_v, "seq_q": _bucket(spec.seq_q),
            "seq_k": _bucket(spec.seq_k), "causal": spec.causal, "mask": spec.mask_kind,
            "key_padding": spec.key_padding, "gqa": spec.gqa, "grad": spec.requires_grad,
            "window": spec.window is not None, "softcap": spec.softcap is not None,
            "alibi": spec.alibi, "varlen": spec.varlen}


def device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def entry_key(backend: Backend, spec: CallSpec) -> dict[str, Any]:
    return {"backend": backend.name, "backend_version": backend.version() or torch.__version__,
            "torch": torch.__version__, "device": device_name(spec.device),
            "signature": signature_class(spec)}


def path() -> Path:
    return cache_dir() / FILE


@contextlib.contextmanager
def _file_lock() -> Iterator[None]:
    """An exclusive lock shared by every process writing the quarantine file."""
    path().parent.mkdir(parents=True, exist_ok=True)
    with open(path().with_suffix(".lock"), "a") as handle:
        try:
            import fcntl
        except ImportError:  # no POSIX locks: the atomic replace still protects readers
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read() -> list[dict[str, Any]]:
    try:
        data = json.loads(path().read_text())
    except (OSError, ValueError):
        return []
    return [e for e in data.get("entries", []) if isinstance(e, dict)]


def entries() -> list[dict[str, Any]]:
    """The quarantine entries (read once per process, then kept in memory)."""
    with _lock:
        if "entries" not in _state:
            _state["entries"] = _read()
        return _state["entries"]


def record(backend: Backend, spec: CallSpec, why: str) -> dict[str, Any]:
    """Add an entry for ``backend`` on calls like ``spec`` (merged with what
    other processes wrote, under the file lock; atomic replace)."""
    entry = dict(entry_key(backend, spec), why=why[:300])
    with _lock, _file_lock():
        current = _read()
        same = [e for e in current if {k: e.get(k) for k in entry if k != "why"}
                == {k: v for k, v in entry.items() if k != "why"}]
        if not same:
            current.append(entry)
            fd, tmp = tempfile.mkstemp(dir=path().parent, prefix=".quarantine-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"entries": current}, f, indent=1, sort_keys=True)
            os.replace(tmp, path())
        _state["entries"] = current
    return entry


def clear() -> list[str]:
    """Delete the quarantine file; returns the paths removed."""
    removed = []
    with _lock:
        _state.pop("entries", None)
        for p in (path(), path().with_suffix(".lock")):
            if p.exists():
                p.unlink()
                removed.append(str(p))
    return removed


def forget() -> None:
    """Re-read both sources at the next decision (ad.clear_cache)."""
    with _lock:
        _state.clear()


register_cache("quarantine.memory", forget)


# ------------------------------------------------------------ known bugs


def known_bugs() -> list[dict[str, Any]]:
    """The shipped list of upstream wrong-answer bugs (``known_bugs.json``)."""
    with _lock:
        if "known" not in _state:
            text = resources.files(__package__).joinpath("known_bugs.json").read_text()
            _state["known"] = json.loads(text)["bugs"]
        return _state["known"]


def _version_of(what: str, backend: Backend) -> Optional[str]:
    if what == "torch":
        return torch.__version__.split("+")[0]
    if what == "cudnn":
        v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        return None if not v else f"{v // 10000}.{v % 10000 // 100}.{v % 100}"
    return backend.version()


def _versions_match(rules: dict[str, str], backend: Backend) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion

    for what, spec in rules.items():
        have = _version_of(what, backend)
        if have is None:
            return False
        try:
            if have not in SpecifierSet(spec, prereleases=True):
                return False
        except InvalidVersion:
            return False
    return True


def _device_matches(rule: dict[str, Any], device: torch.device) -> bool:
    if rule.get("type", device.type) != device.type:
        return False
    caps = rule.get("capabilities")
    if not caps:
        return True
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}" in caps


_CONDITIONS: dict[str, Callable[[CallSpec, Any], bool]] = {
    "dtypes": lambda s, v: str(s.dtype).replace("torch.", "") in v,
    "requires_grad": lambda s, v: s.requires_grad == v,
    "masked": lambda s, v: (s.mask_kind != "none" or s.key_padding) == v,
    "gqa": lambda s, v: s.gqa == v,
    "heads_kv_below": lambda s, v: s.heads_kv < v,
    "head_dims": lambda s, v: s.head_dim in v or s.head_dim_v in v,
    "seq_k_mod": lambda s, v: s.seq_k % v[0] == v[1],
    "min_scores": lambda s, v: s.seq_q * s.seq_k >= v,
}


def bug_matches(bug: dict[str, Any], backend: Backend, spec: CallSpec) -> bool:
    """Whether the known ``bug`` applies to ``backend`` on the call ``spec``.
    An unknown condition name raises KeyError (the shipped file is tested)."""
    if bug["backend"] != backend.name or not _device_matches(bug.get("device", {}), spec.device):
        return False
    if not all(_CONDITIONS[k](spec, v) for k, v in bug.get("when", {}).items()):
        return False
    return _versions_match(bug.get("versions", {}), backend)


def reason(backend: Backend, spec: CallSpec) -> Optional[str]:
    """Why auto must not choose ``backend`` for ``spec``, or None."""
    for bug in known_bugs():
        if bug_matches(bug, backend, spec):
            return f"known upstream bug {bug['id']}: {bug['what']} ({bug['reference']})"
    mine = entry_key(backend, spec)
    for e in entries():
        if all(e.get(k) == v for k, v in mine.items()):
            return (f"quarantined: wrong results seen by verify mode on this kind of call "
                    f"({e.get('why', '')[:120]}); `attention-dispatch cache clear` forgets it")
    return None
