"""Session-wide test set-up for tests/ and backends/*/tests.

The autotune cache of the whole session is a temporary folder
(ATTENTION_DISPATCH_CACHE_DIR, inherited by subprocesses): no test reads or
writes the user's stored tuning decisions.
"""

from __future__ import annotations

from typing import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_autotune_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point the autotune cache at a temporary folder for the whole session."""
    import attention_dispatch as ad

    folder = tmp_path_factory.mktemp("autotune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTENTION_DISPATCH_CACHE_DIR", str(folder))
        ad.clear_cache()
        yield
    ad.clear_cache()
