"""Verify mode, the quarantine and the known-bug list.

A backend that is wrong only for some shapes (tests/_wrong_backend.py) is
caught by verify mode, demoted for the signature (the call is answered by the
next backend), quarantined on disk, avoided by a fresh process, shown and
cleared by the CLI; a forced wrong backend raises.  The shipped known-bug list
is validated, and an injected entry steers auto.  Every test uses a temporary
cache directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch._core import quarantine as _quarantine, verification as _verify
from attention_dispatch.testing import reference_attention

sys.path.insert(0, str(Path(__file__).parent))
import _wrong_backend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("ATTENTION_DISPATCH_CACHE_DIR", str(tmp_path / "attention-dispatch"))
    monkeypatch.delenv(_verify.ENV_VERIFY, raising=False)
    _wrong_backend.register()
    ad.clear_cache()
    ad.clear_events()
    yield tmp_path
    ad.unregister_backend(_wrong_backend.NAME)
    ad.clear_cache()


def qkv(sk: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(sk)
    return tuple(torch.randn(2, 2, s, 16, generator=g) for s in (8, sk, sk))


SELECTION = [_wrong_backend.NAME, "auto"]


def test_caught_demoted_and_answered_by_the_next_backend() -> None:
    q, k, v = qkv(32)
    with ad.verify(1):
        out = ad.attention(q, k, v, backend=SELECTION)
    ref, _ = reference_attention(q, k, v)
    assert (out.double() - ref).abs().max().item() < 1e-5  # the next backend's answer
    kinds = [e.kind for e in ad.events()]
    assert "verify" in kinds and "demotion" in kinds
    entry = _quarantine.entries()[0]
    assert entry["backend"] == _wrong_backend.NAME and entry["signature"]["seq_k"] == 32
    assert entry["torch"] == torch.__version__ and entry["device"] == "cpu"
    # later calls of the signature run elsewhere, without checks
    assert ad.explain(q, k, v, backend=SELECTION).backend != _wrong_backend.NAME


def test_right_shapes_pass_and_keep_the_backend() -> None:
    q, k, v = qkv(30)
    with ad.verify(2):
        for _ in range(3):
            ad.attention(q, k, v, backend=SELECTION)
    assert not [e for e in ad.events() if e.kind in ("verify", "demotion")]
    assert ad.explain(q, k, v, backend=SELECTION).backend == _wrong_backend.NAME
    assert _quarantine.entries() == []


def test_forced_wrong_backend_raises() -> None:
    q, k, v = qkv(16)
    with ad.verify(1), pytest.raises(ad.BackendRuntimeError) as info:
        ad.attention(q, k, v, backend=_wrong_backend.NAME)
    assert isinstance(info.value.__cause__, ad.WrongResultError)


def test_only_the_first_n_calls_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = _verify.check
    monkeypatch.setattr(_verify, "check", lambda *a, **k: seen.append(1) or real(*a, **k))
    q, k, v = qkv(30)
    with ad.verify(2):
        for _ in range(5):
            ad.attention(q, k, v)
        with ad.verify(0):  # off inside
            ad.attention(q, k, v, causal=True)
    for _ in range(2):
        ad.attention(q, k, v)  # off outside
    assert len(seen) == 2


def test_environment_variable_and_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = _verify.check
    monkeypatch.setattr(_verify, "check", lambda *a, **k: seen.append(1) or real(*a, **k))
    monkeypatch.setenv(_verify.ENV_VERIFY, "1")
    ad.clear_cache()
    q, k, v = qkv(30)
    ad.attention(q, k, v)
    ad.attention(q, k, v, dropout_p=0.5)  # random by design: never verified
    assert len(seen) == 1


@pytest.mark.parametrize("kw", [dict(causal=True, window=(5, 0)), dict(alibi_slopes="h"),
                                dict(mask="float", causal=True), dict(kpm=True, softcap=3.0)])
def test_structured_calls_pass_on_a_correct_backend(kw: dict) -> None:
    """The sample's causal, window, ALiBi, masks and padding match the call."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, s, 16, generator=g) for s in (150, 170, 170))
    call = dict(kw)
    if call.pop("alibi_slopes", None):
        call["alibi_slopes"] = torch.rand(4, generator=g)
    if call.pop("mask", None):
        call["mask"] = torch.randn(1, 4, 150, 170, generator=g)
    if call.pop("kpm", None):
        call["key_padding_mask"] = torch.rand(2, 170, generator=g) > 0.3
    with ad.verify(1):
        ad.attention(q, k, v, backend="math", **call)
        ad.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="bshd",
                     backend="sdpa-flash" if "softcap" not in call else "math", **call)
    assert not [e for e in ad.events() if e.kind == "verify"], ad.events()


