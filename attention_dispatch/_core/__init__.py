"""The dispatch core: from a call's arguments to one kernel call.

The layers above it (the public package, ``structured``, ``distributed``,
``testing``, ``bench``, the CLI and ``integrations``) use the names listed in
``__all__`` here and nothing else of the core; the core imports none of them.
Adapters (``attention_dispatch.adapters``) are loaded by name through the
registry.  See docs/architecture.md.

Modules, bottom to top: errors, caches, eventlog, layout, spec (``CallSpec``,
``CallOptions``, validation), capabilities, backend, registry, select,
ranking, decision, masks, packing, reference, timing, reliability, verification,
quarantine, autotuning, selfcheck, compile, policy, decide, dispatch, varlen, paged,
tuning.
"""

from .autotuning import autotune, isolated_cache
from .backend import AttentionResult, Backend
from .caches import clear_all, register_cache, registered
from .capabilities import Capabilities
from .layout import Buffer
from .decide import candidates, eligible, explain_spec, reasons
from .decision import BackendVerdict, Decision
from .dispatch import attention, call, clear_cache
from .explainer import explain, explain_options
from .errors import (AttentionDispatchError, AttentionInputError, AttentionTypeError,
                     BackendRegistrationError, BackendRuntimeError, BackendUnavailable,
                     PluginWarning, UnknownBackendError)
from .eventlog import Event, clear_events, events
from .masks import apply_sinks
from .paged import explain_paged_options, gather_dense, paged_call
from .errors import MemoryWarning
from .policy import effective as effective_policy, parse_bytes, use_policy
from .ranking import register_ranking, ranked
from .reference import ATOL, atol, reference_attention, within_rule
from .registry import REGISTRY, get_backend, list_backends, register_backend, unregister_backend
from .reliability import FallbackWarning
from .select import AUTO, BackendArg, normalize, resolve, selection_of, use_backend
from .spec import CallOptions, CallSpec, validate
from .timing import time_interleaved
from .tuning import TuneResult, tune_call
from .varlen import varlen_call
from .verification import WrongResultError, verify

__all__ = [
    "ATOL", "AUTO", "AttentionDispatchError", "AttentionInputError", "AttentionResult",
    "AttentionTypeError", "Backend", "BackendArg", "BackendRegistrationError",
    "BackendRuntimeError", "BackendUnavailable", "BackendVerdict", "Buffer", "CallOptions",
    "CallSpec", "Capabilities", "Decision", "Event", "FallbackWarning", "MemoryWarning",
    "PluginWarning", "REGISTRY", "TuneResult", "UnknownBackendError", "WrongResultError",
    "apply_sinks", "atol", "attention", "autotune", "call", "candidates", "clear_all",
    "clear_cache", "clear_events", "eligible", "events", "explain", "explain_options",
    "explain_paged_options", "explain_spec", "gather_dense", "get_backend", "isolated_cache",
    "list_backends", "normalize", "paged_call", "ranked", "reasons", "reference_attention",
    "register_backend", "register_cache", "register_ranking", "registered", "resolve",
    "selection_of", "time_interleaved", "use_policy", "effective_policy", "parse_bytes", "tune_call", "unregister_backend", "use_backend",
    "validate", "varlen_call", "verify", "within_rule",
]
