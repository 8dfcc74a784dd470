"""The ``attention-dispatch`` command (also ``python -m attention_dispatch``).

    attention-dispatch info [--json]
    attention-dispatch explain --shape B,H,S,D [--kv-heads N] [--seq-k SK] [--dtype DT]
                               [--causal] [--mask bool|float|padding] [--device cpu|cuda]
                               [--dropout P] [--lse] [--grad] [--layout bhsd|bshd]
                               [--backend NAME[,NAME...]] [--deterministic]
                               [--max-extra-bytes N]
    attention-dispatch bench [--quick] [--device cuda] [--shapes ...] [--out DIR]
                             [--max-seconds S] [--resume]
    attention-dispatch rank results.json
    attention-dispatch tune --shapes B,H,S,D;... [--device cuda]
    attention-dispatch cache show|clear
    attention-dispatch --version

Exit status: 0 success, 1 a bench row failed its correctness check, 2 a bad
argument or an unusable device (one line on stderr, never a traceback), 130
interrupted.  See docs/cli.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Optional, Sequence

import torch

from ._core import (AttentionDispatchError, CallSpec, explain_spec, normalize, parse_bytes,
                    resolve)
from ._cli import info as _info
from ._cli.args import (CommandError, Parser, default_device, default_dtype, device_arg,
    float_arg, int_arg, shape_arg)
from .bench import command as bench_command

DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp64": torch.float64, "float64": torch.float64}

INFO_EPILOG = """examples:
  attention-dispatch info
  attention-dispatch info --json > info.json"""

EXPLAIN_EPILOG = """examples:
  attention-dispatch explain --shape 2,8,1024,64 --causal
  attention-dispatch explain --shape 2,8,128,64 --kv-heads 2 --mask padding --seq-k 256
  attention-dispatch explain --shape 1,16,4096,128 --causal --device cuda   # dtype bf16 there
  attention-dispatch explain --shape 1,2,16,32 --backend math,auto"""


def cmd_info(a: argparse.Namespace) -> int:
    data = _info.collect()
    print(json.dumps(data, indent=1) if a.json else _info.render(data))
    return 0


def cmd_explain(a: argparse.Namespace) -> int:
    b, h, s, d = a.shape
    device = a.device
    dtype = a.dtype or default_dtype(device)
    kv_heads = a.kv_heads or h
    if h % kv_heads:
        raise CommandError(f"attention-dispatch explain: error: argument --kv-heads: expected a "
                           f"divisor of H={h}; got {kv_heads}")
    mask_kind = a.mask if a.mask in ("bool", "float") else "none"
    spec = CallSpec(device_type=device.type, device_index=device.index, dtype=DTYPES[dtype],
                    batch=b, heads_q=h, heads_kv=kv_heads, seq_q=s,
                    seq_k=a.seq_k if a.seq_k is not None else s, head_dim=d,
                    head_dim_v=a.head_dim_v or d, layout=a.layout, mask_kind=mask_kind,
                    key_padding=a.mask == "padding", causal=a.causal, dropout=a.dropout > 0,
                    return_lse=a.lse, requires_grad=a.grad, deterministic=a.deterministic,
                    max_extra_bytes=None if a.max_extra_bytes is None else
                    parse_bytes(a.max_extra_bytes, "--max-extra-bytes"))
    selection = normalize("--backend", a.backend) if a.backend else resolve("auto")[0]
    print(fit_decision(str(explain_spec(spec, selection, "--backend" if a.backend else
                                        "default")), _info.output_width()))
    return 0


def fit_decision(text: str, width: int) -> str:
    """A Decision's text with lines longer than ``width`` wrapped: header lines
    indented by 2, table rows under the reasons column."""
    out: list[str] = []
    indent = 2
    for line in text.splitlines():
        if line.startswith("rank  ") and "reasons" in line:
            indent = line.index("reasons")
        if len(line) <= width:
            out.append(line)
            continue
        cut = indent if indent > 2 else 0
        head, rest = (line[:cut], line[cut:]) if cut else ("", line)
        out += textwrap.wrap(rest, width, initial_indent=head, subsequent_indent=" " * indent,
                             break_on_hyphens=False)
    return "\n".join(out)


def _add_explain(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("explain", help="the decision table for one call (nothing runs)",
                       description="Which backend runs one call, and why every other "
                       "backend refuses it. No tensors are allocated.", epilog=EXPLAIN_EPILOG)
    e.add_argument("--shape", type=shape_arg, required=True, metavar="B,H,S,D",
                   help="batch, query heads, query length and head dim of q")
    e.add_argument("--kv-heads", type=int_arg(1), default=None, metavar="N",
                   help="key/value heads (GQA/MQA; a divisor of H; default: H)")
    e.add_argument("--seq-k", type=int_arg(0), default=None, metavar="SK",
                   help="key length (default: S)")
    e.add_argument("--head-dim-v", type=int_arg(1), default=None, metavar="DV",
                   help="head dim of v (default: D)")
    e.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bf16 on cuda, fp32 on cpu")
    e.add_argument("--device", type=device_arg, default=torch.device("cpu"),
                   help="cpu (default), cuda or cuda:N (only where torch sees CUDA)")
    e.add_argument("--causal", action="store_true", help="bottom-right causal mask")
    e.add_argument("--mask", choices=["none", "bool", "float", "padding"], default="none",
                   help="a dense bool or float mask, or a key padding mask (default: none)")
    e.add_argument("--dropout", type=float_arg(0.0, 1.0, "a probability in [0, 1)"),
                   default=0.0, metavar="P", help="dropout probability (default 0)")
    e.add_argument("--lse", action="store_true", help="the call asks for the log-sum-exp")
    e.add_argument("--grad", action="store_true", help="the call needs gradients")
    e.add_argument("--deterministic", action="store_true",
                   help="policy: deterministic kernels only (see docs/selection.md)")
    e.add_argument("--max-extra-bytes", default=None, metavar="N",
                   help="policy: refuse paths allocating more than N extra bytes "
                        "(e.g. 2GiB)")
    e.add_argument("--layout", choices=["bhsd", "bshd"], default="bhsd",
                   help="tensor layout (default: bhsd)")
    e.add_argument("--backend", default=None, metavar="NAME[,NAME...]",
                   help="a forced selection: a name or a comma list, 'auto' allowed "
                   "(default: auto)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (errors raise CommandError)."""
    p = Parser(prog="attention-dispatch", description="Which attention kernel runs, and why.",
               epilog="Run 'attention-dispatch COMMAND --help' for a command's options and "
               "examples.\nExit status: 0 done, 1 a bench row incorrect, 2 a bad argument or an "
               "unusable device,\n130 interrupted.")
    p.add_argument("--version", action="version",
                   version=f"attention-dispatch {_info.version('attention-dispatch')} "
                   f"(torch {torch.__version__})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    i = sub.add_parser("info", help="versions, devices, backends and auto's choices",
                       description="Versions, devices, every backend (available or why "
                       "not) and auto's choice for typical calls.", epilog=INFO_EPILOG)
    i.add_argument("--json", action="store_true", help="print the same facts as JSON")
    _add_explain(sub)
    bench_command.add_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status (see the module docstring)."""
    commands = {"info": cmd_info, "explain": cmd_explain, "bench": bench_command.cmd_bench,
                "rank": bench_command.cmd_rank, "tune": bench_command.cmd_tune,
                "cache": bench_command.cmd_cache}
    try:
        args = build_parser().parse_args(argv)
        if "device" in args and args.device is None:
            args.device = default_device()
        return commands[args.command](args)
    except (CommandError, AttentionDispatchError) as exc:
        print(f"{exc}" if isinstance(exc, CommandError) else f"attention-dispatch: error: {exc}",
              file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `attention-dispatch info --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a file argument (--out, results.json) that cannot be used
        print(f"attention-dispatch: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print("attention-dispatch: interrupted", file=sys.stderr)
        return 130

if __name__ == "__main__":
    sys.exit(main())
