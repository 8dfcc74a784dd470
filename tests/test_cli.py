"""The CLI and the README's commands."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch._cli import info as _info
from attention_dispatch.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def test_info_lists_every_backend(capsys: pytest.CaptureFixture[str]) -> None:
    import attention_dispatch as ad

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "devices: cpu" in out
    for name in ad.list_backends():
        assert name in out
    assert "auto on cpu" in out
    flat = " ".join(out.split())  # reasons may be wrapped over lines
    assert "device cpu; allowed: cuda" in flat  # why the CUDA-only kernels are unavailable


def test_explain_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["explain", "--shape", "2,8,128,64", "--kv-heads", "2", "--dtype", "fp32",
               "--causal", "--mask", "padding", "--seq-k", "256"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "chosen: sdpa-flash" in out
    flat = " ".join(out.split())  # long lines are wrapped
    assert "Hq=8 Hkv=2 Sq=128 Sk=256" in flat and "key_padding=True" in flat
    assert max(len(line) for line in out.splitlines()) <= 100


def test_explain_dropout_refusal(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--shape", "1,2,16,32", "--dtype", "fp32", "--dropout", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "chosen: math" in out
    assert re.search(r"sdpa-flash\s+refused\s+dropout_p > 0", out)


def test_explain_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--shape", "1,2,16,32", "--dropout", "0.1",
                 "--max-extra-bytes", "1KiB"]) == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert "chosen: none" in flat and "math refused max_extra_bytes=1024 (1 KiB)" in flat
    assert main(["explain", "--shape", "1,2,16,32", "--dropout", "0.1", "--deterministic",
                 "--grad"]) == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert "chosen: math" in flat and "deterministic=True" in flat
    assert main(["explain", "--shape", "1,2,16,32", "--max-extra-bytes", "lots"]) == 2
    assert "--max-extra-bytes" in capsys.readouterr().err


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


# ----------------------------------------------------------------- bad arguments


NO_CUDA = not torch.cuda.is_available()
BAD = [
    (["explain", "--shape", "1,2,3"], "argument --shape: expected B,H,S,D"),
    (["explain", "--shape", "a,b,c,d"], "argument --shape: expected B,H,S,D"),
    (["explain"], "the following arguments are required: --shape"),
    (["explain", "--shape", "1,16,64,32", "--device", "gpu"], "did you mean 'cuda'?"),
    (["explain", "--shape", "1,16,64,32", "--device", "tpu"], "expected cpu, cuda or cuda:N"),
    (["explain", "--shape", "1,16,64,32", "--dtype", "fp8"], "argument --dtype"),
    (["explain", "--shape", "1,6,16,32", "--kv-heads", "4"], "argument --kv-heads"),
    (["explain", "--shape", "1,6,16,32", "--kv-heads", "0"], "argument --kv-heads"),
    (["explain", "--shape", "1,6,16,32", "--dropout", "1.5"], "argument --dropout"),
    (["explain", "--shape", "1,6,16,32", "--backend", "nope"], "--backend: expected one of"),
    (["bench", "--dtype", "fp8"], "argument --dtype"),
    (["bench", "--shapes", "1,2,x"], "argument --shapes"),
    (["bench", "--mask", "dense"], "argument --mask"),
    (["bench", "--quick", "--backends", "nope"], "--backends: expected one of"),
    (["bench", "--max-seconds", "soon"], "argument --max-seconds"),
    (["tune"], "the following arguments are required: --shapes"),
    (["tune", "--shapes", "1,4,64,16", "--kv-heads", "3"], "argument --kv-heads"),
    (["bench", "--shapes", "1,4,64,16", "--kv-heads", "3"], "argument --kv-heads"),
    (["bench", "--shapes", "1,2,64,16", "--out", "/proc/no/such"], "argument --out"),
    (["tune", "--shapes", "1,2,3"], "argument --shapes"),
    (["rank", "does-not-exist.json"], "cannot read does-not-exist.json"),
    (["cache", "wipe"], "argument action: invalid choice"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    ([], "the following arguments are required: COMMAND"),
]
if NO_CUDA:  # the README's own example, on a machine without CUDA
    BAD += [(["explain", "--shape", "1,16,4096,128", "--dtype", "bf16", "--causal", "--device",
              "cuda"], "CUDA is not available here"),
            (["tune", "--shapes", "8,16,4096,128", "--device", "cuda"], "CUDA is not available"),
            (["bench", "--quick", "--device", "cuda:0"], "CUDA is not available here")]
else:
    BAD += [(["explain", "--shape", "1,2,16,32", "--device", "cuda:99"], "CUDA device(s)")]


@pytest.mark.parametrize("argv, expect", BAD, ids=lambda x: " ".join(x) if isinstance(x, list)
                         else None)
def test_bad_argument_is_one_line_and_exit_2(argv: list[str], expect: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert expect in err and "Traceback" not in err
    assert err.startswith("attention-dispatch")


def test_shape_error_names_the_option_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--shape", "1,2,3"]) == 2
    err = capsys.readouterr().err
    assert err.count("--shape") == 1 and "got '1,2,3'" in err


def test_console_script_bad_device_no_traceback() -> None:
    """As installed: one line on stderr, exit status 2."""
    device = "cuda" if NO_CUDA else "gpu"
    res = subprocess.run(["attention-dispatch", "explain", "--shape", "1,16,4096,128",
                          "--device", device], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("attention-dispatch ") and f"torch {torch.__version__}" in out


# ----------------------------------------------------------------- help text


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_every_command_examples() -> None:
    subs = _subparsers(build_parser())
    assert set(subs) == {"info", "explain", "bench", "rank", "tune", "cache"}
    for name, sub in subs.items():
        assert sub.epilog and "example" in sub.epilog and f"attention-dispatch {name}" in \
            sub.epilog, name
        for action in sub._actions:
            assert action.help, (name, action.dest)


def test_help_exits_0_and_shows_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "ATTENTION_DISPATCH_AUTOTUNE=0" in out


# ----------------------------------------------------------------- info


def test_info_fits_100_columns(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 100


def test_info_wraps_long_reasons() -> None:
    data = _info.collect()
    data["backends"].append({"backend": "long", "source": "built-in", "device": "cpu",
                             "available": False, "reasons": ["why " * 80]})
    for width in (100, 60):
        text = _info.render(data, width=width)
        assert max(len(line) for line in text.splitlines()) <= width
        assert " ".join(text.split()).count("why") == 80


def test_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["torch"] == torch.__version__ and data["devices"][0] == "cpu"
    rows = {(r["backend"], r["device"]): r for r in data["backends"]}
    assert {name for name, _ in rows} == set(ad.list_backends())
    assert rows[("math", "cpu")]["available"] and "lse" in rows[("math", "cpu")]["features"]
    assert not rows[("sdpa-cudnn", "cpu")]["available"]
    assert "device cpu; allowed: cuda" in rows[("sdpa-cudnn", "cpu")]["reasons"]
    assert data["auto"]["cpu"]["prefill"] == "sdpa-flash"


def test_info_flex_row_is_truthful(capsys: pytest.CaptureFixture[str]) -> None:
    """flex on the CPU: no LSE and no gradients, and the row says so, once."""
    flex = ad.get_backend("flex")
    if flex.probe(torch.device("cpu")):
        pytest.skip("flex unavailable on this CPU")
    caps = flex.capabilities_on(torch.device("cpu"))
    assert not caps.lse and not caps.backward
    assert main(["info", "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out)["backends"]
               if r["backend"] == "flex" and r["device"] == "cpu")
    assert "lse" not in row["features"] and "backward" not in row["features"]
    assert "no LSE" not in row["kernel"] and "window" in row["features"]
    assert main(["info"]) == 0
    after = capsys.readouterr().out.split("\nflex ")[1]
    block = re.split(r"\n(?=\S)", after)[0]  # up to the next backend's line
    assert "lse" not in block and "backward" not in block


# ----------------------------------------------------------------- defaults


def test_explain_default_dtype_is_float32_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--shape", "1,2,16,32"]) == 0
    assert capsys.readouterr().out.startswith("call: cpu float32 ")
    assert main(["explain", "--shape", "1,2,16,32", "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.startswith("call: cpu bfloat16 ")


@pytest.mark.gpu
def test_explain_default_dtype_is_bf16_on_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--shape", "1,2,16,32", "--device", "cuda"]) == 0
    assert capsys.readouterr().out.startswith("call: cuda bfloat16 ")


def test_readme_install_notes() -> None:
    """The CPU wheel index, FA2's --no-build-isolation, both marked as not tested
    here, and the command that works on the test machine kept."""
    readme = " ".join(_readme().split())
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme
    assert 'pip install --no-build-isolation -e ".[flash-attn2]"' in readme
    assert readme.count("*not tested here*") >= 2 and "docs/install.md" in readme
    assert "attention-dispatch bench --quick` took" in readme and "--include-compiling" in readme
    assert "python -m pytest -q -p no:cacheprovider` took" in readme
    install = " ".join((ROOT / "docs" / "install.md").read_text().split())
    assert "--no-build-isolation" in install and "not tested here" in install


def test_readme_command_line_section(capsys: pytest.CaptureFixture[str]) -> None:
    """Every command the README lists exists; the cheap ones run (exit 0), and a
    CUDA-only one exits 2 with one line on a machine without CUDA."""
    section = _readme().split("## Command line")[1].split("\n## ")[0]
    lines = [ln.split("#")[0].split() for ln in section.splitlines()
             if ln.startswith("    attention-dispatch")]
    assert {ln[1] for ln in lines} >= {"info", "explain", "bench", "rank", "tune", "cache",
                                       "--version"}
    for argv in (ln[1:] for ln in lines):
        if argv[0] not in ("info", "explain", "--version"):
            continue  # bench and tune take minutes; test_bench.py runs them
        want = 2 if "cuda" in argv and NO_CUDA else 0
        assert main([a.strip('"') for a in argv if not a.startswith("[")]) == want, argv
        err = capsys.readouterr().err
        assert len(err.splitlines()) == (1 if want else 0), err


def test_docs_cli_covers_every_command() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    for name in _subparsers(build_parser()):
        assert f"\n## {name}\n" in text and f"attention-dispatch {name}" in text, name
    assert "--version" in text and "Exit status" in text
