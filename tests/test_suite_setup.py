"""The test suite's own set-up (tests/conftest.py, conftest.py): CUDA-only
tests deselected with one summary line on a machine without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="about machines without CUDA")
def test_cuda_only_tests_are_deselected_with_one_line() -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           "tests/test_conformance.py::test_cuda_float_mask_gradient",
           "tests/gpu/test_gpu_ring.py", "tests/test_bench.py::test_flops_formula"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    summary = [line for line in lines if "CUDA-only tests (marked gpu) deselected" in line]
    assert len(summary) == 1 and summary[0].split()[0].isdigit() and int(
        summary[0].split()[0]) > 6
    assert "1 passed" in lines[-1] and "deselected" in lines[-1]
    assert "skipped" not in res.stdout and "SKIPPED" not in res.stdout
