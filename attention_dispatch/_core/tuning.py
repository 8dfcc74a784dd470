"""Tuning one call ahead of time (``attention-dispatch tune``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

from . import autotuning as _autotune
from .decide import decide, eligible
from .dispatch import forget_plans, timer
from .select import AUTO
from .spec import CallOptions, validate

Tensor = torch.Tensor


class TuneResult(NamedTuple):
    """What :func:`tune_call` found for one call."""

    ranked: str                     # the static ranking's choice
    chosen: str                     # the stored (fastest correct) choice
    times: dict[str, Optional[float]]  # ms per call; None: failed or incorrect; {}: not timed
    path: Optional[Path]            # the cache file written (None: nothing to tune)


def tune_call(q: Tensor, k: Tensor, v: Tensor, *,
              listener: Optional[_autotune.Listener] = None, **kwargs: Any) -> TuneResult:
    """Check and time every backend that accepts this call (the arguments of
    :func:`attention_dispatch.attention`, selection "auto"), store the fastest
    correct one for the call's bucket (replacing a stored decision) and return
    what was measured.  With a single eligible backend nothing is timed or stored.

    Raises:
        AttentionInputError / AttentionTypeError: bad arguments.
        BackendUnavailable: no backend accepts the call.
    """
    o = CallOptions(**kwargs)
    spec = validate(q, k, v, o)
    plan = decide(spec, AUTO, o.scale, o.dropout_p)
    names = eligible(spec, AUTO)
    if len(names) < 2:
        return TuneResult(plan.backend.name, plan.backend.name, {}, None)
    best = _autotune.choose(spec, names, timer(plan, q, k, v, o), retime=True,
                            listener=listener)
    entry = _autotune.load(spec.device)["decisions"].get(_autotune.bucket_key(spec), {})
    forget_plans()  # calls decided before take the new choice
    return TuneResult(plan.backend.name, best, dict(entry.get("ms", {})),
                      _autotune.cache_path(spec.device))
