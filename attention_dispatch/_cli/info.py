"""``attention-dispatch info``: versions, devices, backends and auto's picks,
as text that fits the terminal (at most 100 columns; long reasons wrapped) or
as JSON (``--json``)."""

from __future__ import annotations

import shutil
import textwrap
from importlib import metadata
from typing import Any, Optional

import torch

from .._core import CallSpec, REGISTRY, explain_spec, list_backends, resolve


OPTIONAL_PACKAGES = ("flash-attn-4", "flash-attn", "flash_attn_3", "xformers", "triton",
                     "einops", "packaging")
MAX_WIDTH = 100
_NAME_W, _DEV_W = 20, 8


def version(dist: str) -> Optional[str]:
    """The installed version of distribution ``dist``, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def devices() -> list[torch.device]:
    """The CPU, then every CUDA device torch sees."""
    devs = [torch.device("cpu")]
    if torch.cuda.is_available():
        devs += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devs


def device_name(d: torch.device) -> str:
    if d.type == "cuda":
        cc = torch.cuda.get_device_capability(d)
        return f"{d} ({torch.cuda.get_device_name(d)}, sm{cc[0]}{cc[1]})"
    return str(d)


def typical_calls(device: torch.device) -> list[tuple[str, CallSpec]]:
    """A few calls whose auto choice info reports (bf16 on CUDA, fp32 on the CPU)."""
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


def _backend_row(name: str, d: torch.device) -> dict[str, Any]:
    """One backend on one device, as data."""
    inst, err = REGISTRY.load(name)
    why = REGISTRY.probe(name, d)
    row: dict[str, Any] = {"backend": name, "source": REGISTRY.source(name), "device": str(d),
                           "available": not why, "reasons": list(why)}
    if inst is not None and not why:
        caps = inst.capabilities_on(d)
        row.update(kernel=inst.describe(), dtypes=caps.dtype_names(),
                   max_head_dim=caps.max_head_dim if caps.max_head_dim < (1 << 30) else None,
                   features=caps.features())
    note = inst.version_note() if inst is not None else None
    if note:
        row["note"] = note
    return row


def collect() -> dict[str, Any]:
    """Everything info reports, as JSON-ready data."""
    selection, source = resolve("auto")
    devs = devices()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "attention_dispatch": version("attention-dispatch"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
        "packages": {p: version(p) for p in OPTIONAL_PACKAGES},
        "devices": [device_name(d) for d in devs],
        "selection": list(selection), "selection_source": source,
        "backends": [_backend_row(n, d) for n in list_backends() for d in devs],
        "auto": {str(d): {label: explain_spec(spec, selection, source).backend
                          for label, spec in typical_calls(d)} for d in devs},
        "plugin_errors": dict(REGISTRY.plugin_errors),
    }


def _wrap(text: str, width: int, indent: int = 0, first: str = "") -> list[str]:
    """``first`` + ``text`` wrapped to ``width``, continuation lines indented."""
    return textwrap.wrap(text, width, initial_indent=first or " " * indent,
                         subsequent_indent=" " * indent, break_on_hyphens=False) or [first]


def _backend_lines(row: dict[str, Any], width: int) -> list[str]:
    """A backend row: name, device, status, then wrapped details under the status."""
    head = f"{row['backend']:<{_NAME_W}}{row['device']:<{_DEV_W}}"
    pad = len(head)
    if not row["available"]:
        return _wrap("unavailable: " + "; ".join(row["reasons"]), width, pad, head)
    lines = _wrap("available: " + row["kernel"], width, pad, head)
    dims = f"D <= {row['max_head_dim']}" if row["max_head_dim"] else "any D"
    lines += _wrap(f"supports: {'/'.join(row['dtypes'])}; {dims}; "
                   + ", ".join(row["features"]), width, pad)
    if row["source"] != "built-in":
        lines += _wrap("from: " + row["source"], width, pad)
    if row.get("note"):
        lines += _wrap("note: " + row["note"], width, pad)
    return lines


def output_width() -> int:
    """Output width: the terminal's, at most 100, at least 60 (100 in a log)."""
    return max(60, min(MAX_WIDTH, shutil.get_terminal_size((MAX_WIDTH, 24)).columns))


def render(data: dict[str, Any], width: Optional[int] = None) -> str:
    """The text form of :func:`collect`'s data, no line longer than ``width``
    (default: :func:`output_width`)."""
    width = width or output_width()
    pkgs = ", ".join(f"{p} {v or 'not installed'}" for p, v in data["packages"].items())
    out = [f"attention-dispatch {data['attention_dispatch'] or 'not installed'}",
           f"torch {data['torch']}  CUDA {data['cuda'] or 'none'}  cuDNN {data['cudnn'] or 'none'}"]
    out += _wrap(pkgs, width, 2, "packages: ")
    out += _wrap(", ".join(data["devices"]), width, 2, "devices: ")
    out += [f"selection: {','.join(data['selection'])} (from {data['selection_source']})", "",
            f"{'backend':<{_NAME_W}}{'device':<{_DEV_W}}status, kernel and features"]
    for row in data["backends"]:
        out += _backend_lines(row, width)
    for dev, picks in data["auto"].items():
        out += ["", f"auto on {dev}:", f"  {'call':<22}backend"]
        out += [f"  {label:<22}{name or 'none'}" for label, name in picks.items()]
    for name, err in data["plugin_errors"].items():
        out += _wrap(f"plugin {name}: {err}", width, 2)
    return "\n".join(out)
