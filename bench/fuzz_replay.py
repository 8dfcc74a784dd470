"""Replay the violations of a bench/gpu_fuzz.py report, one at a time, in one process.

For every listed violation (dense, or paged: ``"kind": "paged"``): rebuild the
example from its spec (same seed, so the same tensors), run the float64
reference, ``math`` and the backend, and print the backend's full traceback or
its errors against the bound.  Each
replay says whether the violation reproduces alone (without the other
backends and worker processes of the fuzz run).  Usage::

    python bench/fuzz_replay.py fuzz.json [--backend flex] [--limit 20] [--out replay.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_fuzz as fz  # noqa: E402  (sets the canary off before torch loads)
import gpu_fuzz_paged as fzp  # noqa: E402

import torch  # noqa: E402


def spec_of(d: dict[str, Any]) -> "fz.Spec":
    fields = dict(d)
    for key in ("mask_shape", "dead_rows", "window"):
        if isinstance(fields.get(key), list):
            fields[key] = tuple(fields[key])
    if isinstance(fields.get("memory"), dict):  # the drawn memory layout
        mem = {k: tuple(v) if isinstance(v, list) else v for k, v in fields["memory"].items()}
        fields["memory"] = fz.MemoryDraw(**mem)
    return fz.Spec(**fields)


def replay(backend: str, spec: "fz.Spec", device: torch.device) -> dict[str, Any]:
    """{"reproduced": bool, "detail": str} for one example on one backend."""
    inp = fz.build(spec, device)
    ref = fz.reference(spec, inp)
    base = fz.run("math", spec, inp)
    try:
        got = fz.run(backend, spec, inp)
    except fz.ad.BackendUnavailable as exc:
        return {"reproduced": False, "detail": "refused now: " + str(exc).splitlines()[0]}
    except Exception:  # the full chain, for the report
        return {"reproduced": True, "detail": traceback.format_exc(limit=8)[-3000:]}
    per = [("math", fz.errors(base, ref)), (backend, fz.errors(got, ref))]
    viol = fz.judge(spec, ref, per, {})
    if backend in viol:
        return {"reproduced": True, "detail": json.dumps(viol[backend])}
    return {"reproduced": False, "detail": "within the bound when run alone"}


def replay_paged(backend: str, spec: "fzp.PagedSpec", device: torch.device) -> dict[str, Any]:
    """``replay`` for a paged example (``"kind": "paged"`` in the report)."""
    plain = fzp.build(spec, device)
    inp = fzp.with_views(plain, spec.views)
    ref = fzp.reference(spec, plain)
    errs = fz.errors(fzp.run("math", spec, inp), ref)
    if backend == "math":
        bad = fzp.math_check(spec, ref, errs)
        return {"reproduced": bool(bad), "detail": json.dumps(bad) if bad else "within"}
    how, why = fzp.route(backend, spec, inp)
    if how is None:
        return {"reproduced": False, "detail": "refused now: " + "; ".join(why)}
    if how == "native" and fz.ad.get_backend(backend).paged_reads_tail:
        inp = fzp.with_views(fzp.finite_tail(plain, spec.seed), spec.views)
    try:
        got = fzp.run(backend, spec, inp)
    except Exception:
        return {"reproduced": True, "detail": traceback.format_exc(limit=8)[-3000:]}
    viol = fz.judge(spec, ref, [("math", errs), (backend, fz.errors(got, ref))], {})
    if backend in viol:
        return {"reproduced": True, "detail": json.dumps(viol[backend])}
    return {"reproduced": False, "detail": f"within the bound when run alone ({how})"}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", help="a JSON report written by bench/gpu_fuzz.py")
    p.add_argument("--backend", default=None, help="only this backend's violations")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    with open(a.report) as f:
        listed = json.load(f).get("violations", [])
    todo = [v for v in listed if a.backend in (None, v["backend"])][: a.limit]
    device = torch.device(a.device)
    results = []
    for v in todo:
        if v.get("kind") == "paged":
            res = replay_paged(v["backend"], fzp.spec_of(v["spec"]), device)
        else:
            res = replay(v["backend"], spec_of(v["spec"]), device)
        results.append({**v, "replay": res})
        print(f"--- {v['backend']} {v['spec']}\n    reproduced alone: {res['reproduced']}\n"
              + "\n".join("    " + line for line in res["detail"].splitlines()))
    print(f"{sum(r['replay']['reproduced'] for r in results)}/{len(results)} reproduced alone")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
