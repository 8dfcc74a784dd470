"""Autotune: time the eligible backends once per shape bucket and remember the
fastest correct one in a per-device JSON cache.

Three modes (:func:`mode`), from ``ATTENTION_DISPATCH_AUTOTUNE`` (read at the
first call and after ``ad.clear_cache()``) or :func:`autotune`:

* ``"stored"`` (the default, variable unset or ``stored``): decisions already
  in the cache (written by ``attention-dispatch tune`` or an earlier autotuned
  run) replace the ranking's choice; nothing is ever timed.
* ``"on"`` (``1``, ``on``, ``true``, ``yes``): the first call of a bucket with
  no stored decision times every eligible backend and stores the fastest.
* ``"off"`` (``0``, ``off``, ``false``, ``no``): the static ranking only; the
  cache is neither read nor written.

The cache lives in ``$ATTENTION_DISPATCH_CACHE_DIR`` if set, else
``$XDG_CACHE_HOME/attention-dispatch/`` (``~/.cache`` by default), one file
per environment key (device name, driver, torch and kernel package versions),
and is written atomically (temporary file + ``os.replace``), so concurrent
processes never see a torn file; the last writer of a bucket wins.  Nothing
here reads the environment at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch

from .errors import AttentionInputError
from .timing import time_interleaved
from .spec import CallSpec
from .caches import register_cache

ENV_AUTOTUNE = "ATTENTION_DISPATCH_AUTOTUNE"
ENV_CACHE_DIR = "ATTENTION_DISPATCH_CACHE_DIR"
PACKAGES = ("flash-attn-4", "flash-attn", "xformers", "triton")
OFF, STORED, ON = "off", "stored", "on"
_WORDS = {"0": OFF, "off": OFF, "false": OFF, "no": OFF, "": STORED, "stored": STORED,
          "1": ON, "on": ON, "true": ON, "yes": ON}

_lock = threading.RLock()
# forced: set by autotune(); env: the variable's mode, read once; dir: the cache
# folder (override: a temporary one, see isolated_cache)
_state: dict[str, Any] = {"forced": None, "env": None, "dir": None, "override": None}
_paths: dict[torch.device, Path] = {}
_memory: dict[str, dict[str, Any]] = {}


def autotune(enabled: Union[bool, str, None] = True) -> None:
    """Set the autotune mode for this process (overrides the environment).

    Args:
        enabled: True or "on": time new buckets and store the fastest backend;
            "stored": use stored decisions only (the default); False or "off":
            the static ranking only; None: back to ATTENTION_DISPATCH_AUTOTUNE.

    Raises:
        AttentionInputError: any other value.
    """
    if enabled is None or isinstance(enabled, bool):
        _state["forced"] = None if enabled is None else (ON if enabled else OFF)
        return
    word = str(enabled).strip().lower()
    if word not in (ON, STORED, OFF):
        raise AttentionInputError("autotune(enabled)", "True, False, None, 'on', 'stored' "
                                  "or 'off'", repr(enabled))
    _state["forced"] = word


def mode() -> str:
    """"on", "stored" or "off": :func:`autotune`'s setting, else the environment
    variable's (read once; ``ad.clear_cache()`` re-reads it).

    Raises:
        AttentionInputError: ATTENTION_DISPATCH_AUTOTUNE has an unknown value.
    """
    if _state["forced"] is not None:
        return _state["forced"]
    if _state["env"] is None:
        raw = os.environ.get(ENV_AUTOTUNE, "")
        word = _WORDS.get(raw.strip().lower())
        if word is None:
            raise AttentionInputError(
                ENV_AUTOTUNE, "1/on (time and store), stored or unset (use stored decisions) "
                "or 0/off (static ranking only)", repr(raw))
        _state["env"] = word
    return _state["env"]


def enabled() -> bool:
    """Whether new buckets are timed (mode "on")."""
    return mode() == ON


def forget_env() -> None:
    """Re-read ATTENTION_DISPATCH_AUTOTUNE, the cache folder and the cache files
    at the next use (``ad.clear_cache()``)."""
    with _lock:
        _state["env"] = None
        _state["dir"] = None
        _paths.clear()
        _memory.clear()


register_cache("autotuning.environment", forget_env)


def cache_dir() -> Path:
    """The cache folder: a temporary one inside :func:`isolated_cache`, else
    $ATTENTION_DISPATCH_CACHE_DIR, else $XDG_CACHE_HOME/attention-dispatch
    (~/.cache/attention-dispatch); the environment is read once."""
    if _state["override"] is not None:
        return _state["override"]
    if _state["dir"] is None:
        own = os.environ.get(ENV_CACHE_DIR)
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                  ".cache")
        _state["dir"] = Path(own) if own else Path(base) / "attention-dispatch"
    return _state["dir"]


@contextmanager
def isolated_cache() -> Iterator[Path]:
    """A fresh, empty cache folder for the block (benchmarks): stored decisions
    of the user's cache neither apply nor change; the folder is deleted after."""
    with tempfile.TemporaryDirectory(prefix="attention-dispatch-cache-") as tmp:
        with _lock:
            previous = _state["override"]
            _state["override"] = Path(tmp)
            _paths.clear()
            _memory.clear()
        try:
            yield Path(tmp)
        finally:
            with _lock:
                _state["override"] = previous
                _paths.clear()
                _memory.clear()


