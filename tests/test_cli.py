"""The CLI and the README's commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from attention_dispatch.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_info_lists_every_backend(capsys: pytest.CaptureFixture[str]) -> None:
    import attention_dispatch as ad

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "devices: cpu" in out
    for name in ad.list_backends():
        assert name in out
    assert "auto on cpu" in out
    assert "device cpu; allowed: cuda" in out  # why the CUDA-only kernels are unavailable


def test_explain_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["explain", "--shape", "2,8,128,64", "--kv-heads", "2", "--dtype", "fp32",
               "--causal", "--mask", "padding", "--seq-k", "256"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "chosen: sdpa-flash" in out
    assert "Hq=8 Hkv=2 Sq=128 Sk=256" in out and "key_padding=True" in out


def test_explain_dropout_refusal(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--shape", "1,2,16,32", "--dtype", "fp32", "--dropout", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "chosen: math" in out
    assert re.search(r"sdpa-flash\s+refused\s+dropout_p > 0", out)


def test_explain_forced_backend_and_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--shape", "1,2,16,32", "--backend", "math"]) == 0
    assert "chosen: math" in capsys.readouterr().out
    assert main(["explain", "--shape", "1,2,16,32", "--backend", "sdpa-flsh"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'sdpa-flash'" in err


def test_bad_kv_heads(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--shape", "1,6,16,32", "--kv-heads", "4"]) == 2
    assert "--kv-heads" in capsys.readouterr().err


def test_console_script_and_module_run() -> None:
    """The README's main-job command, as installed, and python -m."""
    for cmd in (["attention-dispatch", "info"], [sys.executable, "-m", "attention_dispatch", "info"]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "auto on cpu" in res.stdout


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_quick_start_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", _readme(), re.S)
    quick = blocks[0]
    ns: dict = {}
    exec(compile(quick, "README quick start", "exec"), ns)
    assert tuple(ns["out"].shape) == (2, 8, 128, 64)
    assert tuple(ns["lse"].shape) == (2, 8, 128)


def test_readme_setup_commands_match_ci() -> None:
    """The README's test command is the one CI runs."""
    readme = _readme()
    ci = (ROOT / ".ci" / "run").read_text()
    assert ('pip install torch==2.13.0 && pip install -e ".[bench]" && attention-dispatch info '
            "&& attention-dispatch bench --quick --out bench-results") in readme
    assert ('pip install torch==2.13.0 && pip install -e ".[test]" -e backends/chunked && '
            "python -m pytest -q -p no:cacheprovider") in readme
    assert "python -m pytest -q -p no:cacheprovider" in ci
    assert "torch==2.13.0" in ci and '-e ".[test]" -e backends/chunked' in ci


def test_readme_integrations_block_runs() -> None:
    """The README's one-liners, with a tiny transformers config and diffusers UNet
    standing for the reader's."""
    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    block = next(b for b in re.findall(r"```python\n(.*?)```", _readme(), re.S)
                 if "patch_sdpa" in b)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2)
    ns: dict = {"config": config, "unet": unet}
    exec(compile(block, "README integrations", "exec"), ns)
    assert tuple(ns["out"].shape) == (1, 8, 16, 64)
    assert ns["model"].config._attn_implementation == "attention_dispatch"
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {
        "AttentionDispatchProcessor"}
    import torch.nn.functional as F

    from attention_dispatch.sdpa import scaled_dot_product_attention
    assert F.scaled_dot_product_attention is not scaled_dot_product_attention  # restored
