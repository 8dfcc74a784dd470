"""Argument types and the parser class of the ``attention-dispatch`` command.

Every bad argument becomes :class:`CommandError`: ``cli.main`` prints it as one
line on stderr and exits with status 2 (no usage dump, no traceback).
"""

from __future__ import annotations

import argparse
import difflib
import textwrap
from typing import Callable, NoReturn, Optional

import torch



class CommandError(Exception):
    """A bad command-line argument or an unusable device: one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (see :class:`CommandError`)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        """As ArgumentParser; the description is wrapped to 88 columns, the epilog
        (examples) is printed as written."""
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        if isinstance(kwargs.get("description"), str):
            kwargs["description"] = textwrap.fill(str(kwargs["description"]), 88)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        raise CommandError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def device_arg(text: str) -> torch.device:
    """``--device``: cpu, cuda or cuda:N, and only a device this machine has.

    Raises:
        argparse.ArgumentTypeError: not a device name ("gpu" suggests cuda), a
            device type other than cpu/cuda, or a CUDA device that is not here.
    """
    try:
        dev = torch.device(text.strip().lower())
    except (RuntimeError, ValueError):
        close = difflib.get_close_matches(text.strip().lower(), ["cpu", "cuda"], n=1)
        hint = "cuda" if text.strip().lower().startswith(("gpu", "nvidia")) else \
            (close[0] if close else "")
        raise argparse.ArgumentTypeError(
            f"expected cpu, cuda or cuda:N; got {text!r}"
            + (f" (did you mean {hint!r}?)" if hint else "")) from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N; got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA" if torch.version.cuda is None
                   else "torch sees no CUDA device")
            raise argparse.ArgumentTypeError(
                f"{text!r}: CUDA is not available here ({why}: torch {torch.__version__}); "
                "use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}")
    return dev


def default_device() -> torch.device:
    """cuda when torch sees a CUDA device, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> str:
    """The default --dtype: bf16 on CUDA, fp32 on the CPU (where half precision
    is slow and several kernels refuse it)."""
    return "bf16" if device.type == "cuda" else "fp32"


def _ints(text: str, n: Optional[int], what: str) -> list[int]:
    try:
        nums = [int(p) for p in text.split(",")]
    except ValueError:
        nums = []
    if not nums or (n is not None and len(nums) != n) or min(nums) < 0:
        raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}")
    return nums


def shape_arg(text: str) -> tuple[int, int, int, int]:
    """``--shape B,H,S,D``: four integers >= 0, H and D >= 1."""
    b, h, s, d = _ints(text, 4, "B,H,S,D (four integers >= 0, e.g. 1,16,4096,128)")
    if h < 1 or d < 1:
        raise argparse.ArgumentTypeError(f"expected H >= 1 and D >= 1 in B,H,S,D; got {text!r}")
    return b, h, s, d


def shapes_arg(text: str) -> str:
    """``--shapes``: a preset (quick, default, decode) or B,H,S,D;B,H,S,D;..."""
    if text in ("quick", "default", "decode"):
        return text
    for part in text.split(";"):
        try:
            nums = [int(p) for p in part.split(",")]
        except ValueError:
            nums = []
        if len(nums) != 4 or min(nums) < 1:
            raise argparse.ArgumentTypeError(
                "expected quick, default, decode or B,H,S,D;B,H,S,D;... (four integers >= 1 "
                f"each); got {text!r}")
    return text


def list_arg(allowed: tuple[str, ...]) -> Callable[[str], str]:
    """A comma-separated list of values from ``allowed`` (returned as given)."""
    def check(text: str) -> str:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of {', '.join(allowed)}; got {text!r}")
        return ",".join(items)

    check.__name__ = "list"
    return check


def int_arg(minimum: int) -> Callable[[str], int]:
    """An integer >= ``minimum``."""
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}; got {text!r}")
        return value

    check.__name__ = "integer"
    return check


def float_arg(low: float, high: float, what: str) -> Callable[[str], float]:
    """A float in [low, high)."""
    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not low <= value < high:
            raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}")
        return value

    check.__name__ = "number"
    return check
