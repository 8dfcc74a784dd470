"""`attention-dispatch bench --quick`, rank, tune and the autotune cache (CPU)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch._core import autotuning as _autotune, dispatch as _dispatch
from attention_dispatch.bench import progress, report
from attention_dispatch.bench import run as bench_run
from attention_dispatch.bench.cases import BenchCase
from attention_dispatch.cli import main


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    # every backend but flex, which --quick leaves out on the CPU (a compile per case)
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    return out


def _flex_on_cpu() -> bool:
    return not ad.get_backend("flex").probe(torch.device("cpu"))


def test_quick_on_the_cpu_leaves_out_compiling_backends(quick: Path) -> None:
    data = json.loads((quick / "results.json").read_text())
    if _flex_on_cpu():
        assert data["environment"]["left_out"] == ["flex"]
    assert "flex" not in {r["backend"] for r in data["rows"]}
    assert {r["chosen"] for r in data["rows"] if r["backend"] == "auto"} == {"sdpa-flash"}


@pytest.mark.parametrize("device, argv, left_out", [
    ("cpu", ["--quick"], ["flex"]),
    ("cpu", ["--quick", "--include-compiling"], []),
    ("cpu", ["--quick", "--backends", "math,flex"], []),
    ("cpu", ["--shapes", "1,2,64,16"], []),
    ("cuda", ["--quick"], []),
])
def test_which_backends_the_quick_grid_leaves_out(device: str, argv: list[str],
                                                  left_out: list[str]) -> None:
    from attention_dispatch.bench import command
    from attention_dispatch.cli import build_parser

    a = build_parser().parse_args(["bench", "--device", "cpu"] + argv)
    a.device = torch.device(device)
    expected = left_out if _flex_on_cpu() else []
    assert command._left_out(a, ad.list_backends()) == expected
    resume = command._resume_command(a)
    assert ("--include-compiling" in resume) == ("--include-compiling" in argv)


def test_quick_writes_json_csv_png(quick: Path) -> None:
    data = json.loads((quick / "results.json").read_text())
    rows = data["rows"]
    assert rows and data["environment"]["device"] == "cpu" and data["environment"]["date"]
    ours = [r for r in rows if r["backend"] != "torch-default"]
    assert all(r["correct"] for r in ours), [r for r in ours if not r["correct"]]
    assert all("auto_over_best" in r and "auto_over_torch" in r for r in rows)
    assert {r["backend"] for r in rows} >= {"auto", "math", "sdpa-flash", "torch-default"}
    # torch's default call is timed in every case beside auto (never part of "best")
    cases = {r["case"] for r in rows}
    torch_rows = {r["case"]: r for r in rows if r["backend"] == "torch-default"}
    assert set(torch_rows) == cases
    for r in ours:
        assert r["auto_over_torch"] == pytest.approx(torch_rows[r["case"]]["ms"]
                                                     / next(a["ms"] for a in ours if a["case"]
                                                            == r["case"] and a["backend"]
                                                            == "auto"), rel=1e-3)
    for r in rows:
        assert r["ms"] > 0 and r["tflops"] > 0 and r["first_call_ms"] > 0
    for auto in (r for r in rows if r["backend"] == "auto"):  # best / auto's choice, own row
        same = [r for r in ours if r["case"] == auto["case"] and r["backend"] != "auto"]
        chosen = next(r for r in same if r["backend"] == auto["chosen"])
        assert auto["choice_over_best"] == pytest.approx(
            min(r["ms"] for r in same) / chosen["ms"], rel=1e-3)
    assert "auto's choice within 3 % of the best in " in report.summary(rows)
    with open(quick / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (quick / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_rank_from_results(quick: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rank", str(quick / "results.json")]) == 0
    order = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(order) >= {"math", "sdpa-flash"} and "torch-default" not in order


@pytest.mark.parametrize("case", [
    BenchCase(2, 4, 2, 3, 9, 16, "fp32", True, "none", "fwd"),
    BenchCase(2, 4, 4, 5, 5, 16, "fp32", True, "padding", "fwd"),
    BenchCase(2, 2, 2, 4, 7, 8, "fp32", True, "bool", "fwd"),
    BenchCase(2, 4, 2, 1, 9, 16, "fp32", True, "none", "fwd"),
])
def test_torch_default_call_is_the_equivalent_call(case: BenchCase) -> None:
    kw = case.inputs(torch.device("cpu"), requires_grad=False)
    fn = bench_run.torch_default_call(case, kw)
    assert fn is not None
    ref, _ = ad.testing.reference_attention(
        kw["q"], kw["k"], kw["v"], mask=kw.get("mask"), causal=case.causal,
        key_padding_mask=kw.get("key_padding_mask"))
    assert (fn() - ref).abs().max().item() < 1e-4


def test_flops_formula() -> None:
    c = BenchCase(2, 4, 4, 128, 256, 64, "fp32", False, "none", "fwd")
    assert c.flops == 4 * 2 * 4 * 128 * 256 * 64
    assert BenchCase(2, 4, 4, 128, 256, 64, causal=True).flops == c.flops / 2
    assert BenchCase(2, 4, 4, 128, 256, 64, mode="fwd+bwd").flops == 2.5 * c.flops


@pytest.fixture()
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty autotune cache folder of its own: ``cache_home / "attention-dispatch"``."""
    monkeypatch.setenv("ATTENTION_DISPATCH_CACHE_DIR", str(tmp_path / "attention-dispatch"))
    ad.clear_cache()
    yield tmp_path
    _autotune.autotune(None)
    _autotune.clear()
    ad.clear_cache()


