"""Plugins found through the ``attention_dispatch.backends`` entry point group.

Each test builds fake installed distributions (a ``*.dist-info`` folder with
METADATA and entry_points.txt, plus the module) in a temporary folder, puts
it on PYTHONPATH and runs a fresh interpreter, so the registry discovers
them from scratch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FAKE_MODULE = '''
import torch
import attention_dispatch as ad

IMPORTED = True


class FakeKernel(ad.Backend):
    capabilities = ad.Capabilities(
        device_types=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32, torch.float64}),
        dropout=False,
    )
    calls = 0

    def forward(self, q, k, v, *, spec, mask, key_padding_mask, dropout_p, scale):
        type(self).calls += 1
        from attention_dispatch.testing import reference_attention
        out, lse = reference_attention(q, k, v, mask=mask, key_padding_mask=key_padding_mask,
                                       causal=spec.causal, scale=scale)
        return out.to(q.dtype), (lse.float() if spec.return_lse else None)
'''

BROKEN_MODULE = '''
raise RuntimeError("brokenplug explodes at import")
'''

DUP_MODULE = '''
import attention_dispatch as ad


class NotMath(ad.Backend):
    capabilities = None
'''


def make_dist(root: Path, dist: str, module: str, source: str, entries: dict[str, str]) -> None:
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = ["[attention_dispatch.backends]"] + [f"{k} = {v}" for k, v in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    (root / f"{module}.py").write_text(source)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    make_dist(tmp_path, "fakeplug", "fakeplug_mod", FAKE_MODULE,
              {"fake-kernel": "fakeplug_mod:FakeKernel"})
    return tmp_path


def run_python(code: str, path: Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTENTION_DISPATCH_")}
    env["PYTHONPATH"] = os.pathsep.join([str(path)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["ATTENTION_DISPATCH_CANARY"] = "0"  # the fake kernels count their calls
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=str(path))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "DONE" in proc.stdout, proc.stdout + proc.stderr
    return proc


def test_entry_point_plugin_is_found_lazily_and_runs(site):
    run_python("""
        import sys, warnings
        warnings.simplefilter("error")  # a healthy plugin warns about nothing
        import attention_dispatch as ad
        assert "fakeplug_mod" not in sys.modules, "import must not load plugins"
        names = ad.list_backends()
        assert "fake-kernel" in names, names
        assert names.index("fake-kernel") > names.index("sdpa-cudnn"), names
        assert "fakeplug_mod" not in sys.modules, "listing must not import plugins"

        import torch
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
        out = ad.attention(q, k, v, backend="fake-kernel", causal=True)
        import fakeplug_mod
        assert fakeplug_mod.FakeKernel.calls == 1
        ref = ad.attention(q, k, v, backend="math", causal=True)
        torch.testing.assert_close(out, ref)
        b = ad.get_backend("fake-kernel")
        assert type(b).__name__ == "FakeKernel" and b.name == "fake-kernel"

        # auto on CPU: plugins rank between the built-in fused kernels and math
        d = ad.explain(q, k, v, dropout_p=0.1)
        rank = {x.name: x.rank for x in d.verdicts}
        assert rank["sdpa-flash"] < rank["fake-kernel"] < rank["math"], rank
        assert "dropout" in " ".join(d.reasons("fake-kernel"))
        with ad.use_backend("fake-kernel"):
            ad.attention(q, k, v)
        assert fakeplug_mod.FakeKernel.calls == 2
        print("DONE")
    """, site)


def test_broken_and_duplicate_plugins_warn_and_others_work(site):
    make_dist(site, "brokenplug", "brokenplug_mod", BROKEN_MODULE,
              {"broken-kernel": "brokenplug_mod:Kernel"})
    make_dist(site, "dupplug", "dupplug_mod", DUP_MODULE, {"math": "dupplug_mod:NotMath"})
    run_python("""
        import sys, warnings
        import attention_dispatch as ad
        import torch

        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            names = ad.list_backends()
        assert "broken-kernel" in names and "fake-kernel" in names
        assert names.count("math") == 1
        dup = [str(w.message) for w in rec if issubclass(w.category, ad.PluginWarning)]
        assert len(dup) == 1 and "'math'" in dup[0] and "dupplug" in dup[0], dup
        assert "dupplug_mod" not in sys.modules
        # the built-in math is untouched
        assert type(ad.get_backend("math")).__name__ == "MathBackend"

        q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            d = ad.explain(q, k, v)
            out_auto = ad.attention(q, k, v, dropout_p=0.1)  # walks past the broken one
            out_fake = ad.attention(q, k, v, backend="fake-kernel")
            out_list = ad.attention(q, k, v, backend="broken-kernel,math")
        msgs = [str(w.message) for w in rec if issubclass(w.category, ad.PluginWarning)]
        assert len(msgs) == 1, msgs
        assert "broken-kernel" in msgs[0] and "brokenplug explodes at import" in msgs[0]
        why = " ".join(d.reasons("broken-kernel"))
        assert "failed to load" in why and "RuntimeError" in why, why
        assert d.backend == "sdpa-flash"
        assert out_auto.shape == out_fake.shape == out_list.shape == q.shape
        try:
            ad.attention(q, k, v, backend="broken-kernel")
        except ad.BackendUnavailable as e:
            assert "brokenplug explodes at import" in str(e)
        else:
            raise AssertionError("a broken plugin cannot run a call")
        print("DONE")
    """, site)


def test_plugins_env_zero_disables_entry_points(site):
    make_dist(site, "brokenplug", "brokenplug_mod", BROKEN_MODULE,
              {"broken-kernel": "brokenplug_mod:Kernel"})
    run_python("""
        import warnings
        warnings.simplefilter("error")  # nothing is loaded, so nothing warns
        import attention_dispatch as ad
        import torch
        names = ad.list_backends()
        assert "fake-kernel" not in names and "broken-kernel" not in names, names
        assert "math" in names
        q = torch.randn(1, 2, 3, 8)
        try:
            ad.attention(q, q, q, backend="fake-kernel")
        except ad.UnknownBackendError as e:
            assert e.name == "fake-kernel"
        else:
            raise AssertionError("fake-kernel must be unknown")
        ad.attention(q, q, q)
        print("DONE")
    """, site, ATTENTION_DISPATCH_PLUGINS="0")


def test_plugin_selected_by_env_var(site):
    run_python("""
        import sys
        import attention_dispatch as ad
        assert "fakeplug_mod" not in sys.modules
        import torch
        q = torch.randn(1, 2, 3, 8)
        ad.attention(q, q, q)
        import fakeplug_mod
        assert fakeplug_mod.FakeKernel.calls == 1
        print("DONE")
    """, site, ATTENTION_DISPATCH_BACKEND="fake-kernel")
