"""What every part of the device check gets: the :class:`Context` and its :class:`Clock`.

Also the helpers the parts share: the guard that turns a part's failure into an error row, the
GPU's peak memory, and the paper's stage configs at the run's size and precision.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from device_parts.report import NO_CUDA, Figure, Report, short_error
from device_parts.sizes import SHARE, Sizes

__all__ = [
    "Clock",
    "Context",
    "guard_part",
    "peak_gib",
    "precision_overrides",
    "reset_peak",
    "stage_config",
    "unjudged",
]


class Clock:
    """The run's deadline, handed out to the parts in shares.

    Args:
        budget: Seconds for the whole run.
    """

    def __init__(self, budget: float) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + budget

    def left(self) -> float:
        """Seconds left of the whole budget."""
        return self.deadline - time.monotonic()

    def share(self, part: str) -> float:
        """The seconds ``part`` may use from now: its share of what is left."""
        return max(0.0, self.left() * SHARE.get(part, 0.5))

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.monotonic() - self.start


@dataclass
class Context:
    """What every part gets: where, how big, the configs, the shard sets.

    Attributes:
        report: The report.
        sizes: The run's sizes.
        device: Where the model parts run.
        work: Scratch folder (shard sets, run directories).
        clock: The deadline.
        pipe: The paper's pipeline config (``trainer.experiment.config.PipelineConfig``).
        data: The main shard set (None until made).
        enhance_data: The set ``enhance`` is timed on.
    """

    report: Report
    sizes: Sizes
    device: torch.device
    work: Path
    clock: Clock
    pipe: Any
    data: Path | None = None
    enhance_data: Path | None = None

    @property
    def cuda(self) -> bool:
        """Whether the device is a GPU."""
        return self.device.type == "cuda"

    @property
    def judged(self) -> bool:
        """Whether the targets apply: they are for the full size on a GPU."""
        return self.cuda and self.sizes.search


def unjudged(ctx: Context) -> str:
    """The result of a target figure that is not judged here, and why."""
    return NO_CUDA if not ctx.cuda else "info (target is for the full size)"


def reset_peak(ctx: Context) -> None:
    """Start a fresh peak of GPU memory (nothing on a CPU)."""
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)


def peak_gib(ctx: Context) -> float | None:
    """The GPU's peak allocated memory since :func:`reset_peak`, in GiB (None on a CPU)."""
    return torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.cuda else None


@contextmanager
def guard_part(ctx: Context, part: str) -> Iterator[None]:
    """Run one part: log its start and end, turn an exception into an error row, save."""
    left = ctx.clock.left()
    ctx.report.log(f"== {part} (at {ctx.clock.elapsed():.0f} s, {left:.0f} s left)", echo=True)
    t0 = time.monotonic()
    try:
        yield
    except Exception as exc:  # one part's failure must not hide the others' figures
        ctx.report.log(traceback.format_exc())
        ctx.report.add(Figure(part, "part failed", None, result=f"error ({short_error(exc)})"))
    finally:
        seconds = time.monotonic() - t0
        ctx.report.meta.setdefault("part_seconds", {})[part] = round(seconds, 1)
        ctx.report.log(f"== {part} done in {seconds:.1f} s", echo=True)
        if ctx.cuda:
            torch.cuda.empty_cache()
        ctx.report.save()


def stage_config(ctx: Context, stage: str, extra: list[str]) -> Any:
    """The trainer config (``TrainConfig``) of one of the paper's stages, classify or sr."""
    from trainer.experiment.config import trainer_config

    return trainer_config(
        getattr(ctx.pipe, stage), [f"data.root={ctx.data}", *extra, *precision_overrides(ctx)]
    )


def precision_overrides(ctx: Context) -> list[str]:
    """The override of the run's precision, if it has its own (``--tiny``)."""
    return [f"train.precision={ctx.sizes.precision}"] if ctx.sizes.precision else []