def test_autotune_fills_and_reuses_cache(cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ad.autotune(True)
    ad.clear_cache()
    q = torch.randn(1, 2, 64, 32)
    out = ad.attention(q, q, q, causal=True)
    files = list((cache_home / "attention-dispatch").glob("autotune-*.json"))
    assert len(files) == 1
    decisions = json.loads(files[0].read_text())["decisions"]
    (entry,) = decisions.values()
    assert entry["backend"] in ad.list_backends() and "math" in entry["ms"]
    # a new process state: decisions come from the file, nothing is timed again
    ad.clear_cache()
    monkeypatch.setattr(bench_run, "time_interleaved", lambda *a, **k: pytest.fail("re-timed"))
    out2 = ad.attention(q, q, q, causal=True)
    torch.testing.assert_close(out, out2)


def test_autotune_env_var(cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _autotune.mode() == "stored" and not _autotune.enabled()  # the default
    monkeypatch.setenv("ATTENTION_DISPATCH_AUTOTUNE", "1")
    assert _autotune.mode() == "stored"  # read once: clear_cache() re-reads it
    ad.clear_cache()
    assert _autotune.mode() == "on" and _autotune.enabled()
    monkeypatch.setenv("ATTENTION_DISPATCH_AUTOTUNE", "0")
    ad.clear_cache()
    assert _autotune.mode() == "off"
    ad.autotune("stored")  # the function overrides the variable
    assert _autotune.mode() == "stored"
    ad.autotune(None)
    monkeypatch.setenv("ATTENTION_DISPATCH_AUTOTUNE", "sometimes")
    ad.clear_cache()
    with pytest.raises(ad.AttentionInputError, match="ATTENTION_DISPATCH_AUTOTUNE"):
        _autotune.mode()
    with pytest.raises(ad.AttentionInputError, match="autotune"):
        ad.autotune("maybe")


def test_tune_and_cache_commands(cache_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "--device", "cpu", "--shapes", "1,2,128,32", "--causal", "false"]) == 0
    out = capsys.readouterr().out
    assert "[1/1] fp32 B1 H2 q128 k128 d32 fwd" in out  # fp32: the CPU's default dtype
    assert "(ranked) ->" not in out
    for name in ("math", "sdpa-flash"):  # every eligible backend, as it is timed
        assert re.search(rf"^  {name} +[0-9.e+-]+ ms per call", out, re.M), out
    stored = re.search(r"^  stored: (\S+)", out, re.M).group(1).rstrip(",")
    path = _autotune.cache_path(torch.device("cpu"))
    assert f"stored in {path}" in out and "ATTENTION_DISPATCH_AUTOTUNE=0" in out
    entry = json.loads(path.read_text())["decisions"]["float32|1|2|2|128|128|32|32|bhsd|none|"
                                                      "False|False|False|False|False"]
    assert entry["backend"] == stored and set(entry["ms"]) >= {"math", "sdpa-flash"}
    assert main(["cache", "show"]) == 0
    shown = capsys.readouterr().out
    assert "float32|1|2|2|128|128|32|32" in shown and "(this machine)" in shown
    assert main(["cache", "clear"]) == 0
    out = capsys.readouterr().out
    assert f"removed {path}" in out and "cleared 1 stored decision(s) in 1 file(s)" in out
    assert not list((cache_home / "attention-dispatch").glob("autotune-*.json"))
    assert main(["cache", "clear"]) == 0
    assert "nothing to clear: no autotune cache files under" in capsys.readouterr().out


def _other_backend(q: torch.Tensor) -> tuple[str, str, ad.CallSpec]:
    """(the ranking's choice, another eligible backend, the spec) for attention(q, q, q)."""
    d = ad.explain(q, q, q)
    others = [v.name for v in d.verdicts
              if v.name != d.backend and not v.reasons and v.rank is not None]
    assert "math" in others  # nothing to compile (flex would take seconds)
    return d.backend, "math", d.spec


def test_stored_decisions_apply_by_default(cache_home: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A decision stored by tune (here: written directly) applies to attention()
    and explain without any variable; ATTENTION_DISPATCH_AUTOTUNE=0 ignores it."""
    q = torch.randn(1, 2, 64, 32)
    static, other, spec = _other_backend(q)
    monkeypatch.setattr(bench_run, "time_interleaved", lambda *a, **k: pytest.fail("timed"))
    _autotune.store(spec.device, _autotune.bucket_key(spec), {"backend": other, "ms": {}})
    ad.clear_cache()
    d = ad.explain(q, q, q)
    assert (d.backend, d.tuned, d.ranked, d.source) == (other, True, static, "default+tuned")
    assert f"chosen: {other} (tuned: the stored tuning decision" in str(d)
    assert f"the ranking alone picks {static}" in str(d)
    ad.attention(q, q, q)
    plans = {p.backend.name for p in _dispatch._plans.values()}
    assert plans == {other}
    assert main(["explain", "--shape", "1,2,64,32"]) == 0
    assert f"chosen: {other} (tuned" in capsys.readouterr().out
    # the documented opt-out
    monkeypatch.setenv("ATTENTION_DISPATCH_AUTOTUNE", "0")
    ad.clear_cache()
    assert ad.explain(q, q, q).backend == static and not ad.explain(q, q, q).tuned
    ad.attention(q, q, q)
    assert {p.backend.name for p in _dispatch._plans.values()} == {static}


def test_stored_decisions_are_read_once(cache_home: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    """The variable and the cache file are read at the first decision and kept
    until clear_cache(): later decisions cost no file or environment reads."""
    q = torch.randn(1, 2, 64, 32)
    static, other, spec = _other_backend(q)
    path = _autotune.store(spec.device, _autotune.bucket_key(spec), {"backend": other, "ms": {}})
    ad.clear_cache()
    ad.attention(q, q, q)
    path.unlink()  # gone from disk, still in memory
    monkeypatch.setenv("ATTENTION_DISPATCH_AUTOTUNE", "0")  # not re-read either
    q2 = torch.randn(1, 2, 60, 32)  # another signature in the same bucket
    ad.attention(q2, q2, q2)
    assert {p.backend.name for p in _dispatch._plans.values()} == {other}
    ad.clear_cache()
    ad.attention(q2, q2, q2)
    assert {p.backend.name for p in _dispatch._plans.values()} == {static}


def test_tests_never_use_the_users_cache() -> None:
    """The session's autotune cache is a temporary folder (conftest.py)."""
    folder = _autotune.cache_dir()
    assert str(folder) == os.environ["ATTENTION_DISPATCH_CACHE_DIR"]
    assert not str(folder).startswith(os.path.join(os.path.expanduser("~"), ".cache"))


def test_bench_ignores_stored_decisions(cache_home: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], fast: None) -> None:
    """bench runs in a temporary cache: a stored decision neither applies nor changes."""
    q = torch.randn(1, 2, 64, 16)
    static, _, spec = _other_backend(q)
    path = _autotune.store(spec.device, _autotune.bucket_key(spec), {"backend": "math", "ms": {}})
    before = path.read_text()
    assert static != "math"
    assert main(TINY[:-1] + ["1,2,64,16", "--backends", "math,sdpa-flash",
                             "--out", str(tmp_path / "out")]) == 0
    rows = _results(tmp_path / "out")["rows"]
    assert {r["chosen"] for r in rows if r["backend"] == "auto"} == {static}
    assert path.read_text() == before
    assert ad.explain(q, q, q).backend == "math"  # the user's cache is back afterwards


def test_cache_write_is_atomic_and_merges(cache_home: Path) -> None:
    dev = torch.device("cpu")
    _autotune.store(dev, "a", {"backend": "math"})
    _autotune._memory.clear()
    _autotune.store(dev, "b", {"backend": "sdpa-flash"})
    data = json.loads(_autotune.cache_path(dev).read_text())
    assert set(data["decisions"]) == {"a", "b"}
    leftovers = list((cache_home / "attention-dispatch").glob(".autotune-*"))
    assert not leftovers


# --resume, --max-seconds and the per-case checkpoint, on a tiny grid

TINY = ["bench", "--device", "cpu", "--dtype", "fp32", "--causal", "false", "--backends", "math",
        "--shapes", "1,2,64,16;1,2,128,16;1,2,32,16"]
TINY_CASES = 3


@pytest.fixture()
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """A short timing budget per case: these tests are about the files, not the times."""
    real = bench_run.time_interleaved
    monkeypatch.setattr(bench_run, "time_interleaved",
                        lambda fns, dev, **budget: real(fns, dev, 0.01, 3))


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _assert_complete(out: Path) -> list[dict]:
    data = _results(out)
    rows = data["rows"]
    assert data["complete"] is True
    assert data["cases_done"] == data["cases_total"] == TINY_CASES
    per_row = Counter((r["case"], r["backend"]) for r in rows)
    assert set(per_row.values()) == {1}, per_row  # every case and backend exactly once
    assert len({r["case"] for r in rows}) == TINY_CASES
    assert {r["backend"] for r in rows} == {"math", "auto", "torch-default"}
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".results.*"))  # no temporary file left behind
    return rows


