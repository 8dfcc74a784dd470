"""`attention-dispatch bench --quick`, rank, tune and the autotune cache (CPU)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch import _autotune
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
    from attention_dispatch.bench import run as bench_run

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