FRESH = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch, _wrong_backend, attention_dispatch as ad
_wrong_backend.register()
g = torch.Generator().manual_seed(32)
q, k, v = (torch.randn(2, 2, s, 16, generator=g) for s in (8, 32, 32))
d = ad.explain(q, k, v, backend=[_wrong_backend.NAME, "auto"])
print(d.backend)
print(" ".join(d.reasons(_wrong_backend.NAME)))
"""


def _fresh(home: Path) -> list[str]:
    env = {"ATTENTION_DISPATCH_CACHE_DIR": str(home / "attention-dispatch"), "PATH": "/usr/bin:/bin",
           "ATTENTION_DISPATCH_CANARY": "0"}
    proc = subprocess.run([sys.executable, "-c", FRESH, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(env, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def _cli(home: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "attention_dispatch", "cache", *args],
                          capture_output=True, text=True, timeout=120,
                          env={"ATTENTION_DISPATCH_CACHE_DIR": str(home / "attention-dispatch"),
                               "PATH": "/usr/bin:/bin",
                               "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_quarantine_holds_across_processes_until_cleared(cache_home: Path) -> None:
    q, k, v = qkv(32)
    with ad.verify(1):
        ad.attention(q, k, v, backend=SELECTION)
    chosen, why = _fresh(cache_home)
    assert chosen != _wrong_backend.NAME and "quarantined" in why
    shown = _cli(cache_home, "show")
    assert "1 quarantine entries" in shown and _wrong_backend.NAME in shown
    assert "quarantine.json" in _cli(cache_home, "clear")
    chosen, why = _fresh(cache_home)
    assert chosen == _wrong_backend.NAME and why == ""


def test_concurrent_writers_keep_every_entry(cache_home: Path) -> None:
    import threading

    inst = ad.get_backend(_wrong_backend.NAME)
    specs = [ad.explain(*qkv(16 * (i + 1))).spec for i in range(8)]
    threads = [threading.Thread(target=_quarantine.record, args=(inst, s, "x")) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = json.loads((cache_home / "attention-dispatch" / "quarantine.json").read_text())
    assert len({json.dumps(e["signature"], sort_keys=True) for e in data["entries"]}) == 4
    # Sk 16..128 fall into 4 power-of-two buckets: 16, 32, 64 (48, 64), 128 (80..128)


# ------------------------------------------------------------ known bugs


def test_shipped_known_bugs_are_well_formed() -> None:
    bugs = _quarantine.known_bugs()
    assert len(bugs) >= 3
    for bug in bugs:
        assert bug["backend"] in ad.list_backends()
        assert bug["reference"].startswith("https://github.com/")
        assert set(bug.get("when", {})) <= set(_quarantine._CONDITIONS)
        assert set(bug.get("versions", {})) <= {"torch", "cudnn", "package"}
        assert bug["what"] and bug["id"]


def test_an_injected_known_bug_steers_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    bug = {"id": "test-1", "backend": _wrong_backend.NAME, "device": {"type": "cpu"},
           "versions": {"torch": ">=2.0"}, "when": {"seq_k_mod": [16, 0], "dtypes": ["float32"]},
           "what": "wrong when Sk % 16 == 0", "reference": "https://github.com/x/y/issues/1"}
    monkeypatch.setattr(_quarantine, "known_bugs", lambda: [bug])
    ad.clear_cache()
    d = ad.explain(*qkv(32), backend=SELECTION)
    assert d.backend != _wrong_backend.NAME
    assert "known upstream bug test-1" in " ".join(d.reasons(_wrong_backend.NAME))
    assert ad.explain(*qkv(30), backend=SELECTION).backend == _wrong_backend.NAME
    # a forced backend still runs (the user chose it)
    assert ad.explain(*qkv(32), backend=_wrong_backend.NAME).backend == _wrong_backend.NAME


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa-flash", "sdpa-mem-efficient", "sdpa-cudnn",
                                     "flash-attn", "xformers", "flex", "auto"])
def test_no_false_alarm_on_cuda(backend: str) -> None:
    """Correct CUDA kernels pass verify mode's float32 check (bf16/fp16, causal
    Sq != Sk, GQA, key padding, a long query sampled by rows)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend != "auto" and ad.get_backend(backend).probe(torch.device("cuda")):
        pytest.skip(f"{backend} unavailable")
    g = torch.Generator(device="cuda").manual_seed(0)
    ran = 0
    for dtype in (torch.bfloat16, torch.float16):
        q = torch.randn(2, 8, 300, 64, generator=g, device="cuda", dtype=dtype)
        k, v = (torch.randn(2, 2, 520, 64, generator=g, device="cuda", dtype=dtype)
                for _ in range(2))
        kpm = torch.rand(2, 520, generator=g, device="cuda") > 0.2
        for kw in (dict(causal=True), dict(key_padding_mask=kpm), dict()):
            try:
                with ad.verify(1):
                    ad.attention(q, k, v, backend=backend, **kw)
                ran += 1
            except ad.BackendUnavailable:
                continue
    assert not [e for e in ad.events() if e.kind == "verify"], ad.events()
    if backend == "auto":
        assert ran == 6
