"""The ``attention-dispatch`` command (also ``python -m attention_dispatch``).

    attention-dispatch info
    attention-dispatch bench [--quick] [--device cuda] [--shapes ...] [--out DIR]
                             [--max-seconds S] [--resume]
    attention-dispatch rank results.json
    attention-dispatch tune --shapes B,H,S,D;... [--device cuda]
    attention-dispatch cache show|clear
    attention-dispatch explain --shape B,H,S,D [--kv-heads N] [--seq-k SK] [--dtype bf16]
                               [--causal] [--mask bool|float|padding] [--device cuda]
                               [--dropout P] [--lse] [--grad] [--layout bhsd|bshd]
                               [--backend NAME[,NAME...]]
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from typing import Optional, Sequence

import torch

from ._dispatch import explain_spec
from .bench import command as bench_command
from ._errors import AttentionDispatchError
from ._registry import REGISTRY, list_backends
from ._select import normalize, resolve
from ._spec import CallSpec

DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp64": torch.float64, "float64": torch.float64}
OPTIONAL_PACKAGES = ("flash-attn-4", "flash-attn", "flash_attn_3", "xformers", "triton",
                     "einops", "packaging")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[torch.device]:
    devs = [torch.device("cpu")]
    if torch.cuda.is_available():
        devs += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devs


def _device_name(d: torch.device) -> str:
    if d.type == "cuda":
        cc = torch.cuda.get_device_capability(d)
        return f"{d} ({torch.cuda.get_device_name(d)}, sm{cc[0]}{cc[1]})"
    return str(d)


def _typical_calls(device: torch.device) -> list[tuple[str, CallSpec]]:
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = dict(device_type=device.type, device_index=device.index, dtype=dt, batch=1,
                heads_q=16, heads_kv=16, seq_q=4096, seq_k=4096, head_dim=128, head_dim_v=128)
    return [
        ("prefill", CallSpec(**base)),
        ("prefill causal, grad", CallSpec(**base, causal=True, requires_grad=True)),
        ("key padding", CallSpec(**base, key_padding=True)),
        ("bool mask", CallSpec(**base, mask_kind="bool")),
        ("dropout 0.1, grad", CallSpec(**base, dropout=True, requires_grad=True)),
        ("decode GQA 32/8", CallSpec(**{**base, "batch": 32, "heads_q": 32, "heads_kv": 8,
                                        "seq_q": 1, "seq_k": 8192}, causal=True)),
    ]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_info(_: argparse.Namespace) -> int:
    cuda = torch.version.cuda or "none"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none"
    print(f"attention-dispatch {_version('attention-dispatch')}")
    print(f"torch {torch.__version__}  CUDA {cuda}  cuDNN {cudnn}")
    print("packages: " + ", ".join(f"{p} {_version(p)}" for p in OPTIONAL_PACKAGES))
    devices = _devices()
    print("devices: " + ", ".join(_device_name(d) for d in devices))
    selection, source = resolve("auto")
    print(f"selection: {','.join(selection)} (from {source})\n")
    rows = [["backend", "source", "device", "status", "kernel / supports"]]
    for name in list_backends():
        inst, err = REGISTRY.load(name)
        for d in devices:
            why = REGISTRY.probe(name, d)
            status = "available" if not why else "unavailable: " + "; ".join(why)
            what = f"{inst.describe()}; {inst.capabilities.summary()}" if inst and not why else ""
            if inst and inst.version_note():
                what += f" (note: {inst.version_note()})"
            rows.append([name, REGISTRY.source(name), d.type, status, what])
    print(_table(rows))
    for d in devices:
        print(f"\nauto on {_device_name(d)}:")
        rows = [["call", "backend"]]
        for label, spec in _typical_calls(d):
            rows.append([label, explain_spec(spec, selection, source).backend or "none"])
        print(_table(rows))
    for name, err in REGISTRY.plugin_errors.items():
        print(f"plugin {name}: {err}")
    return 0


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 4 or min(parts) < 0:
        raise argparse.ArgumentTypeError(f"--shape: expected B,H,S,D; got {text!r}")
    return parts[0], parts[1], parts[2], parts[3]


def cmd_explain(a: argparse.Namespace) -> int:
    b, h, s, d = a.shape
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("warning: CUDA is not available here; every CUDA backend will be refused",
              file=sys.stderr)
    mask_kind = a.mask if a.mask in ("bool", "float") else "none"
    spec = CallSpec(device_type=device.type, device_index=device.index, dtype=DTYPES[a.dtype],
                    batch=b, heads_q=h, heads_kv=a.kv_heads or h, seq_q=s,
                    seq_k=a.seq_k if a.seq_k is not None else s, head_dim=d,
                    head_dim_v=a.head_dim_v or d, layout=a.layout, mask_kind=mask_kind,
                    key_padding=a.mask == "padding", causal=a.causal, dropout=a.dropout > 0,
                    return_lse=a.lse, requires_grad=a.grad)
    if spec.heads_kv == 0 or spec.heads_q % spec.heads_kv:
        print(f"--kv-heads: expected a divisor of {h}; got {spec.heads_kv}", file=sys.stderr)
        return 2
    selection = normalize("--backend", a.backend) if a.backend else resolve("auto")[0]
    print(explain_spec(spec, selection, "--backend" if a.backend else "default"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attention-dispatch",
                                description="Which attention kernel runs, and why.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, backends and auto's choices")
    e = sub.add_parser("explain", help="the decision table for one call")
    e.add_argument("--shape", type=_parse_shape, required=True, help="B,H,S,D of q")
    e.add_argument("--kv-heads", type=int, default=None)
    e.add_argument("--seq-k", type=int, default=None)
    e.add_argument("--head-dim-v", type=int, default=None)
    e.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    e.add_argument("--device", default="cpu")
    e.add_argument("--causal", action="store_true")
    e.add_argument("--mask", choices=["none", "bool", "float", "padding"], default="none")
    e.add_argument("--dropout", type=float, default=0.0)
    e.add_argument("--lse", action="store_true")
    e.add_argument("--grad", action="store_true")
    e.add_argument("--layout", choices=["bhsd", "bshd"], default="bhsd")
    e.add_argument("--backend", default=None, help="name or comma separated list")
    bench_command.add_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"info": cmd_info, "explain": cmd_explain, "bench": bench_command.cmd_bench,
                    "rank": bench_command.cmd_rank, "tune": bench_command.cmd_tune,
                    "cache": bench_command.cmd_cache}
        return commands[args.command](args)
    except AttentionDispatchError as exc:
        print(f"attention-dispatch: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
