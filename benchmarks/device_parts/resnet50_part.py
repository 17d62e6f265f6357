"""The device check's ``resnet50`` part: the paper's classifier, synthetic against end to end.

The classifier of ``configs/paper.yaml`` (its classify stage: ``configs/classify.yaml`` plus the
paper's overrides, built through ``trainer.factories`` and ``trainer.backend``). The largest
batch that fits, then images/s on synthetic on-device data and end to end from the shards
through ``shards.loader`` (the trainer's own train transform), eager and under
``torch.compile``; peak GPU memory; the targets of issue 18. The side measurements (batch
search, the loader alone, ``cudnn.benchmark``) are in :mod:`device_parts.resnet50_extras`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from gpu_throughput import Rate, build_backend, measure, shard_batches, synthetic_batches

from device_parts.context import Context, peak_gib, reset_peak, stage_config, unjudged
from device_parts.report import NO_CUDA, Figure, rate_note, verdict
from device_parts.resnet50_extras import cudnn_benchmark_figure, largest_batch, loader_figures

__all__ = ["E2E_TARGET", "RATIO_TARGET", "Classifier", "part_resnet50"]

E2E_TARGET = 3000.0  # images/s end to end on one H200 (issue 18)
RATIO_TARGET = 97.0  # end to end as % of synthetic


@dataclass
class Classifier:
    """The paper's classify stage as every measurement of the part builds it.

    Attributes:
        ctx: The run context.
        cfg: The stage's trainer config (``TrainConfig``).
        classes: Number of classes in the shard set.
        transform: The trainer's train transform (with augmentation).
        what: Model, size, precision and layout, for the notes.
        budget_end: When the part's share of the time is up (``time.monotonic``).
    """

    ctx: Context
    cfg: Any
    classes: int
    transform: Any
    what: str
    budget_end: float

    def backend(self, batch: int, compiled: bool = False) -> Any:
        """A fresh trainer backend of the stage's model at ``batch`` (compiled or eager)."""
        cfg = self.cfg
        model = dataclasses.replace(cfg.model, compile=compiled)
        return build_backend(
            model,
            cfg.optim,
            cfg.train,
            cfg.backend,
            device=self.ctx.device,
            batch=batch,
            num_classes=self.classes,
            seed=cfg.train.seed,
        )

    def seconds(self) -> float:
        """Each timed measurement's share of the part's budget."""
        return max(1.0, min(self.ctx.sizes.seconds, (self.budget_end - time.monotonic()) / 6))


def part_resnet50(ctx: Context) -> None:
    """ResNet50 as the paper's classify stage builds it: batch search, synthetic vs end to end.

    Args:
        ctx: The run context (needs ``ctx.data``).
    """
    s = ctx.sizes
    net = _classifier(ctx)
    searched = s.search and ctx.cuda
    batch = largest_batch(ctx, net.backend, net.classes) if searched else s.batch_start
    how = f"doubling from {s.batch_start} to the cap {s.batch_cap}; search in results.json"
    ctx.report.add(
        Figure(
            "resnet50",
            "batch (largest that fits)" if searched else "batch",
            batch,
            "images",
            note=how if searched else "fixed (no search)",
        )
    )
    best_synth = 0.0
    for compiled in (False, True) if s.compile and ctx.cuda else (False,):
        if compiled and time.monotonic() > net.budget_end - 40:
            skipped = Figure("resnet50", "torch.compile runs", None, result="skipped (time budget)")
            ctx.report.add(skipped)
            break
        best_synth = max(best_synth, _time_mode(net, batch, compiled))
    if not (s.compile and ctx.cuda):
        why = NO_CUDA if not ctx.cuda else "skipped (--tiny)"
        ctx.report.add(Figure("resnet50", "torch.compile runs", None, result=why))
    loader_figures(ctx, batch, net.transform, best_synth, net.seconds)
    if ctx.cuda and time.monotonic() < net.budget_end - 15:
        cudnn_benchmark_figure(ctx, net.backend, batch, net.classes, net.seconds())


