"""Autotune: time the eligible backends once per shape bucket and remember the
fastest correct one in a per-device JSON cache.

Off by default.  On with ``ATTENTION_DISPATCH_AUTOTUNE=1`` (read at the first
call) or ``ad.autotune(True)``.  The cache lives in
``$XDG_CACHE_HOME/attention-dispatch/`` (``~/.cache`` by default), one file per
environment key (device name, driver, torch and kernel package versions), and is
written atomically (temporary file + ``os.replace``), so concurrent processes
never see a torn file; the last writer of a bucket wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ._spec import CallSpec

ENV_AUTOTUNE = "ATTENTION_DISPATCH_AUTOTUNE"
PACKAGES = ("flash-attn-4", "flash-attn", "xformers", "triton")

_state: dict[str, Optional[bool]] = {"on": None}
_lock = threading.Lock()
_memory: dict[str, dict[str, Any]] = {}


def autotune(enabled: bool = True) -> None:
    """Turn autotuning on or off for this process (overrides the environment)."""
    _state["on"] = bool(enabled)


def enabled() -> bool:
    """Whether auto decisions are autotuned (env read once, at first use)."""
    if _state["on"] is None:
        raw = os.environ.get(ENV_AUTOTUNE, "").strip().lower()
        _state["on"] = raw in ("1", "true", "yes", "on")
    return bool(_state["on"])


def forget_env() -> None:
    """Re-read ATTENTION_DISPATCH_AUTOTUNE at the next use (ad.clear_cache)."""
    if _state["on"] is not None and ENV_AUTOTUNE in os.environ:
        _state["on"] = None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attention-dispatch"


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
    env = json.dumps(environment_key(device), sort_keys=True)
    return cache_dir() / f"autotune-{hashlib.sha1(env.encode()).hexdigest()[:16]}.json"


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
    """The cache file's content for ``device`` ({} when absent or unreadable)."""
    path = cache_path(device)
    with _lock:
        if str(path) in _memory:
            return _memory[str(path)]
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data.setdefault("environment", environment_key(device))
        data.setdefault("decisions", {})
        _memory[str(path)] = data
        return data


def store(device: torch.device, bucket: str, entry: dict[str, Any]) -> None:
    """Add one decision; merge with what other processes wrote; atomic replace."""
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


def clear() -> list[str]:
    """Delete every cache file; returns their paths."""
    removed = []
    with _lock:
        _memory.clear()
        if cache_dir().is_dir():
            for p in cache_dir().glob("autotune-*.json"):
                p.unlink()
                removed.append(str(p))
    return removed


def cached_choice(spec: CallSpec, eligible: list[str]) -> Optional[str]:
    """The stored decision for ``spec``'s bucket if it is one of ``eligible``
    (nothing is timed; None when there is none)."""
    if len(eligible) < 2:
        return None
    hit = load(spec.device)["decisions"].get(bucket_key(spec))
    return hit["backend"] if hit and hit.get("backend") in eligible else None


def choose(spec: CallSpec, eligible: list[str], timer: Callable[[str], Optional[float]]
           ) -> str:
    """The cached or newly measured fastest of ``eligible`` (in rank order).

    ``timer(name)`` returns milliseconds per call of backend ``name`` on the
    call's inputs (warm-up excluded), or None when it failed or was incorrect.
    """
    if len(eligible) < 2:
        return eligible[0]
    hit = cached_choice(spec, eligible)
    if hit is not None:
        return hit
    device, bucket = spec.device, bucket_key(spec)
    times = {n: timer(n) for n in eligible}
    good = {n: t for n, t in times.items() if t is not None}
    best = min(good, key=lambda n: good[n]) if good else eligible[0]
    store(device, bucket, {"backend": best, "ms": {n: t for n, t in times.items()}})
    return best


def timer_for(spec: CallSpec, run: Callable[[str], Any], repeats: int = 10
              ) -> Callable[[str], Optional[float]]:
    """``timer(name)``: correctness on a reduced case, then the median ms of
    ``run(name)`` (the real call, without gradients) after one warm-up call."""
    from . import testing
    from .bench.run import time_interleaved

    def timer(name: str) -> Optional[float]:
        try:
            testing.check_backend(name, testing.reduced_case(spec), spec.device)
            with torch.no_grad():
                run(name)
                return time_interleaved({name: lambda: run(name)}, spec.device,
                                        budget_s=0.2, max_reps=repeats)[name]
        except Exception:  # incorrect or failing: not a candidate
            return None

    return timer