def test_max_seconds_stops_early_and_resume_completes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], fast: None) -> None:
    # the first case of a session always runs; a tiny limit stops before the second
    assert main(TINY + ["--out", str(tmp_path), "--max-seconds", "0.001"]) == 0
    data = _results(tmp_path)
    assert data["complete"] is False
    assert (data["cases_done"], data["cases_total"]) == (1, TINY_CASES)
    first = data["rows"]
    assert len({r["case"] for r in first}) == 1
    out = capsys.readouterr().out
    assert f"partial: 1/{TINY_CASES} cases done, {TINY_CASES - 1} remain" in out
    # the printed command continues the run, one case per session here
    command = shlex.split(out.split("continue with:")[1].strip().splitlines()[0])
    assert command[:2] == ["attention-dispatch", "bench"] and "--resume" in command
    for done in range(2, TINY_CASES + 1):
        assert main(command[1:]) == 0
        assert _results(tmp_path)["cases_done"] == done
    assert "resume: 2/3 cases already in" in capsys.readouterr().out
    rows = _assert_complete(tmp_path)
    assert rows[:len(first)] == first  # earlier rows kept as they were, not run again
    # a complete grid resumed runs nothing and keeps every row
    assert main(TINY + ["--out", str(tmp_path), "--resume"]) == 0
    assert _assert_complete(tmp_path) == rows


