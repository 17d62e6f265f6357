"""The device check's ``paper`` part: ``python -m trainer fit`` of the paper's two stages.

The classify stage (50 steps on the device) and the SR stage (30) on the built-in synthetic
shard set at the run's size: the real configuration runs. Each fit's log is one of the files
the device returns (``fit_classify.log``, ``fit_sr.log``).
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

import torch

from device_parts.context import Context, precision_overrides
from device_parts.logged import Logged, LoggedCall
from device_parts.report import Figure, verdict

__all__ = ["part_paper"]


def part_paper(ctx: Context) -> None:
    """``python -m trainer fit`` of the paper's classify and SR stages, a few dozen steps each.

    One after the other (their rates stay apart): on the device as children, each under its
    time budget; with ``--tiny`` the same command lines in this process
    (``Sizes.fits_in_process``), since a child would spend most of its time importing torch
    and timm.

    Args:
        ctx: The run context (needs ``ctx.data``).
    """
    s = ctx.sizes
    budget_end = time.monotonic() + ctx.clock.share("paper")
    for stage, steps in (("classify", s.fit_steps), ("sr", s.sr_fit_steps)):
        left = budget_end - time.monotonic()
        fit = _start_fit(ctx, stage, steps)
        _finish_fit(ctx, stage, steps, fit, left / 2 if stage == "classify" else left)


def _fit_command(ctx: Context, stage: str, steps: int) -> list[str]:
    """``python -m trainer fit`` of one of the paper's stages, cut to ``steps`` steps."""
    s = ctx.sizes
    cfg_stage = getattr(ctx.pipe, stage)
    # The stage's YAML and the paper's overrides, then what places and shortens the run.
    extra = [
        f"data.root={ctx.data}",
        f"out_dir={ctx.work / 'runs'}",
        f"name=paper-{stage}",
        f"task={stage}",
        "train.epochs=1",
        f"train.max_steps_per_epoch={steps}",
        f"train.log_every={max(1, steps // 5)}",
    ]
    if stage == "classify":
        extra.append("data.inputs=hr")
    extra += precision_overrides(ctx)
    if s.fit_batch:
        extra += [
            f"data.batch_size={s.fit_batch}",
            f"data.eval_batch_size={s.fit_batch}",
            f"data.num_workers={s.workers}",
        ]
    return [
        sys.executable,
        "-m",
        "trainer",
        "fit",
        "--config",
        cfg_stage.config,
        *cfg_stage.overrides,
        *extra,
    ]


def _start_fit(ctx: Context, stage: str, steps: int) -> Logged | LoggedCall:
    """Start the fit of one of the paper's stages, its output into ``fit_{stage}.log``."""
    cmd, log = _fit_command(ctx, stage, steps), ctx.report.out / f"fit_{stage}.log"
    if ctx.sizes.fits_in_process:
        return LoggedCall(cmd, log, _trainer_main, skip=3)  # after "python -m trainer"
    return Logged(cmd, log)


def _trainer_main(argv: list[str]) -> int:
    """``python -m trainer ARGV`` in this process; torch's thread count is put back after."""
    from trainer.__main__ import main

    threads = torch.get_num_threads()  # the fit sets its own (train.threads)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def _finish_fit(
    ctx: Context, stage: str, steps: int, fit: Logged | LoggedCall, timeout: float
) -> None:
    """Wait for one fit and add its rows: steps done, the loop's rate, a validation figure."""
    rc, seconds, text = fit.wait(timeout)
    metrics_path = ctx.work / "runs" / f"paper-{stage}" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    done = int(metrics.get("steps", 0))
    _steps_row(
        ctx, stage, steps, done, rc, f"exit {rc}, {seconds:.0f} s wall; {fit.log.name}", text
    )
    _rate_row(ctx, stage, text)
    _val_row(ctx, stage, done, metrics)


def _steps_row(
    ctx: Context, stage: str, steps: int, done: int, rc: int, note: str, text: str
) -> None:
    """The optimizer steps the fit did, against the steps asked (pass when all, exit 0)."""
    status = verdict(rc == 0 and done == steps)
    if rc == 124:
        status, note = "fail (time budget)", note + "; killed at its time budget"
    elif rc != 0:
        note += "; last line: " + (text.strip().splitlines() or [""])[-1][:120]
    ctx.report.add(
        Figure(
            "paper",
            f"trainer fit, {stage} stage: optimizer steps",
            done,
            "steps",
            f"{steps}",
            status,
            note,
        )
    )


def _rate_row(ctx: Context, stage: str, text: str) -> None:
    """The training loop's own last rate (its log's ``sps=``), if it logged one."""
    rates = re.findall(r"sps=(\d+(?:\.\d+)?)", text)
    if rates:
        unit = "samples/s" if stage == "classify" else "patches/s"
        ctx.report.add(
            Figure(
                "paper",
                f"trainer fit, {stage}: the loop's own rate",
                float(rates[-1]),
                unit,
                note="its log's sps, epoch start included",
            )
        )


def _val_row(ctx: Context, stage: str, done: int, metrics: dict[str, Any]) -> None:
    """The final validation figure (balanced accuracy, or PSNR in dB), if the fit wrote one."""
    key = "balanced_accuracy" if stage == "classify" else "sr_psnr"
    value = (metrics.get("final") or {}).get(key)
    if isinstance(value, int | float):
        note = f"after {done} steps: shows the stage ran, not a result"
        ctx.report.add(
            Figure(
                "paper",
                f"trainer fit, {stage}: val {key}",
                float(value),
                "dB" if stage == "sr" else "",
                note=note,
            )
        )
