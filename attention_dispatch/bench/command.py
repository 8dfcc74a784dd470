"""The ``bench`` and ``rank`` subcommands."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from typing import Any, Optional

import torch

from .. import _autotune
from .._dispatch import attention, clear_cache, explain
from .._registry import list_backends
from .._select import normalize
from . import report
from .cases import DTYPES, MASKS, MODES, BenchCase, case_key, parse_shapes
from .run import Row, run


def add_parser(sub: Any) -> None:
    b = sub.add_parser("bench", help="time and check every backend on this machine")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--dtype", default="bf16", help="comma list of " + ",".join(DTYPES))
    b.add_argument("--shapes", default="default", help="quick, default, decode or B,H,S,D;...")
    b.add_argument("--kv-heads", type=int, default=0, help="GQA: kv heads for --shapes B,H,S,D")
    b.add_argument("--causal", default="both", choices=["both", "true", "false"])
    b.add_argument("--mask", default="none", help="comma list of " + ",".join(MASKS))
    b.add_argument("--mode", default="fwd", help="comma list of " + ",".join(MODES))
    b.add_argument("--backends", default=None, help="comma list (default: every registered)")
    b.add_argument("--quick", action="store_true", help="the quick preset (< 60 s on a CPU)")
    b.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    b.add_argument("--out", default="bench-results", help="folder for JSON, CSV and PNG")
    b.add_argument("--resume", action="store_true",
                   help="keep the rows of DIR/results.json and run only the missing cases")
    b.add_argument("--max-seconds", type=_seconds, default=0.0, metavar="S",
                   help="start no new case after S seconds (0: no limit); --resume continues")
    r = sub.add_parser("rank", help="print the auto ranking that bench results imply")
    r.add_argument("results", help="a results.json written by bench")
    t = sub.add_parser("tune", help="fill the autotune cache ahead of time")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--dtype", default="bf16")
    t.add_argument("--shapes", required=True, help="quick, default, decode or B,H,S,D;...")
    t.add_argument("--kv-heads", type=int, default=0)
    t.add_argument("--causal", default="both", choices=["both", "true", "false"])
    t.add_argument("--mask", default="none")
    t.add_argument("--mode", default="fwd")
    c = sub.add_parser("cache", help="show or clear the autotune cache")
    c.add_argument("action", choices=["show", "clear"])


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0; got {text!r}")
    return value


def _list(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"{flag}: expected values of {', '.join(allowed)}; got {', '.join(bad)}")
    return items


def _cases(a: argparse.Namespace, shapes: str) -> list[BenchCase]:
    causal = {"both": [False, True], "true": [True], "false": [False]}[a.causal]
    return parse_shapes(shapes, _list(a.dtype, tuple(DTYPES), "--dtype"), causal,
                        _list(a.mask, MASKS, "--mask"), _list(a.mode, MODES, "--mode"),
                        a.kv_heads, torch.device(a.device))


def _previous_rows(a: argparse.Namespace, env: dict[str, Any]) -> list[Row]:
    """With --resume, the rows of the results.json under --out (none without one)."""
    if not a.resume:
        return []
    data = report.load(a.out)
    if data is None:
        print(f"resume: no results.json under {a.out}; running every case")
        return []
    old = data.get("environment") or {}
    changed = [k for k in ("device", "device_name", "torch", "cuda", "flash_attn_4", "flash_attn",
                           "xformers", "attention_dispatch") if old.get(k) != env.get(k)]
    if changed:
        print(f"resume: the earlier rows come from a different {', '.join(changed)}",
              file=sys.stderr)
    return list(data["rows"])


def _state(cases: list[BenchCase], rows: list[Row]) -> dict[str, Any]:
    have = {case_key(r) for r in rows}
    return report.status(sum(case_key(c) in have for c in cases), len(cases))


def _resume_command(a: argparse.Namespace) -> str:
    """The command line that continues this run."""
    opts = [("--device", a.device), ("--dtype", a.dtype), ("--shapes", a.shapes),
            ("--kv-heads", str(a.kv_heads) if a.kv_heads else None), ("--causal", a.causal),
            ("--mask", a.mask), ("--mode", a.mode), ("--backends", a.backends), ("--out", a.out)]
    parts = ["attention-dispatch", "bench"] + [x for flag, v in opts if v for x in (flag, v)]
    parts += ["--quick"] * a.quick + ["--no-check"] * a.no_check + ["--resume"]
    if a.max_seconds:
        parts += ["--max-seconds", f"{a.max_seconds:g}"]
    return " ".join(shlex.quote(p) for p in parts)


def cmd_bench(a: argparse.Namespace) -> int:
    deadline: Optional[float] = time.monotonic() + a.max_seconds if a.max_seconds else None
    device = torch.device(a.device)
    cases = _cases(a, "quick" if a.quick else a.shapes)
    backends = list(normalize("--backends", a.backends)) if a.backends else list_backends()
    env = report.environment(device)
    rows = _previous_rows(a, env)
    done = {case_key(r) for r in rows}
    pending = [c for c in cases if case_key(c) not in done]
    if a.resume and rows:
        print(f"resume: {len(cases) - len(pending)}/{len(cases)} cases already in "
              f"{a.out}, {len(pending)} to run")

    def checkpoint(new: list[Row]) -> None:
        rows.extend(new)
        report.write(rows, a.out, env, _state(cases, rows), png=False)

    run(pending, [b for b in backends if b != "auto"], device, check=not a.no_check, meta=env,
        on_case=checkpoint, deadline=deadline)
    state = _state(cases, rows)
    print(report.table(rows))
    print(report.summary(rows))
    paths = report.write(rows, a.out, env, state)
    print("wrote " + ", ".join(paths.values()))
    if not state["complete"]:
        print(f"partial: {state['cases_done']}/{state['cases_total']} cases done, "
              f"{state['cases_total'] - state['cases_done']} remain (--max-seconds "
              f"{a.max_seconds:g}); continue with:\n  {_resume_command(a)}")
    return 0 if all(r.get("correct") is not False for r in rows) else 1


def cmd_rank(a: argparse.Namespace) -> int:
    with open(a.results) as f:
        data = json.load(f)
    order = report.ranking_from(data["rows"])
    env = data["environment"]
    print(f"# from {a.results}: {env['device_name']}, torch {env['torch']}, {env['date']}")
    print(json.dumps(order))
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    device = torch.device(a.device)
    _autotune.autotune(True)
    clear_cache()
    for case in _cases(a, a.shapes):
        kw = case.inputs(device, requires_grad=case.mode == "fwd+bwd")
        attention(**kw)
        print(f"{case.label()}: {explain(**kw).backend} (ranked) -> "
              f"{_autotune.load(device)['decisions'].get(_bucket(kw), {}).get('backend', '-')}")
    print(f"cache: {_autotune.cache_path(device)}")
    return 0


def _bucket(kw: dict[str, Any]) -> str:
    return _autotune.bucket_key(explain(**kw).spec)


def _show_quarantine(q: Any) -> None:
    """The quarantine entries written by verify mode."""
    entries = q.entries()
    if not entries:
        print(f"no quarantine entries ({q.path()})")
        return
    print(f"{q.path()}: {len(entries)} quarantine entries (auto avoids these)")
    for e in entries:
        sig = ",".join(f"{k}={v}" for k, v in sorted(e.get("signature", {}).items()))
        print(f"  {e.get('backend')} {e.get('backend_version')} on {e.get('device')}, torch "
              f"{e.get('torch')}: {sig}")


def cmd_cache(a: argparse.Namespace) -> int:
    from .. import _quarantine

    if a.action == "clear":
        for p in _autotune.clear() + _quarantine.clear():
            print(f"removed {p}")
        return 0
    _show_quarantine(_quarantine)
    files = sorted(_autotune.cache_dir().glob("autotune-*.json")) \
        if _autotune.cache_dir().is_dir() else []
    if not files:
        print(f"no autotune cache under {_autotune.cache_dir()}")
    for p in files:
        data = json.loads(p.read_text())
        print(f"{p}: {json.dumps(data.get('environment', {}), sort_keys=True)}")
        for bucket, entry in sorted(data.get("decisions", {}).items()):
            print(f"  {bucket}: {entry.get('backend')}")
    return 0