def test_checkpoint_after_every_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     fast: None) -> None:
    seen: list = []
    run_case = bench_run.run_case

    def spy(*args: object, **kw: object) -> list:
        path = tmp_path / "results.json"
        seen.append(json.loads(path.read_text()) if path.exists() else None)
        assert not (tmp_path / "results.png").exists()  # the plot only at the end
        return run_case(*args, **kw)

    monkeypatch.setattr(bench_run, "run_case", spy)
    assert main(TINY + ["--out", str(tmp_path)]) == 0
    assert seen[0] is None
    for i, data in enumerate(seen[1:], start=1):
        assert data["complete"] is False and data["cases_done"] == i
        assert len({r["case"] for r in data["rows"]}) == i
    _assert_complete(tmp_path)


def test_killed_run_resumes_from_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            fast: None) -> None:
    run_case = bench_run.run_case
    calls = []

    def dies_on_second(*args: object, **kw: object) -> list:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is stopped in the middle of a case
        return run_case(*args, **kw)

    monkeypatch.setattr(bench_run, "run_case", dies_on_second)
    assert main(TINY + ["--out", str(tmp_path)]) == 130
    data = _results(tmp_path)
    assert data["complete"] is False and data["cases_done"] == 1
    monkeypatch.setattr(bench_run, "run_case", run_case)
    assert main(TINY + ["--out", str(tmp_path), "--resume"]) == 0
    _assert_complete(tmp_path)
    # without --resume the earlier results are replaced
    assert main(TINY[:-1] + ["1,2,32,16", "--out", str(tmp_path)]) == 0
    data = _results(tmp_path)
    assert data["complete"] is True and data["cases_total"] == 1
    assert {r["case"] for r in data["rows"]} == {"fp32 B1 H2 q32 k32 d16 fwd"}


