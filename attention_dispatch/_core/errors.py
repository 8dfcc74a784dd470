"""Exception and warning types raised by attention_dispatch.

Every error that comes from bad input is an :class:`AttentionInputError`
(a ``ValueError``) or an :class:`AttentionTypeError` (also a ``TypeError``),
raised before any kernel runs.  The message states the argument, what was
expected, what came, and where possible how to fix it.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Optional, Sequence


class AttentionDispatchError(Exception):
    """Base class of every exception this package raises."""


class AttentionInputError(AttentionDispatchError, ValueError):
    """An argument has a bad value (shape, range, name).

    Attributes:
        argument: name of the offending argument, e.g. ``"key_padding_mask"``.
    """

    def __init__(self, argument: str, expected: str, got: str, fix: str = "") -> None:
        self.argument = argument
        self.expected = expected
        self.got = got
        msg = f"{argument}: expected {expected}; got {got}"
        if fix:
            msg += f". Fix: {fix}"
        super().__init__(msg)


class AttentionTypeError(AttentionInputError, TypeError):
    """An argument has the wrong type or dtype."""


class UnknownBackendError(AttentionInputError):
    """A backend name that is not registered."""

    def __init__(self, argument: str, name: str, known: Sequence[str]) -> None:
        self.name = name
        self.known = tuple(known)
        close = difflib.get_close_matches(name, list(known) + ["auto"], n=1)
        fix = f"did you mean {close[0]!r}?" if close else ""
        super().__init__(
            argument,
            "one of " + ", ".join(repr(n) for n in ["auto", *known]),
            repr(name),
            fix,
        )


class BackendUnavailable(AttentionDispatchError, RuntimeError):
    """No backend of the requested selection can run this call.

    Attributes:
        reasons: mapping backend name -> list of reasons it refused the call.
    """

    def __init__(self, selection: Sequence[str], reasons: dict[str, list[str]]) -> None:
        self.selection = tuple(selection)
        self.reasons = reasons
        lines = [f"no backend of {list(selection)} can run this call:"]
        for name, why in reasons.items():
            lines.append(f"  {name}: " + "; ".join(why))
        lines.append(
            "Fix: choose another backend, add 'auto' to the list, or change the call."
        )
        super().__init__("\n".join(lines))


class BackendRuntimeError(AttentionDispatchError, RuntimeError):
    """A forced backend raised while running; the original error is chained
    (``__cause__``).  Selections that include "auto" fall back instead."""

    def __init__(self, backend: str, selection: Sequence[str],
                 cause: Optional[BaseException] = None) -> None:
        self.backend = backend
        what = "see the chained exception above"
        if cause is not None:
            first = (str(cause).strip().splitlines() or [""])[0][:200]
            what = f"{type(cause).__name__}: {first}; traceback chained above"
        super().__init__(
            f"backend {backend!r} failed at run time and the selection {list(selection)} "
            f"has no 'auto' to fall back to ({what}). Fix: add 'auto' to the selection, "
            "or report the failure with `attention-dispatch info`.")


class BackendRegistrationError(AttentionDispatchError, ValueError):
    """Registering a backend failed (duplicate name, not a Backend subclass...)."""


class PluginWarning(UserWarning):
    """A plugin backend failed to import or register; it was skipped."""


class MemoryWarning(UserWarning):
    """The path auto chose materialises an O(Sq * Sk) buffer of 1 GiB or more
    (score matrix, expanded mask or bias).  Once per call signature and
    process; set ``max_extra_bytes`` (``ad.use_policy``) to refuse such paths
    instead, or filter this class to silence it."""


def join_names(names: Iterable[str]) -> str:
    """Render names as a comma separated list of repr()s."""
    return ", ".join(repr(n) for n in names)
