"""The device check's shard sets, made by the project's ingest from the paper's ``data`` section.

Built-in synthetic data at the run's size; only the count and the split fractions change, so
that the train split holds enough batches of the largest batch for one timed epoch.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from device_parts.context import Context
from device_parts.environment import PAPER
from device_parts.report import Figure

__all__ = ["make_data"]


def make_data(ctx: Context) -> None:
    """Make the shard sets with the project's ingest from the paper's ``data`` section.

    Args:
        ctx: The run context (``ctx.data`` and ``ctx.enhance_data`` are set here).
    """
    s = ctx.sizes
    workers = max(1, (os.cpu_count() or 2) - 1) if ctx.cuda else 1
    ctx.data = _ingest_one(ctx, "shards", s.samples, workers)
    if s.enhance_samples:
        ctx.enhance_data = _ingest_one(ctx, "shards-enhance", s.enhance_samples, workers)
    else:
        ctx.enhance_data = ctx.data


def _ingest_one(ctx: Context, name: str, n: int, workers: int) -> Path:
    """Ingest one set of ``n`` slices into ``ctx.work / name`` and add its row."""
    from shards.ingest import ingest

    out = ctx.work / name
    data = dataclasses.replace(_paper_data(ctx, n), out=str(out), workers=workers)
    t0 = time.perf_counter()
    result = ingest(data, log=ctx.report.log)
    seconds = time.perf_counter() - t0
    counts: dict[str, int] = {}
    for info in result.index.shards:
        counts[info.split] = counts.get(info.split, 0) + info.count
    note = f"{seconds:.1f} s, {workers} workers; splits {counts}"
    ctx.report.add(
        Figure(
            "data",
            f"ingest {name}: {n} slices, {ctx.sizes.size} px",
            n / seconds,
            "slices/s",
            note=note,
        )
    )
    return out


def _paper_data(ctx: Context, n: int) -> Any:
    """The paper's ``data`` section (an ``IngestConfig``) at ``n`` slices of the run's size."""
    from trainer.experiment.config import load_pipeline_config

    s = ctx.sizes
    overrides = [
        f"data.synth.n={n}",
        f"data.preprocess.size={s.size}",
        f"data.split.val_fraction={s.val_fraction}",
        f"data.split.test_fraction={s.val_fraction}",
    ]
    if s.slices_per_subject:
        overrides.append(f"data.synth.slices_per_subject={s.slices_per_subject}")
    return load_pipeline_config(str(PAPER), overrides).data
