"""Progress of a long loop on stderr, suited to where stderr goes.

* a terminal: a live ``tqdm`` bar (the ``bench`` extra installs tqdm; it is
  imported only here, when a bar is shown);
* a log file or pipe (or a terminal without tqdm): a plain line at the start,
  then at most one every ``interval`` seconds, and one at the end, so a log
  reads as lines and never as one long carriage-returned line.

The time left is shown only once a step has finished ("?" before that), as
elapsed / steps done * steps left.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO


def _seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """``start(label)`` before each step, ``done()`` after it, ``close(note)`` at the end.

    Args:
        total: number of steps.
        what: the unit shown ("cases").
        stream: where to write (default ``sys.stderr``).
        interval: seconds between two plain lines (logs).
        bar: True/False forces the live bar on or off; None: only on a terminal.
    """

    def __init__(self, total: int, what: str = "cases", stream: Optional[TextIO] = None,
                 interval: float = 5.0, bar: Optional[bool] = None) -> None:
        self.total, self.what, self.interval = total, what, interval
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self.label = ""
        self._t0 = time.monotonic()
        self._last: Optional[float] = None
        self._bar: Any = None
        if bar is None:
            bar = bool(getattr(self.stream, "isatty", lambda: False)())
        if bar:
            self._bar = _tqdm_bar(total, what, self.stream)

    def eta(self) -> Optional[float]:
        """Seconds left, from the steps done so far; None before the first one."""
        if not self.count:
            return None
        return (time.monotonic() - self._t0) / self.count * (self.total - self.count)

    def line(self) -> str:
        """The plain progress line for a log."""
        eta = self.eta()
        left = "?" if eta is None else _seconds(eta)
        return (f"{self.count}/{self.total} {self.what}, "
                f"{_seconds(time.monotonic() - self._t0)} elapsed, about {left} left"
                + (f"; {self.label}" if self.label else ""))

    def _maybe_line(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or self._last is None or now - self._last >= self.interval:
            self._last = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def start(self, label: str) -> None:
        """A step begins (its label is shown)."""
        self.label = label
        if self._bar is not None:
            self._bar.set_postfix_str(label[:50], refresh=True)
        else:
            self._maybe_line()

    def done(self) -> None:
        """The step that began last is finished."""
        self.count += 1
        if self._bar is not None:
            self._bar.update(1)

    def close(self, note: str = "done") -> None:
        """End the display (``note``: e.g. "done" or "stopped: time limit")."""
        self.label = note
        if self._bar is not None:
            self._bar.set_postfix_str(note, refresh=False)
            self._bar.close()
            self._bar = None
        else:
            self._maybe_line(force=True)


def _tqdm_bar(total: int, what: str, stream: TextIO) -> Any:
    """A tqdm bar, or None when tqdm is not installed (plain lines then)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit=what.rstrip("s") or "step", file=stream, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")
