"""The backend registry: built-ins and plugins by "module:attr" path, imported on
first use; entry points discovered lazily; strict about duplicate names; one
broken plugin never breaks the others."""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .backend import Backend
from .caches import register_cache
from .errors import BackendRegistrationError, PluginWarning, UnknownBackendError

ENTRY_POINT_GROUP = "attention_dispatch.backends"
PLUGINS_ENV = "ATTENTION_DISPATCH_PLUGINS"

BUILTINS: dict[str, str] = {
    "math": "attention_dispatch.adapters.math:MathBackend",
    "sdpa-flash": "attention_dispatch.adapters.sdpa_flash:SdpaFlashBackend",
    "sdpa-mem-efficient": "attention_dispatch.adapters.sdpa_mem_efficient:SdpaMemEfficientBackend",
    "sdpa-cudnn": "attention_dispatch.adapters.sdpa_cudnn:SdpaCudnnBackend",
    "flash-attn": "attention_dispatch.adapters.flash_attn:FlashAttnBackend",
    "xformers": "attention_dispatch.adapters.xformers:XformersBackend",
    "flex": "attention_dispatch.adapters.flex:FlexBackend",
    "sdpa": "attention_dispatch.adapters.sdpa:SdpaBackend",
    "triton-decode": "attention_dispatch.adapters.triton_decode:TritonDecodeBackend",
}

Target = Union[str, type]


@dataclass
class _Entry:
    name: str
    target: Target
    source: str
    instance: Optional[Backend] = None
    error: Optional[str] = None


def _import_target(target: str) -> type:
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def _check_backend_class(name: str, cls: object) -> type:
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendRegistrationError(
            f"backend {name!r}: expected a subclass of attention_dispatch.Backend; got {cls!r}")
    if not hasattr(cls, "capabilities"):
        raise BackendRegistrationError(
            f"backend {name!r}: class {cls.__name__} declares no `capabilities`")
    return cls


class Registry:
    """Name -> backend.  Thread-safe; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {
            n: _Entry(n, t, "built-in") for n, t in BUILTINS.items()}
        self._plugins_loaded = False
        self._probes: dict[tuple[str, torch.device], list[str]] = {}
        self.plugin_errors: dict[str, str] = {}
        self.listeners: list[Callable[[], None]] = []

    def _changed(self) -> None:
        self._probes.clear()
        for fn in self.listeners:
            fn()

    def register(self, name: str, target: Target, *, replace: bool = False,
                 source: str = "register_backend") -> None:
        """Add a backend class (or "module:attr" path) under ``name``."""
        if not isinstance(name, str) or not name or name == "auto" or "," in name:
            raise BackendRegistrationError(
                f"backend name: expected a non-empty string other than 'auto', without ','; got {name!r}")
        if not isinstance(target, str):
            _check_backend_class(name, target)
        with self._lock:
            self._load_plugins()
            if name in self._entries and not replace:
                raise BackendRegistrationError(
                    f"backend {name!r} is already registered ({self._entries[name].source}); "
                    "pass replace=True to replace it")
            self._entries[name] = _Entry(name, target, source)
            self._changed()

    def unregister(self, name: str) -> None:
        with self._lock:
            self._load_plugins()
            if name not in self._entries:
                raise UnknownBackendError("name", name, list(self._entries))
            del self._entries[name]
            self._changed()

    def names(self) -> list[str]:
        with self._lock:
            self._load_plugins()
            return list(self._entries)

    def source(self, name: str) -> str:
        return self._entries[name].source

    def load(self, name: str) -> tuple[Optional[Backend], Optional[str]]:
        """(instance, None) or (None, why it could not be loaded)."""
        with self._lock:
            self._load_plugins()
            entry = self._entries.get(name)
            if entry is None:
                raise UnknownBackendError("backend", name, list(self._entries))
            if entry.instance is None and entry.error is None:
                self._instantiate(entry)
            return entry.instance, entry.error

    def _instantiate(self, entry: _Entry) -> None:
        try:
            cls = entry.target
            if isinstance(cls, str):
                cls = _import_target(cls)
            cls = _check_backend_class(entry.name, cls)
            inst = cls()
            inst.name = entry.name  # type: ignore[misc]  # the registered name wins
            entry.instance = inst
        except Exception as exc:  # a broken plugin must never break the others
            entry.error = f"failed to load ({entry.source}): {type(exc).__name__}: {exc}"
            if entry.source != "built-in":
                self.plugin_errors[entry.name] = entry.error
                warnings.warn(f"attention_dispatch: backend {entry.name!r} {entry.error}; skipped",
                              PluginWarning, stacklevel=4)

    def probe(self, name: str, device: torch.device) -> list[str]:
        """Cached reasons ``name`` cannot run on ``device`` (loading it if needed)."""
        key = (name, device)
        hit = self._probes.get(key)
        if hit is not None:
            return hit
        inst, err = self.load(name)
        if inst is None:
            reasons = [err or "not loaded"]
        else:
            try:
                reasons = list(inst.probe(device))
            except Exception as exc:
                reasons = [f"probe raised {type(exc).__name__}: {exc}"]
                if self._entries[name].source != "built-in":
                    warnings.warn(f"attention_dispatch: probe of backend {name!r} raised "
                                  f"{type(exc).__name__}: {exc}; skipped", PluginWarning, stacklevel=4)
        self._probes[key] = reasons
        return reasons

    def clear_probes(self) -> None:
        self._probes.clear()

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        if os.environ.get(PLUGINS_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
            return
        from importlib import metadata

        try:
            eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
        except Exception as exc:  # a corrupt installation must not break dispatch
            warnings.warn(f"attention_dispatch: reading entry points failed: {exc}", PluginWarning)
            return
        for ep in eps:
            dist = getattr(getattr(ep, "dist", None), "name", "?")
            if ep.name in self._entries:
                msg = (f"entry point {ep.value!r} of {dist} uses the name {ep.name!r}, already "
                       f"registered ({self._entries[ep.name].source}); ignored")
                self.plugin_errors[f"{ep.name} ({dist})"] = msg
                warnings.warn("attention_dispatch: " + msg, PluginWarning, stacklevel=4)
                continue
            self._entries[ep.name] = _Entry(ep.name, ep.value, f"entry point of {dist}")


REGISTRY = Registry()
register_cache("registry.probes", REGISTRY.clear_probes)


def register_backend(name: str, *, replace: bool = False) -> Callable[[type], type]:
    """Class decorator: register a :class:`Backend` subclass under ``name``.

    Example::

        @ad.register_backend("my-kernel")
        class MyKernel(ad.Backend):
            capabilities = ad.Capabilities(device_types=frozenset({"cpu"}), ...)
            def forward(self, q, k, v, *, spec, mask, key_padding_mask, dropout_p, scale): ...
    """
    def deco(cls: type) -> type:
        REGISTRY.register(name, cls, replace=replace)
        return cls

    return deco


def unregister_backend(name: str) -> None:
    """Remove a backend (built-in or plugin) from the registry."""
    REGISTRY.unregister(name)


def list_backends() -> list[str]:
    """Names of all registered backends, built-ins first, plugins included."""
    return REGISTRY.names()


def get_backend(name: str) -> Backend:
    """The backend instance registered under ``name``.

    Raises:
        UnknownBackendError: no such name.
        BackendRegistrationError: it is registered but failed to load.
    """
    inst, err = REGISTRY.load(name)
    if inst is None:
        raise BackendRegistrationError(f"backend {name!r} {err}")
    return inst