def _classifier(ctx: Context) -> Classifier:
    """The paper's classify stage at the run's size, its classes and train transform."""
    from shards.format import read_index
    from trainer.task import create_task

    budget_end = time.monotonic() + ctx.clock.share("resnet50")
    cfg = stage_config(ctx, "classify", ["task=classify", "data.inputs=hr"])
    classes = list(read_index(ctx.data).classes)
    transform = create_task(cfg, classes).transform(True)  # the trainer's train transform
    what = f"{cfg.model.name} {ctx.sizes.size} px {cfg.train.precision}"
    what += f" channels_last={cfg.model.channels_last}"
    ctx.report.log(f"resnet50: {what}; model {cfg.model}; optim {cfg.optim}; train {cfg.train}")
    return Classifier(ctx, cfg, len(classes), transform, what, budget_end)


def _time_mode(net: Classifier, batch: int, compiled: bool) -> float:
    """Synthetic and end to end in one mode (eager or compiled), and its rows.

    Returns:
        The synthetic rate, images/s.
    """
    ctx, s = net.ctx, net.ctx.sizes
    reset_peak(ctx)
    b = net.backend(batch, compiled)
    if compiled:  # the first step compiles forward and backward: timed on its own
        _time_first_step(net, b, batch)
    synth = measure(
        b,
        synthetic_batches(ctx.device, batch, s.size, net.classes),
        max_seconds=net.seconds(),
        batch=batch,
        steps=s.steps,
        warmup=s.warmup,
    )
    e2e_batches = shard_batches(
        ctx.data,
        ctx.device,
        batch,
        s.workers,
        transform=net.transform,
        seed=net.cfg.train.seed,
        epochs=1,
    )
    e2e = measure(
        b,
        e2e_batches,
        max_seconds=net.seconds(),
        batch=batch,
        steps=s.e2e_steps,
        warmup=s.e2e_warmup,
    )
    peak = peak_gib(ctx)
    del b, e2e_batches
    _mode_rows(net, batch, "compiled" if compiled else "eager", synth, e2e, peak)
    return synth.per_s


def _time_first_step(net: Classifier, b: Any, batch: int) -> None:
    """Time the first compiled step on its own (it compiles forward and backward)."""
    ctx = net.ctx
    t0 = time.perf_counter()
    measure(
        b,
        synthetic_batches(ctx.device, batch, ctx.sizes.size, net.classes),
        batch=batch,
        steps=1,
        warmup=0,
    )
    ctx.report.add(
        Figure(
            "resnet50",
            "torch.compile: first step",
            time.perf_counter() - t0,
            "s",
            note="compiles forward and backward",
        )
    )


def _mode_rows(
    net: Classifier, batch: int, tag: str, synth: Rate, e2e: Rate, peak: float | None
) -> None:
    """One mode's rows: synthetic, end to end (against its target), their ratio, peak memory."""
    ctx, rep = net.ctx, net.ctx.report
    rep.add(
        Figure(
            "resnet50",
            f"synthetic on device, {tag}",
            synth.per_s,
            "img/s",
            note=f"{net.what}, batch {batch}; {rate_note(synth)}",
        )
    )
    where = f"{ctx.sizes.workers} workers, pinned={ctx.cuda}, within one epoch"
    rep.add(
        Figure(
            "resnet50",
            f"end to end from shards, {tag}",
            e2e.per_s,
            "img/s",
            f">= {E2E_TARGET:,.0f}",
            verdict(e2e.per_s >= E2E_TARGET) if ctx.judged else unjudged(ctx),
            rate_note(e2e, where),
        )
    )
    ratio = 100 * e2e.per_s / synth.per_s if synth.per_s else 0.0
    rep.add(
        Figure(
            "resnet50",
            f"end to end / synthetic, {tag}",
            ratio,
            "%",
            f">= {RATIO_TARGET:.0f}%",
            verdict(ratio >= RATIO_TARGET) if ctx.judged else unjudged(ctx),
        )
    )
    rep.add(
        Figure(
            "resnet50",
            f"peak GPU memory, {tag}",
            peak,
            "GiB",
            result="info" if ctx.cuda else NO_CUDA,
            note="torch.cuda.max_memory_allocated" if ctx.cuda else "",
        )
    )