def environment_key(device: torch.device) -> dict[str, Any]:
    """What a cached timing depends on: device, driver, torch and kernel versions."""
    key: dict[str, Any] = {"device": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        key.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   driver=_driver_version())
    for p in PACKAGES:
        try:
            key[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return key


def _driver_version() -> Optional[str]:
    try:
        return str(torch.cuda.driver_version()) if hasattr(torch.cuda, "driver_version") \
            else str(torch._C._cuda_getDriverVersion())  # type: ignore[attr-defined]
    except Exception:
        return None


def cache_path(device: torch.device) -> Path:
    """The cache file for ``device`` in this environment (computed once per
    device until ``ad.clear_cache()``)."""
    with _lock:
        path = _paths.get(device)
        if path is None:
            env = json.dumps(environment_key(device), sort_keys=True)
            path = cache_dir() / f"autotune-{hashlib.sha1(env.encode()).hexdigest()[:16]}.json"
            _paths[device] = path
        return path


def _bucket(n: int) -> int:
    """Round up to a power of two (1, 2, 4, ...)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def bucket_key(spec: CallSpec) -> str:
    """Calls in one bucket share a decision: sequence lengths and batch rounded
    up to powers of two, everything else exact."""
    fields: tuple = (
        str(spec.dtype).replace("torch.", ""), _bucket(spec.batch), spec.heads_q, spec.heads_kv,
        _bucket(spec.seq_q), _bucket(spec.seq_k), spec.head_dim, spec.head_dim_v, spec.layout,
        spec.mask_kind, spec.key_padding, spec.causal, spec.dropout, spec.return_lse,
        spec.requires_grad)
    if spec.window is not None or spec.softcap is not None or spec.alibi or spec.varlen:
        fields += (f"window={spec.window}", f"softcap={spec.softcap}", f"alibi={spec.alibi}",
                   f"varlen={spec.varlen}")
    return "|".join(str(x) for x in fields)


def load(device: torch.device) -> dict[str, Any]:
    """The cache file's content for ``device`` ({} when absent or unreadable);
    read once, until ``ad.clear_cache()``."""
    path = cache_path(device)
    with _lock:
        if str(path) in _memory:
            return _memory[str(path)]
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict) or not isinstance(data.get("decisions", {}), dict):
            data = {}
        data.setdefault("environment", environment_key(device))
        data.setdefault("decisions", {})
        _memory[str(path)] = data
        return data


def store(device: torch.device, bucket: str, entry: dict[str, Any]) -> Path:
    """Add one decision; merge with what other processes wrote; atomic replace.
    Returns the cache file's path."""
    path = cache_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock:
        try:
            disk = json.loads(path.read_text())
        except (OSError, ValueError):
            disk = {"environment": environment_key(device), "decisions": {}}
        disk.setdefault("decisions", {})[bucket] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(disk, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        _memory[str(path)] = disk
    return path


def clear() -> list[str]:
    """Delete every cache file; returns their paths."""
    removed = []
    with _lock:
        _memory.clear()
        if cache_dir().is_dir():
            for p in sorted(cache_dir().glob("autotune-*.json")):
                p.unlink()
                removed.append(str(p))
    return removed


def stored_choice(spec: CallSpec) -> Optional[str]:
    """The backend stored for ``spec``'s bucket, or None (one dict lookup once
    the file is loaded; nothing is timed or checked)."""
    hit = load(spec.device)["decisions"].get(bucket_key(spec))
    name = hit.get("backend") if isinstance(hit, dict) else None
    return name if isinstance(name, str) else None


def cached_choice(spec: CallSpec, eligible: list[str]) -> Optional[str]:
    """The stored decision for ``spec``'s bucket if it is one of ``eligible``
    (nothing is timed; None when there is none)."""
    if len(eligible) < 2:
        return None
    name = stored_choice(spec)
    return name if name in eligible else None


class Listener:
    """What :func:`choose` reports while it times backends (``tune`` prints it);
    the base class ignores everything."""

    def timing(self, name: str) -> None:
        """Backend ``name`` is about to be checked and timed."""

    def timed(self, name: str, ms: Optional[float]) -> None:
        """Backend ``name`` took ``ms`` per call (None: it failed or was incorrect)."""


def choose(spec: CallSpec, eligible: list[str], timer: Callable[[str], Optional[float]],
           retime: bool = False, listener: Optional[Listener] = None) -> str:
    """The cached or newly measured fastest of ``eligible`` (in rank order).

    ``timer(name)`` returns milliseconds per call of backend ``name`` on the
    call's inputs (warm-up excluded), or None when it failed or was incorrect.
    ``retime``: measure even when a decision is stored (``tune``);
    ``listener`` hears about each backend as it is timed.
    """
    if len(eligible) < 2:
        return eligible[0]
    hit = None if retime else cached_choice(spec, eligible)
    if hit is not None:
        return hit
    listener = listener or Listener()
    times: dict[str, Optional[float]] = {}
    for n in eligible:
        listener.timing(n)
        times[n] = timer(n)
        listener.timed(n, times[n])
    good = {n: t for n, t in times.items() if t is not None}
    best = min(good, key=lambda n: good[n]) if good else eligible[0]
    store(spec.device, bucket_key(spec), {"backend": best, "ms": times})
    return best


def timer_for(spec: CallSpec, run: Callable[[str], Any],
              check: Callable[[str], Optional[str]], repeats: int = 10
              ) -> Callable[[str], Optional[float]]:
    """``timer(name)``: ``check(name)`` (None: correct, e.g. ``selfcheck.check_call``
    on a small call), then the median ms of ``run(name)`` (the real call,
    without gradients) after one warm-up call."""

    def timer(name: str) -> Optional[float]:
        try:
            if check(name) is not None:
                return None
            with torch.no_grad():
                run(name)
                return time_interleaved({name: lambda: run(name)}, spec.device,
                                        budget_s=0.2, max_reps=repeats)[name]
        except Exception:  # incorrect or failing: not a candidate
            return None

    return timer
