"""The package's layers: no import cycles (imports inside functions count), a
dispatch core that imports nothing above it, one registry of in-memory caches,
rankings as data (declared placements, registered rankings, device families),
and modules of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch._core import caches, ranking
from attention_dispatch._core.registry import BUILTINS, REGISTRY

PKG = Path(ad.__file__).parent
OUTER = ("attention_dispatch.testing", "attention_dispatch.bench", "attention_dispatch.cli",
         "attention_dispatch._cli", "attention_dispatch.integrations",
         "attention_dispatch.distributed", "attention_dispatch.structured",
         "attention_dispatch.sdpa", "attention_dispatch.attend")


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = ("attention_dispatch",) + p.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of the package that ``name`` imports, anywhere in the file.
    ``from pkg import sub`` counts as importing ``pkg.sub`` (not ``pkg``)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = name.split(".") if is_pkg else name.split(".")[:-1]
            if node.level:
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names]
            targets = subs if all(s in mods for s in subs) else [mod] + subs
        else:
            continue
        out.update(t for t in targets if t in mods and t != name)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_core_imports_nothing_above_it() -> None:
    graph = _graph()
    core = {m: deps for m, deps in graph.items() if m.startswith("attention_dispatch._core")}
    assert len(core) > 15
    for m, deps in core.items():
        outside = sorted(d for d in deps if not d.startswith("attention_dispatch._core"))
        assert not outside, f"{m} imports {outside}"


def test_outer_layers_use_the_core_package_api() -> None:
    """structured, distributed, testing, bench, the CLI, sdpa and attend reach the
    core through ``attention_dispatch._core``'s public names (plus a few
    helper modules: packing, timing, autotuning and quarantine for the CLI)."""
    allowed = {"attention_dispatch._core", "attention_dispatch._core.packing",
               "attention_dispatch._core.timing", "attention_dispatch._core.autotuning",
               "attention_dispatch._core.quarantine"}
    for m, deps in _graph().items():
        if m.startswith(OUTER):
            private = sorted(d for d in deps if d.startswith("attention_dispatch._core")
                             and d not in allowed)
            assert not private, f"{m} imports core internals {private}"


def test_modules_stay_readable() -> None:
    for m, p in _modules().items():
        lines = len(p.read_text().splitlines())
        assert lines <= 530, f"{m}: {lines} lines"


def test_every_in_memory_cache_is_registered_and_cleared() -> None:
    names = set(caches.registered())
    assert {"dispatch.plans", "varlen.plans", "registry.probes", "reliability", "verify",
            "quarantine.memory", "autotuning.environment", "select.environment",
            "select.names", "events.log_environment"} <= names
    q = torch.randn(1, 2, 4, 8)
    ad.attention(q, q, q)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    ad.attention_varlen(q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1),
                        cu, cu, 4, 4)
    from attention_dispatch._core import dispatch, varlen

    assert dispatch._plans and varlen._plans and REGISTRY._probes
    ad.clear_cache()
    assert not dispatch._plans and not varlen._plans and not REGISTRY._probes


def test_a_registered_cache_is_cleared_by_clear_cache() -> None:
    seen = []
    caches.register_cache("test.extra", lambda: seen.append(1))
    try:
        ad.clear_cache()
        assert seen == [1]
    finally:
        caches._clearers.pop("test.extra", None)


@pytest.mark.parametrize("device,hip,family", [
    ("cpu", None, "cpu"), ("mps", None, "mps"), ("xpu", None, "xpu"),
    ("cuda", "6.2.41133", "rocm"), ("meta", None, "other")])
def test_device_families(monkeypatch, device, hip, family) -> None:
    monkeypatch.setattr(torch.version, "hip", hip, raising=False)
    assert ranking.device_family(torch.device(device)) == family


def test_fake_families_rank_torch_kernels(monkeypatch) -> None:
    """Faked on the CPU: the ROCm, MPS and XPU tables (documented, not measured)."""
    names = list(BUILTINS)  # plugins installed here would be placed before math
    assert ranking.ranked(torch.device("mps"), names) == ["sdpa", "math"]
    assert ranking.ranked(torch.device("xpu"), names)[0] == "sdpa"
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    rocm = ranking.ranked(torch.device("cuda"), names)
    assert "sdpa-cudnn" not in rocm and rocm[:2] == ["flash-attn", "sdpa-flash"]
    assert rocm[-1] == "math" and {"rocm", "mps", "xpu"} <= ranking.UNMEASURED


def test_a_backend_declares_its_place(register_temp, spy_class) -> None:
    class Early(spy_class):
        ranking = {"cpu": "first"}

    class Late(spy_class):
        ranking = {"cpu/decode": "after:math", "*": "before:flex"}

    register_temp("early", Early)
    register_temp("late", Late)
    names = REGISTRY.names()
    order = ranking.ranked(torch.device("cpu"), names)
    assert order[0] == "early" and order.index("late") == order.index("flex") - 1
    spec = ad.explain(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 4, 8),
                      torch.randn(1, 1, 4, 8)).spec
    assert ranking.ranked(torch.device("cpu"), names, spec)[-1] == "late"  # decode class


def test_a_user_registers_a_ranking() -> None:
    q = torch.randn(1, 2, 8, 16)
    assert ad.explain(q, q, q).backend == "sdpa-flash"
    rest = tuple(n for n in REGISTRY.names() if n not in ("math", "sdpa-flash"))
    ad.register_ranking("cpu", ("math", "sdpa-flash") + rest)
    try:
        ad.clear_cache()
        assert ad.explain(q, q, q).backend == "math"
        assert ranking.ranked(torch.device("cpu"), list(BUILTINS))[:2] == ["math", "sdpa-flash"]
    finally:
        ranking.register_ranking("cpu", ())
    assert ad.explain(q, q, q).backend == "sdpa-flash"
    with pytest.raises(ValueError, match="shape_class"):
        ranking.register_ranking("cpu", ("math",), shape_class="huge")


def test_a_later_feature_needs_no_new_capability_field(monkeypatch, register_temp, spy_class
                                                       ) -> None:
    """spec.EXTRA_FEATURES: a call using a later feature goes to a backend whose
    ``Capabilities.extras`` names it; the others refuse it with the stated reason."""
    import dataclasses

    from attention_dispatch._core import spec as spec_mod

    monkeypatch.setitem(spec_mod.EXTRA_FEATURES, "wide",
                        (lambda s: s.head_dim == 24, "head_dim 24; allowed: no 'wide'"))

    class Wide(spy_class):
        capabilities = dataclasses.replace(spy_class.capabilities, extras=frozenset({"wide"}))

    register_temp("wide-kernel", Wide)
    q = torch.randn(1, 2, 4, 24)
    d = ad.explain(q, q, q, backend="sdpa-flash,wide-kernel")
    assert d.backend == "wide-kernel"
    flash = next(v for v in d.verdicts if v.name == "sdpa-flash")
    assert "head_dim 24; allowed: no 'wide'" in flash.reasons
    assert "wide" in Wide.capabilities.features()


def test_no_core_module_is_shadowed_by_an_exported_name() -> None:
    """``from . import x`` inside the core must get module ``x``: no name the core
    package exports is also one of its modules' names."""
    import importlib.util

    import attention_dispatch._core as core

    clashes = [n for n in core.__all__
               if importlib.util.find_spec(f"attention_dispatch._core.{n}") is not None]
    assert not clashes
