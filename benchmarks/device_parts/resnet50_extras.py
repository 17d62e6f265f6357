"""The ``resnet50`` part's side measurements: the batch search, the loader alone, cudnn.benchmark.

Each takes the part's backend factory (``backend(batch)``: a fresh trainer backend of the
paper's classifier), so that they need nothing else from :mod:`device_parts.resnet50_part`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from gpu_throughput import loader_rate, measure, synthetic_batches

from device_parts.context import Context, peak_gib, reset_peak
from device_parts.report import Figure, rate_note

__all__ = ["cudnn_benchmark_figure", "largest_batch", "loader_figures"]


def largest_batch(ctx: Context, backend: Callable[[int], Any], classes: int) -> int:
    """Double the batch from ``batch_start`` until out of memory or the cap (on CUDA).

    Args:
        ctx: The run context (each batch tried goes into ``meta["batch_search"]``).
        backend: A fresh backend at a batch.
        classes: Number of classes of the synthetic labels.

    Returns:
        The largest batch that ran.
    """
    s, dev = ctx.sizes, ctx.device
    best, batch, tried = s.batch_start, s.batch_start, []
    while batch <= s.batch_cap:
        reset_peak(ctx)
        try:
            b = backend(batch)
            rate = measure(
                b,
                synthetic_batches(dev, batch, s.size, classes),
                batch=batch,
                steps=3,
                warmup=2,
                chunk=3,
            )
            tried.append(f"{batch}: {rate.per_s:.0f} img/s, {peak_gib(ctx):.1f} GiB")
            best = batch
            del b
        except torch.OutOfMemoryError:
            tried.append(f"{batch}: out of memory")
            break
        finally:
            torch.cuda.empty_cache()
        batch *= 2
    ctx.report.log("batch search: " + "; ".join(tried))
    ctx.report.meta["batch_search"] = tried
    return best


def loader_figures(
    ctx: Context, batch: int, transform: Any, synth: float, seconds: Callable[[], float]
) -> None:
    """The loader alone (with and without the train transform), and what limits end to end.

    Args:
        ctx: The run context (needs ``ctx.data``).
        batch: The part's batch.
        transform: The trainer's train transform.
        synth: The best synthetic rate, images/s (the diagnosis row needs it, on CUDA).
        seconds: Each measurement's time budget, asked when it starts.
    """
    s, rep = ctx.sizes, ctx.report
    kw = {"warmup": s.e2e_warmup}
    alone = loader_rate(
        ctx.data, ctx.device, batch, s.workers, transform=transform, max_seconds=seconds(), **kw
    )
    raw = loader_rate(ctx.data, ctx.device, batch, s.workers, max_seconds=seconds(), **kw)
    where = f"{s.workers} workers, copy to the device included"
    rep.add(
        Figure(
            "resnet50",
            "loader alone, train transform",
            alone.per_s,
            "img/s",
            note=rate_note(alone, where),
        )
    )
    rep.add(
        Figure(
            "resnet50",
            "loader alone, no transform",
            raw.per_s,
            "img/s",
            note=rate_note(raw, "read, checksum, decode only"),
        )
    )
    if ctx.cuda and alone.per_s and synth:
        per_worker = alone.per_s / s.workers
        need = math.ceil(synth / per_worker)
        verdict = "loader-bound" if alone.per_s < synth else "model-bound"
        note = f"{verdict}: {per_worker:.0f} img/s per worker; the best synthetic rate needs "
        note += f"about {need} workers"
        rep.add(
            Figure(
                "resnet50",
                "loader alone / best synthetic",
                100 * alone.per_s / synth,
                "%",
                note=note,
            )
        )


def cudnn_benchmark_figure(
    ctx: Context, backend: Callable[[int], Any], batch: int, classes: int, seconds: float
) -> None:
    """Synthetic eager with ``cudnn.benchmark`` on: the trainer leaves it off (torch's default).

    Args:
        ctx: The run context.
        backend: A fresh backend at a batch.
        batch: The part's batch.
        classes: Number of classes of the synthetic labels.
        seconds: The measurement's time budget.
    """
    s = ctx.sizes
    torch.backends.cudnn.benchmark = True
    try:
        b = backend(batch)
        rate = measure(
            b,
            synthetic_batches(ctx.device, batch, s.size, classes),
            batch=batch,
            steps=s.steps,
            warmup=s.warmup,
            max_seconds=seconds,
        )
        del b
    finally:
        torch.backends.cudnn.benchmark = False
    note = "the trainer leaves cudnn.benchmark off; " + rate_note(rate)
    ctx.report.add(
        Figure("resnet50", "synthetic eager, cudnn.benchmark=True", rate.per_s, "img/s", note=note)
    )