def test_resume_and_max_seconds_arguments(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(TINY + ["--max-seconds", "-1"]) == 2
    err = capsys.readouterr().err
    assert "argument --max-seconds: expected seconds >= 0; got '-1'" in err
    assert len(err.splitlines()) == 1
    (tmp_path / "results.json").write_text("{")
    assert main(TINY + ["--out", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "argument --resume: cannot read" in err and len(err.splitlines()) == 1


def test_explain_reports_the_autotune_decision(cache_home: Path) -> None:
    """With autotune on, explain() names the backend autotune stored for the bucket."""
    ad.autotune(True)
    ad.clear_cache()
    q = torch.randn(1, 2, 64, 32)
    static, other, spec = _other_backend(q)
    _autotune.store(spec.device, _autotune.bucket_key(spec), {"backend": other, "ms": {}})
    d = ad.explain(q, q, q)
    assert d.backend == other and d.source.endswith("+tuned") and d.tuned
    assert [v.name for v in d.verdicts if v.status == "chosen"] == [other]
    ad.autotune(False)
    assert ad.explain(q, q, q).backend == static


# progress on stderr: a live bar on a terminal, plain lines in a log


class _Log(io.StringIO):
    def isatty(self) -> bool:
        return False


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_log_is_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    log = _Log()
    bar = progress.Progress(4, stream=log, interval=5.0)
    for i, step in enumerate([2.0, 1.0, 6.0, 1.0]):
        bar.start(f"case {i}")
        clock[0] += step
        bar.done()
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and log.getvalue().endswith("\n")
    # the first line: no time left yet (never "0 s"); then at most one line per 5 s
    assert lines[0] == "0/4 cases, 0s elapsed, about ? left; case 0"
    assert lines[1] == "3/4 cases, 9s elapsed, about 3s left; case 3"
    assert lines[-1] == "4/4 cases, 10s elapsed, about 0s left; done"
    assert len(lines) == 3


def test_progress_on_a_terminal_is_a_tqdm_bar() -> None:
    tqdm = pytest.importorskip("tqdm")
    term = _Terminal()
    bar = progress.Progress(2, stream=term)
    assert isinstance(bar._bar, tqdm.tqdm)
    bar.start("first")
    assert "<?]" in term.getvalue()  # no estimate before a case is done
    bar.done()
    bar.start("second")
    bar.done()
    bar.close()
    assert "2/2" in term.getvalue() and term.getvalue().rstrip().endswith("done")


def test_bench_progress_in_a_log(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 fast: None) -> None:
    assert main(TINY + ["--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines()[0].startswith("0/3 cases, 0s elapsed, about ? left; fp32 ")
    assert err.splitlines()[-1].startswith("3/3 cases, ") and err.endswith("; done\n")


def test_plot_of_no_timed_rows_warns_nothing(tmp_path: Path) -> None:
    env = {"device_name": "cpu", "torch": torch.__version__, "date": "today"}
    rows = [{"mask": "padding", "seq_q": 64, "tflops": 1.0}]  # nothing to draw
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report.plot(rows, str(tmp_path / "p.png"), env)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
