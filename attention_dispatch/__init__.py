"""attention_dispatch: one attention call, the fastest correct kernel on the machine.

Importing this package does nothing else: no probing, no environment reads,
no torch flags changed.  Backends are imported on first use.
"""

from ._autotune import autotune
from ._backend import AttentionResult
from ._backend import Backend
from ._capabilities import Capabilities
from ._decision import BackendVerdict
from ._decision import Decision
from ._dispatch import attention
from ._dispatch import clear_cache
from ._dispatch import explain
from ._dispatch import explain_spec
from ._errors import AttentionDispatchError
from ._errors import AttentionInputError
from ._errors import AttentionTypeError
from ._errors import BackendRegistrationError
from ._errors import BackendRuntimeError
from ._errors import BackendUnavailable
from ._errors import PluginWarning
from ._errors import UnknownBackendError
from ._events import Event
from ._events import clear_events
from ._events import events
from ._merge import merge_attention
from ._registry import get_backend
from ._registry import list_backends
from ._registry import register_backend
from ._registry import unregister_backend
from ._reliability import FallbackWarning
from ._select import use_backend
from ._spec import CallSpec
from ._varlen import attention_varlen
from ._verify import WrongResultError
from ._verify import verify
from .attend import Attend
from .sdpa import patch_sdpa
from .sdpa import scaled_dot_product_attention

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``attention_dispatch.distributed`` (ring attention), imported on first use."""
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Attend",
    "AttentionDispatchError",
    "AttentionInputError",
    "AttentionResult",
    "AttentionTypeError",
    "Backend",
    "BackendRegistrationError",
    "BackendRuntimeError",
    "BackendUnavailable",
    "BackendVerdict",
    "CallSpec",
    "Capabilities",
    "Decision",
    "Event",
    "FallbackWarning",
    "PluginWarning",
    "UnknownBackendError",
    "WrongResultError",
    "__version__",
    "attention",
    "attention_varlen",
    "autotune",
    "clear_cache",
    "clear_events",
    "events",
    "explain",
    "explain_spec",
    "get_backend",
    "list_backends",
    "merge_attention",
    "patch_sdpa",
    "register_backend",
    "scaled_dot_product_attention",
    "unregister_backend",
    "use_backend",
    "verify",
]
