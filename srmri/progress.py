"""Progress that reads well on a terminal and in a log file alike.

On a terminal it is tqdm's bar, redrawn in place. Anywhere else (a log file, a pipe, Slurm's
output file) every redraw of a bar would stay in the file as one more carriage-return frame,
so there the same calls print one plain line per interval instead (``desc: n/total (pct)
key=value ...``): every ``LOG_INTERVAL_S`` seconds, at each :meth:`LineProgress.refresh` (the
trainer's ``train.log_every`` steps), and a last one when the work ends. Both write to
standard error, as tqdm does.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, Protocol, TextIO

from tqdm import tqdm

__all__ = ["LOG_INTERVAL_S", "LineProgress", "Progress", "progress"]

# Long enough that an hour of training is ~120 lines, short enough to see a stalled job.
LOG_INTERVAL_S = 30.0


class Progress(Protocol):
    """What :func:`progress` returns (tqdm's bar, or a :class:`LineProgress`)."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, **values: Any) -> Any: ...

    def refresh(self) -> Any: ...

    def close(self) -> Any: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> Any: ...


class LineProgress:
    """A progress report of one line per ``interval_s`` seconds, for files and pipes.

    Args:
        total: Units of work in all.
        desc: What the work is (the line's prefix).
        initial: Units already done (a resumed epoch).
        unit: Name of a unit (shown in the rate).
        interval_s: Least seconds between two lines (the last line is always printed).
        file: Where the lines go.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        initial: int = 0,
        unit: str = "it",
        interval_s: float = LOG_INTERVAL_S,
        file: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.n, self.unit = total, desc, initial, unit
        self.interval_s = interval_s
        self.file = file if file is not None else sys.stderr
        self.postfix: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._start_n = initial
        self._printed_n = -1
        self._closed = False

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done; print a line when the interval has passed."""
        self.n += n
        if time.monotonic() - self._last >= self.interval_s:
            self._print()

    def set_postfix(self, **values: Any) -> None:
        """Values shown at the end of the next line (loss, learning rate, ...)."""
        self.postfix = dict(values)

    def refresh(self) -> None:
        """Print a line now (the trainer calls it at each of its log intervals)."""
        self._print()

    def close(self) -> None:
        """Print the last line (once, and only if the count moved since the line before)."""
        if not self._closed:
            self._closed = True
            if self.n != self._printed_n:
                self._print()

    def line(self) -> str:
        """The line that would be printed now."""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        elapsed = time.monotonic() - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        return f"{self.desc}: {self.n}/{self.total}{pct} {rate:.1f} {self.unit}/s{extra}"

    def _print(self) -> None:
        self._last, self._printed_n = time.monotonic(), self.n
        print(self.line(), file=self.file, flush=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def progress(
    total: int,
    desc: str,
    *,
    initial: int = 0,
    unit: str = "it",
    disable: bool = False,
    file: TextIO | None = None,
) -> Progress:
    """A progress report for ``total`` units of work: a bar on a terminal, lines elsewhere.

    Args:
        total: Units of work in all.
        desc: What the work is.
        initial: Units already done.
        unit: Name of a unit.
        disable: Report nothing (for instance on every rank but 0).
        file: The stream (standard error by default); whether it is a terminal decides.

    Returns:
        A context manager with ``update``, ``set_postfix`` and ``close``.
    """
    stream = file if file is not None else sys.stderr
    if disable or stream.isatty():
        return tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            disable=disable,
            dynamic_ncols=True,
            file=stream,
        )
    return LineProgress(total, desc, initial=initial, unit=unit, file=stream)
