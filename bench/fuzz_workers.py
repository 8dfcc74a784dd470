"""Worker processes for bench/gpu_fuzz.py: start N copies of the fuzzer on one
device (parallel kernel compiles), wait for them, merge their JSON reports into
one report of the same schema.  Used by ``gpu_fuzz.py --workers N``."""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass
class Worker:
    """One worker process: its files are ``base`` + .json / .log / .err."""

    index: int
    seed: int
    examples: int
    base: str
    proc: subprocess.Popen
    killed: bool = False


def worker_argv(a: argparse.Namespace, seed: int, examples: int, out: str) -> list[str]:
    argv = [sys.executable, a.script, "--workers", "1",
            "--seed", str(seed), "--examples", str(examples), "--out", out,
            "--device", a.device, "--dtypes", a.dtypes, "--grad-fraction", str(a.grad_fraction),
            "--max-seconds", str(a.max_seconds), "--backend-budget-s", str(a.backend_budget_s),
            "--every", a.every, "--max-violations-listed", str(a.max_violations_listed),
            "--shape-pool", str(a.shape_pool), "--paged-share", str(a.paged_share)]
    if a.backends:
        argv += ["--backends", a.backends]
    if a.fa4_cache_dir:
        argv += ["--fa4-cache-dir", a.fa4_cache_dir]
    return argv


def spawn(a: argparse.Namespace, n: int, workdir: str, workers: list[Worker]) -> None:
    """Start n workers into ``workers``: seeds seed * 1000 + i, examples split as evenly
    as possible.  Compiles run in parallel across the workers, not inside each one."""
    env = dict(os.environ)
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    for i in range(n):
        seed, share = a.seed * 1000 + i, a.examples // n + (i < a.examples % n)
        base = os.path.join(workdir, f"worker{i}")
        with open(base + ".log", "w") as out, open(base + ".err", "w") as err:
            proc = subprocess.Popen(worker_argv(a, seed, share, base + ".json"), env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        workers.append(Worker(i, seed, share, base, proc))


def wait_all(workers: list[Worker], limit_s: float) -> None:
    """Wait for every worker; kill those still running after ``limit_s`` (0: none)."""
    start = time.perf_counter()
    for w in workers:
        left = max(0.0, limit_s - (time.perf_counter() - start)) if limit_s else None
        try:
            w.proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
            w.killed = True


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return "(no stderr)"


def collect(workers: list[Worker]) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """(index, report) of the workers that wrote one, and a line per failed worker
    (exited without a report, or with a status other than 0 / 1 = violations)."""
    reports: list[tuple[int, dict[str, Any]]] = []
    failures: list[str] = []
    for w in workers:
        rc, report = w.proc.returncode, None
        try:
            with open(w.base + ".json") as f:
                report = json.load(f)
        except (OSError, ValueError):
            pass
        name = f"worker {w.index} (seed {w.seed})"
        if report is not None:
            reports.append((w.index, report))
            print(f"  {name}: {report['examples_run']} examples in {report['seconds']:.0f} s, "
                  f"{report['violations_total']} violations, exit status {rc}")
        if report is None or rc not in (0, 1):
            why = "killed at the time limit" if w.killed else f"exit status {rc}"
            failures.append(f"{name}: {why}" + ("" if report else ", no report")
                            + f"; stderr tail:\n{tail(w.base + '.err')}")
    return reports, failures


def sum_counts(tables: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Sum {name: {key: number}} tables key by key."""
    out: dict[str, dict[str, float]] = {}
    for table in tables:
        for name, row in table.items():
            acc = out.setdefault(name, {})
            for key, v in row.items():
                acc[key] = acc.get(key, 0) + v
    return out


def merge(a: argparse.Namespace, workers: list[Worker],
          reports: list[tuple[int, dict[str, Any]]], elapsed: float) -> dict[str, Any]:
    """One report with the schema of a process report from the workers' reports:
    counts, seconds and refusal reasons summed, violations concatenated (each with
    its worker; ``example`` counts within the worker).  ``seconds`` is wall time."""
    rs = [r for _, r in reports]
    first = rs[0]
    out = {k: first[k] for k in ("device", "device_name", "torch", "attention_dispatch",
                                 "versions")}
    out.update(seed=a.seed, examples_requested=a.examples,
               examples_run=sum(r["examples_run"] for r in rs),
               stopped_early=any(r["stopped_early"] for r in rs), seconds=round(elapsed, 2))
    out.update({k: first[k] for k in ("dtypes", "grad_fraction", "every", "backend_budget_s",
                                      "max_seconds")})
    backends = sum_counts([r["backends"] for r in rs])
    out["backends"] = {n: {k: round(v, 2) if k == "seconds" else v for k, v in c.items()}
                       for n, c in backends.items()}
    out["baseline_seconds"] = round(sum(r["baseline_seconds"] for r in rs), 2)
    out["unavailable"] = first["unavailable"]
    reasons = sum_counts([r["refusal_reasons"] for r in rs])
    out["refusal_reasons"] = {n: dict(collections.Counter(c).most_common(20))
                              for n, c in reasons.items()}
    out["violations_total"] = sum(r["violations_total"] for r in rs)
    out["violations"] = [dict(v, worker=i) for i, r in reports
                         for v in r["violations"]][:a.max_violations_listed]
    by_index = dict(reports)  # lists below are per worker, None for one without a report
    out.update(workers=len(workers), shape_pool=a.shape_pool, paged_share=a.paged_share,
               paged_examples=sum(r.get("paged_examples", 0) for r in rs),
               worker_seeds=[w.seed for w in workers],
               worker_examples_run=[by_index.get(w.index, {}).get("examples_run")
                                    for w in workers],
               worker_seconds=[by_index.get(w.index, {}).get("seconds") for w in workers])
    return out


def print_merged(report: dict[str, Any], print_summary: Callable[[dict[str, Any]], None]
                 ) -> None:
    print(f"device {report['device']} ({report['device_name']}), torch {report['torch']}")
    for n, why in report["unavailable"].items():
        print(f"  not available: {n}: {why}")
    print_summary(report)
    for v in report["violations"][:10]:
        print(f"VIOLATION worker {v['worker']} example {v['example']} {v['backend']}: "
              f"{v['failures']}", file=sys.stderr)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the finally that stops the workers


def run_workers(a: argparse.Namespace, print_summary: Callable[[dict[str, Any]], None],
                write_report: Callable[[dict[str, Any], Optional[str]], None]) -> int:
    """Fuzz in worker processes on the same device (``a.script`` run with
    --workers 1), then merge their reports."""
    n = min(a.workers, max(1, a.examples))
    workdir = tempfile.mkdtemp(prefix="gpu-fuzz-")
    print(f"{n} workers, seeds {a.seed * 1000}..{a.seed * 1000 + n - 1}, logs in {workdir}",
          flush=True)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    start = time.perf_counter()
    workers: list[Worker] = []
    try:  # a worker still running after its own --max-seconds plus slack is hung
        spawn(a, n, workdir, workers)
        wait_all(workers, a.max_seconds + 120 if a.max_seconds else 0)
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
    reports, failures = collect(workers)
    if reports:
        report = merge(a, workers, reports, time.perf_counter() - start)
        print_merged(report, print_summary)
    else:
        report = {"seed": a.seed, "examples_requested": a.examples, "examples_run": 0,
                  "violations_total": 0, "workers": n,
                  "worker_seeds": [w.seed for w in workers]}
    report["worker_failures"] = failures
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    write_report(report, a.out)
    if failures:
        print(f"worker logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failures or report["violations_total"] else 0
