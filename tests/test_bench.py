"""`attention-dispatch bench --quick`, rank, tune and the autotune cache (CPU)."""

from __future__ import annotations

import csv
import json
import shlex
from collections import Counter
from pathlib import Path

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch import _autotune
from attention_dispatch.bench import run as bench_run
from attention_dispatch.bench.cases import BenchCase
from attention_dispatch.cli import main


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    # flex compiles a kernel per case on the CPU (seconds each): benched elsewhere
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(out),
                 "--backends", "math,sdpa-flash"]) == 0
    return out


def test_quick_writes_json_csv_png(quick: Path) -> None:
    data = json.loads((quick / "results.json").read_text())
    rows = data["rows"]
    assert rows and data["environment"]["device"] == "cpu" and data["environment"]["date"]
    assert all(r["correct"] for r in rows), [r for r in rows if not r["correct"]]
    assert all("auto_over_best" in r for r in rows)
    assert {r["backend"] for r in rows} >= {"auto", "math", "sdpa-flash"}
    for r in rows:
        assert r["ms"] > 0 and r["tflops"] > 0 and r["first_call_ms"] > 0
    with open(quick / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (quick / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_rank_from_results(quick: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rank", str(quick / "results.json")]) == 0
    order = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(order) >= {"math", "sdpa-flash"}


def test_flops_formula() -> None:
    c = BenchCase(2, 4, 4, 128, 256, 64, "fp32", False, "none", "fwd")
    assert c.flops == 4 * 2 * 4 * 128 * 256 * 64
    assert BenchCase(2, 4, 4, 128, 256, 64, causal=True).flops == c.flops / 2
    assert BenchCase(2, 4, 4, 128, 256, 64, mode="fwd+bwd").flops == 2.5 * c.flops


@pytest.fixture()
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _autotune.clear()
    yield tmp_path
    _autotune.autotune(False)
    _autotune.clear()


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
    _autotune._memory.clear()
    monkeypatch.setattr(bench_run, "time_interleaved", lambda *a, **k: pytest.fail("re-timed"))
    out2 = ad.attention(q, q, q, causal=True)
    torch.testing.assert_close(out, out2)


def test_autotune_env_var(cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTENTION_DISPATCH_AUTOTUNE", "1")
    _autotune._state["on"] = None
    assert _autotune.enabled()
    monkeypatch.setenv("ATTENTION_DISPATCH_AUTOTUNE", "0")
    ad.clear_cache()
    assert not _autotune.enabled()


def test_tune_and_cache_commands(cache_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "--device", "cpu", "--dtype", "fp32", "--shapes", "1,2,128,32",
                 "--causal", "false"]) == 0
    assert main(["cache", "show"]) == 0
    shown = capsys.readouterr().out
    assert "float32|1|2|2|128|128|32|32" in shown
    assert main(["cache", "clear"]) == 0
    assert "removed" in capsys.readouterr().out
    assert not list((cache_home / "attention-dispatch").glob("autotune-*.json"))


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
                        lambda fns, dev, budget_s=0.0: real(fns, dev, 0.01, 3))


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
    assert {r["backend"] for r in rows} == {"math", "auto"}
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
    with pytest.raises(KeyboardInterrupt):
        main(TINY + ["--out", str(tmp_path)])
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
    with pytest.raises(SystemExit) as exc:
        main(TINY + ["--max-seconds", "-1"])
    assert exc.value.code == 2
    assert "--max-seconds" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("{")
    with pytest.raises(SystemExit, match="--resume: cannot read"):
        main(TINY + ["--out", str(tmp_path), "--resume"])


def test_explain_reports_the_autotune_decision(cache_home: Path) -> None:
    """With autotune on, explain() names the backend autotune stored for the bucket."""
    ad.autotune(True)
    ad.clear_cache()
    q = torch.randn(1, 2, 64, 32)
    static = ad.explain(q, q, q).backend
    spec = ad.explain(q, q, q).spec
    other = next(v.name for v in ad.explain(q, q, q).verdicts
                 if v.name != static and not v.reasons and v.rank is not None)
    _autotune.store(spec.device, _autotune.bucket_key(spec), {"backend": other, "ms": {}})
    d = ad.explain(q, q, q)
    assert d.backend == other and d.source.endswith("+autotune")
    ad.autotune(False)
    assert ad.explain(q, q, q).backend == static
