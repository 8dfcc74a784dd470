"""Tuning one call ahead of time (``attention-dispatch tune``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

from . import _autotune
from ._dispatch import _decide, _eligible, _lock, _plans, _runner
from ._select import AUTO
from ._spec import validate

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
    spec = validate(q, k, v, **kwargs)
    plan = _decide(spec, AUTO, kwargs.get("scale"), kwargs.get("dropout_p", 0.0))
    eligible = _eligible(spec, AUTO)
    if len(eligible) < 2:
        return TuneResult(plan.backend.name, plan.backend.name, {}, None)
    args = (q, k, v, kwargs.get("mask"), kwargs.get("key_padding_mask"),
            kwargs.get("layout", "bhsd"), kwargs.get("alibi_slopes"))
    timer = _autotune.timer_for(spec, _runner(plan, args))
    best = _autotune.choose(spec, eligible, timer, retime=True, listener=listener)
    entry = _autotune.load(spec.device)["decisions"].get(_autotune.bucket_key(spec), {})
    with _lock:
        _plans.clear()  # calls decided before take the new choice
    return TuneResult(plan.backend.name, best, dict(entry.get("ms", {})),
                      _autotune.cache_path(spec.device))
