"""The device check's rows: :class:`Figure`, the :class:`Report` that saves them, the table.

Nothing here imports torch, so that ``device_check.py --report DIR`` prints a saved table
without waiting for it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpu_throughput import Rate

__all__ = [
    "NO_CUDA",
    "Figure",
    "Report",
    "format_table",
    "print_report",
    "rate_note",
    "short_error",
    "verdict",
]

NO_CUDA = "n/a (no CUDA)"


@dataclass
class Figure:
    """One row of the table.

    Attributes:
        part: Which part measured it.
        name: What it is.
        value: The figure (None where it could not be measured).
        unit: Its unit.
        target: What it should reach ("" for none).
        result: ``pass``, ``fail``, ``info``, ``n/a (no CUDA)``, ``skipped (why)`` or
            ``error (why)``.
        note: Detail (spread, settings, diagnosis).
    """

    part: str
    name: str
    value: float | None
    unit: str = ""
    target: str = ""
    result: str = "info"
    note: str = ""


@dataclass
class Report:
    """The figures, the environment and the log of one run.

    Attributes:
        out: Output folder.
        figures: Every row so far.
        meta: Environment, command and timings.
    """

    out: Path
    figures: list[Figure] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self._log: IO[str] = open(self.out / "device_check.log", "a", buffering=1)  # noqa: SIM115

    def log(self, message: str, echo: bool = False) -> None:
        """Append a line to ``device_check.log`` (and print it with ``echo``).

        Args:
            message: The line.
            echo: Also print it (progress lines; the table comes last).
        """
        stamp = time.strftime("%H:%M:%S")
        self._log.write(f"[{stamp}] {message}\n")
        if echo:
            print(f"[{stamp}] {message}", flush=True)

    def add(self, figure: Figure) -> Figure:
        """Record a row (and log it); returns it."""
        self.figures.append(figure)
        value = "-" if figure.value is None else f"{figure.value:.6g}"
        self.log(
            f"figure {figure.part} | {figure.name} = {value} {figure.unit} "
            f"[{figure.result}] {figure.note}"
        )
        return figure

    def save(self) -> Path:
        """Write ``results.json`` (all figures so far, atomically); returns its path."""
        path = self.out / "results.json"
        data = {"meta": self.meta, "figures": [dataclasses.asdict(f) for f in self.figures]}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(path)
        return path

    def close(self) -> None:
        """Close the log file."""
        self._log.close()


def format_table(figures: list[Figure]) -> str:
    """The one table: part, figure, value, unit, target, result (a row's note under it).

    Args:
        figures: The rows.

    Returns:
        The table as plain text.
    """
    head = ("part", "figure", "value", "unit", "target", "result")
    rows = [
        (
            f.part,
            f.name,
            "-" if f.value is None else _fmt(f.value),
            f.unit,
            f.target or "-",
            f.result,
        )
        for f in figures
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [line(head), line(tuple("-" * w for w in widths))]
    for f, r in zip(figures, rows):
        out.append(line(r))
        if f.note:
            out.append(" " * (widths[0] + 2) + f"  ({f.note})")
    return "\n".join(out)


def _fmt(value: float) -> str:
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 0.01 else f"{value:.2e}"


def verdict(ok: bool) -> str:
    """``pass`` or ``fail``."""
    return "pass" if ok else "fail"


def rate_note(rate: Rate, extra: str = "") -> str:
    """A timed rate's note: steps, seconds and the spread of its chunks (then ``extra``)."""
    lo, med, hi = rate.spread()
    note = f"{rate.steps} steps in {rate.seconds:.1f} s; chunks min/median/max "
    note += f"{lo:.0f}/{med:.0f}/{hi:.0f}"
    return f"{note}; {extra}" if extra else note


def short_error(exc: BaseException) -> str:
    """An exception as one short line (an error row's result)."""
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:160]


def print_report(out: Path) -> int:
    """Print the table of ``out/results.json``.

    Args:
        out: The output folder of a run.

    Returns:
        0, or 1 when there is no ``results.json``.
    """
    path = out / "results.json"
    if not path.is_file():
        print(f"no {path}", file=sys.stderr)
        return 1
    data = json.loads(path.read_text())
    meta = data.get("meta", {})
    print(
        f"\ndevice check, {meta.get('date', '?')}, {meta.get('device', '?')}, "
        f"{meta.get('wall_seconds', '?')} s: {meta.get('command', '')}"
    )
    print(format_table([Figure(**f) for f in data["figures"]]))
    return 0
