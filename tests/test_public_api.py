"""The public surface: ``__all__`` pinned, and importing the package is cheap
and side-effect free (no adapter imported, no environment read)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import attention_dispatch as ad

PUBLIC = [
    "Attend",
    "AttentionDispatchError",
    "AttentionInputError",
    "AttentionResult",
    "AttentionTypeError",
    "Backend",
    "BackendRegistrationError",
    "BackendRuntimeError",
    "BackendUnavailable",
    "BackendVerdict",
    "Buffer",
    "CallSpec",
    "Capabilities",
    "Decision",
    "Event",
    "FallbackWarning",
    "MemoryWarning",
    "PluginWarning",
    "UnknownBackendError",
    "WrongResultError",
    "__version__",
    "attention",
    "attention_paged",
    "attention_varlen",
    "autotune",
    "clear_cache",
    "clear_events",
    "events",
    "explain",
    "explain_paged",
    "explain_spec",
    "get_backend",
    "list_backends",
    "merge_attention",
    "patch_sdpa",
    "register_backend",
    "register_ranking",
    "scaled_dot_product_attention",
    "unregister_backend",
    "use_backend",
    "use_policy",
    "verify",
]


def test_all_is_pinned():
    assert PUBLIC == sorted(PUBLIC)
    assert sorted(ad.__all__) == PUBLIC
    assert len(set(ad.__all__)) == len(ad.__all__)


@pytest.mark.parametrize("name", PUBLIC)
def test_each_name_is_importable(name):
    ns: dict = {}
    exec(f"from attention_dispatch import {name}", ns)
    assert ns[name] is getattr(ad, name)


def test_star_import_gives_exactly_all():
    ns: dict = {}
    exec("from attention_dispatch import *", ns)
    assert sorted(k for k in ns if k != "__builtins__") == PUBLIC


def test_version_is_a_string():
    assert isinstance(ad.__version__, str) and ad.__version__.count(".") >= 1


def _run(code: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTENTION_DISPATCH_")}
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def test_import_is_side_effect_free():
    """One fresh interpreter: no adapter module imported, a bogus
    ATTENTION_DISPATCH_BACKEND does not break the import (it is read on the
    first call, not at import), and no entry point is loaded."""
    proc = _run("""
        import sys
        import attention_dispatch, sys
        assert not any(m.startswith('attention_dispatch.adapters.') for m in sys.modules), \\
            sorted(m for m in sys.modules if m.startswith('attention_dispatch.adapters.'))
        from attention_dispatch._core.registry import REGISTRY
        assert not REGISTRY._plugins_loaded, "entry points were read at import"
        import torch
        q = torch.randn(1, 1, 2, 4)
        try:
            attention_dispatch.attention(q, q, q)
        except attention_dispatch.UnknownBackendError as e:
            assert e.argument == "ATTENTION_DISPATCH_BACKEND" and e.name == "no-such-backend"
        else:
            raise AssertionError("the bogus variable is read on the first call")
        out = attention_dispatch.attention(q, q, q, backend="math")
        assert 'attention_dispatch.adapters.math' in sys.modules
        assert 'attention_dispatch.adapters.sdpa_cudnn' not in sys.modules
        print("OK")
    """, ATTENTION_DISPATCH_BACKEND="no-such-backend")
    assert "OK" in proc.stdout


def test_integrations_are_imported_lazily():
    """``import attention_dispatch`` imports no integration (nor transformers or
    diffusers); ``attention_dispatch.integrations`` imports neither library."""
    proc = _run("""
        import sys
        import attention_dispatch
        assert not any(m.startswith('attention_dispatch.integrations') for m in sys.modules)
        import attention_dispatch.integrations
        for lib in ('transformers', 'diffusers'):
            assert lib not in sys.modules, lib
        assert callable(attention_dispatch.scaled_dot_product_attention)
        print("OK")
    """)
    assert "OK" in proc.stdout
