"""The ``bench``, ``rank``, ``tune`` and ``cache`` subcommands."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Any, Optional

import torch

from .._core import clear_cache, get_backend, list_backends, normalize
from .._core import autotuning as _autotune
from .._cli.args import (CommandError, default_dtype, device_arg, float_arg, int_arg, list_arg,
    shapes_arg)
from . import report
from .cases import DTYPES, MASKS, MODES, BenchCase, case_key, parse_shapes
from .run import Row, run

BENCH_EPILOG = """examples:
  attention-dispatch bench --quick                  # a small grid (2-core CPU, cold: ~20 s)
  attention-dispatch bench --quick --include-compiling   # CPU: flex too (+4-12 s per case, cold)
  attention-dispatch bench --device cuda --out results --max-seconds 540
  attention-dispatch bench --device cuda --out results --max-seconds 540 --resume
  attention-dispatch bench --shapes "4,16,2048,64;1,16,8192,128" --causal true --mode fwd,fwd+bwd

On the CPU, --quick leaves out backends that compile a kernel per shape (flex) unless
--include-compiling is given or --backends names them.
Stored tuning decisions do not apply here: bench uses a temporary, empty autotune cache
(ATTENTION_DISPATCH_AUTOTUNE=1 makes auto time each case's backends afresh)."""

RANK_EPILOG = """example:
  attention-dispatch rank bench-results/results.json"""

TUNE_EPILOG = """examples:
  attention-dispatch tune --shapes "1,16,4096,128"                    # cpu: fp32
  attention-dispatch tune --device cuda --dtype bf16 --shapes "1,16,8192,128;8,32,2048,64"

The choices are stored in the autotune cache (attention-dispatch cache show) and used by
attention() and explain by default; ATTENTION_DISPATCH_AUTOTUNE=0 ignores them."""

CACHE_EPILOG = """examples:
  attention-dispatch cache show
  attention-dispatch cache clear"""


def _common(p: argparse.ArgumentParser, shapes_help: str, shapes_required: bool) -> None:
    """Options bench and tune share."""
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda or cuda:N (default: cuda where torch sees one, else cpu)")
    p.add_argument("--dtype", type=list_arg(tuple(DTYPES)), default=None,
                   help="comma list of " + ",".join(DTYPES) + " (default: bf16 on cuda, fp32 on "
                   "cpu; the quick and default presets set their own)")
    p.add_argument("--shapes", type=shapes_arg, help=shapes_help, required=shapes_required,
                   default=None if shapes_required else "default")
    p.add_argument("--kv-heads", type=int_arg(0), default=0, metavar="N",
                   help="GQA: kv heads for --shapes B,H,S,D (0: as many as query heads)")
    p.add_argument("--causal", default="both", choices=["both", "true", "false"],
                   help="causal, non-causal or both (default: both)")
    p.add_argument("--mask", type=list_arg(MASKS), default="none",
                   help="comma list of " + ",".join(MASKS) + " (default: none)")
    p.add_argument("--mode", type=list_arg(MODES), default="fwd",
                   help="comma list of " + ",".join(MODES) + " (default: fwd)")


def add_parser(sub: Any) -> None:
    """The bench, rank, tune and cache subparsers."""
    b = sub.add_parser("bench", help="time and check every backend on this machine",
                       description="Correctness, time, TFLOP/s, memory and first-call latency "
                       "of every backend and auto, per case; JSON, CSV and PNG under --out.",
                       epilog=BENCH_EPILOG)
    _common(b, "quick, default, decode or B,H,S,D;... (default: default)", False)
    b.add_argument("--backends", default=None, metavar="A,B,...",
                   help="comma list of backends (default: every registered one)")
    b.add_argument("--quick", action="store_true",
                   help="the quick preset (overrides --shapes; CPU: 8 fp32 cases)")
    b.add_argument("--include-compiling", action="store_true",
                   help="CPU --quick: also time backends that compile a kernel per shape "
                   "(flex: seconds per case on a cold cache); left out otherwise")
    b.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    b.add_argument("--out", default="bench-results", metavar="DIR",
                   help="folder for results.json, .csv and .png (default: bench-results)")
    b.add_argument("--resume", action="store_true",
                   help="keep the rows of DIR/results.json and run only the missing cases")
    b.add_argument("--max-seconds", type=float_arg(0.0, float("inf"), "seconds >= 0"),
                   default=0.0, metavar="S",
                   help="start no new case after S seconds (0: no limit); --resume continues")
    r = sub.add_parser("rank", help="print the auto ranking that bench results imply",
                       description="Backends ordered by their geometric-mean speed relative "
                       "to the fastest backend of each case.", epilog=RANK_EPILOG)
    r.add_argument("results", metavar="RESULTS_JSON", help="a results.json written by bench")
    t = sub.add_parser("tune", help="time the backends for given shapes and store the fastest",
                       description="For each case: check and time every backend that accepts "
                       "it, store the fastest correct one for its shape bucket (replacing a "
                       "stored one), and print the times.", epilog=TUNE_EPILOG)
    _common(t, "shapes to tune: quick, default, decode or B,H,S,D;... (required)", True)
    c = sub.add_parser("cache", help="show or clear the stored tuning decisions",
                       description="The autotune cache: one JSON file per environment "
                       "(device, driver, torch and kernel versions).", epilog=CACHE_EPILOG)
    c.add_argument("action", choices=["show", "clear"],
                   help="show: list the files and their decisions; clear: delete them")


def _cases(a: argparse.Namespace, shapes: str) -> list[BenchCase]:
    """The cases of the options (--kv-heads must divide every H of --shapes)."""
    causal = {"both": [False, True], "true": [True], "false": [False]}[a.causal]
    cases = parse_shapes(shapes, a.dtype.split(","), causal, a.mask.split(","),
                         a.mode.split(","), a.kv_heads, a.device)
    bad = sorted({c.heads_q for c in cases if c.heads_q % c.heads_kv})
    if bad:
        raise CommandError(f"attention-dispatch {a.command}: error: argument --kv-heads: "
                           f"expected a divisor of every H in --shapes; got {a.kv_heads} "
                           f"(H={', '.join(map(str, bad))})")
    return cases


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
    opts = [("--device", str(a.device)), ("--dtype", a.dtype), ("--shapes", a.shapes),
            ("--kv-heads", str(a.kv_heads) if a.kv_heads else None), ("--causal", a.causal),
            ("--mask", a.mask), ("--mode", a.mode), ("--backends", a.backends), ("--out", a.out)]
    parts = ["attention-dispatch", "bench"] + [x for flag, v in opts if v for x in (flag, v)]
    parts += ["--quick"] * a.quick + ["--include-compiling"] * a.include_compiling
    parts += ["--no-check"] * a.no_check + ["--resume"]
    if a.max_seconds:
        parts += ["--max-seconds", f"{a.max_seconds:g}"]
    return " ".join(shlex.quote(p) for p in parts)


def _compiles_per_shape(name: str) -> bool:
    try:
        return bool(get_backend(name).compiles_per_shape)
    except Exception:  # a backend that fails to load is reported by the run itself
        return False


def _left_out(a: argparse.Namespace, backends: list[str]) -> list[str]:
    """Backends the CPU quick grid leaves out: those that compile a kernel per
    shape, unless --include-compiling or --backends asks for them."""
    if not a.quick or a.device.type != "cpu" or a.backends or a.include_compiling:
        return []
    return [b for b in backends if _compiles_per_shape(b)]


def cmd_bench(a: argparse.Namespace) -> int:
    """Run the grid in a temporary autotune cache (stored decisions neither
    apply nor change); 130 when interrupted (the finished cases are kept)."""
    deadline: Optional[float] = time.monotonic() + a.max_seconds if a.max_seconds else None
    a.dtype = a.dtype or default_dtype(a.device)
    cases = _cases(a, "quick" if a.quick else a.shapes)
    backends = list(normalize("--backends", a.backends)) if a.backends else list_backends()
    left_out = _left_out(a, backends)
    backends = [b for b in backends if b not in left_out]
    try:
        os.makedirs(a.out, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"attention-dispatch bench: error: argument --out: cannot create "
                           f"{a.out}: {exc.strerror or exc}") from None
    env = report.environment(a.device)
    if left_out:
        env["left_out"] = left_out
        print(f"quick grid on the CPU: leaving out {', '.join(left_out)} (compiles a kernel per "
              "shape: seconds per case on a cold cache); --include-compiling times it")
    rows = _previous_rows(a, env)
    done = {case_key(r) for r in rows}
    pending = [c for c in cases if case_key(c) not in done]
    if a.resume and rows:
        print(f"resume: {len(cases) - len(pending)}/{len(cases)} cases already in "
              f"{a.out}, {len(pending)} to run")

    def checkpoint(new: list[Row]) -> None:
        rows.extend(new)
        report.write(rows, a.out, env, _state(cases, rows), png=False)

    with _autotune.isolated_cache():
        clear_cache()
        try:
            run(pending, [b for b in backends if b != "auto"], a.device, check=not a.no_check,
                meta=env, on_case=checkpoint, deadline=deadline)
        except KeyboardInterrupt:
            state = _state(cases, rows)
            print(f"interrupted: {state['cases_done']}/{state['cases_total']} cases in "
                  f"{a.out}; continue with:\n  {_resume_command(a)}", file=sys.stderr)
            return 130
        finally:
            clear_cache()
    return _finish(a, cases, rows, env)


def _finish(a: argparse.Namespace, cases: list[BenchCase], rows: list[Row],
            env: dict[str, Any]) -> int:
    """Table, summary, files; the command that continues a partial run."""
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
    try:
        with open(a.results) as f:
            data = json.load(f)
        order = report.ranking_from(data["rows"])
        env = data["environment"]
        head = f"# from {a.results}: {env['device_name']}, torch {env['torch']}, {env['date']}"
    except OSError as exc:
        raise CommandError(f"attention-dispatch rank: error: cannot read {a.results}: "
                           f"{exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CommandError(f"attention-dispatch rank: error: {a.results} is not a results.json "
                           f"written by bench ({type(exc).__name__}: {exc})") from None
    print(head)
    print(json.dumps(order))
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    from .tune import tune_cases

    a.dtype = a.dtype or default_dtype(a.device)
    return tune_cases(_cases(a, a.shapes), a.device)


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
    from .._core import quarantine as _quarantine

    folder = _autotune.cache_dir()
    if a.action == "clear":
        files = sorted(folder.glob("autotune-*.json")) if folder.is_dir() else []
        count = sum(_decision_count(p) for p in files)
        removed = _autotune.clear()
        quarantined = len(_quarantine.entries())
        removed_q = _quarantine.clear()
        clear_cache()
        for p in removed + removed_q:
            print(f"removed {p}")
        print(f"cleared {count} stored decision(s) in {len(removed)} file(s) under {folder}"
              if removed else f"nothing to clear: no autotune cache files under {folder}")
        if removed_q:
            print(f"cleared {quarantined} quarantine entr{'y' if quarantined == 1 else 'ies'}")
        return 0
    _show_quarantine(_quarantine)
    files = sorted(folder.glob("autotune-*.json")) if folder.is_dir() else []
    if not files:
        print(f"no autotune cache under {folder}")
    here = {_autotune.cache_path(torch.device(t)) for t in ("cpu", "cuda")
            if t == "cpu" or torch.cuda.is_available()}
    for p in files:
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            print(f"{p}: unreadable ({exc})")
            continue
        mark = " (this machine)" if p in here else ""
        print(f"{p}{mark}: {json.dumps(data.get('environment', {}), sort_keys=True)}")
        for bucket, entry in sorted(data.get("decisions", {}).items()):
            print(f"  {bucket}: {entry.get('backend')}")
    return 0


def _decision_count(path: Any) -> int:
    try:
        return len(json.loads(path.read_text()).get("decisions", {}))
    except (OSError, ValueError, AttributeError):
        return 0
