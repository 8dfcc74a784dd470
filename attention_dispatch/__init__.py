"""attention_dispatch: one attention call, the fastest correct kernel on the machine.

Importing this package does nothing else: no probing, no environment reads,
no torch flags changed.  Backends are imported on first use.
"""

from ._core import AttentionDispatchError
from ._core import AttentionInputError
from ._core import AttentionResult
from ._core import AttentionTypeError
from ._core import Backend
from ._core import BackendRegistrationError
from ._core import BackendRuntimeError
from ._core import BackendUnavailable
from ._core import BackendVerdict
from ._core import Buffer
from ._core import CallSpec
from ._core import Capabilities
from ._core import Decision
from ._core import Event
from ._core import FallbackWarning
from ._core import MemoryWarning
from ._core import PluginWarning
from ._core import UnknownBackendError
from ._core import WrongResultError
from ._core import attention
from ._core import autotune
from ._core import clear_cache
from ._core import clear_events
from ._core import events
from ._core import explain
from ._core import explain_spec
from ._core import get_backend
from ._core import list_backends
from ._core import register_backend
from ._core import register_ranking
from ._core import unregister_backend
from ._core import use_backend
from ._core import use_policy
from ._core import verify
from .structured.merge import merge_attention
from .structured.paged import attention_paged
from .structured.paged import explain_paged
from .structured.varlen import attention_varlen
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
    "Buffer",
    "CallSpec",
    "Capabilities",
    "Decision",
    "Event",
    "FallbackWarning",
    "MemoryWarning",
    "PluginWarning",
    "UnknownBackendError",
    "WrongResultError",
    "__version__",
    "attention",
    "attention_paged",
    "attention_varlen",
    "autotune",
    "clear_cache",
    "clear_events",
    "events",
    "explain",
    "explain_paged",
    "explain_spec",
    "get_backend",
    "list_backends",
    "merge_attention",
    "patch_sdpa",
    "register_backend",
    "register_ranking",
    "scaled_dot_product_attention",
    "unregister_backend",
    "use_backend",
    "use_policy",
    "verify",
]
