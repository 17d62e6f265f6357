"""One run of the device check: the context, the setup rows, the parts in order, the saved report.

The parts run in :data:`~device_parts.sizes.PARTS` order, each under
:func:`~device_parts.context.guard_part` (its failure is an error row, not the end of the run);
the CUDA tests run in the background while the shard sets are made.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from device_parts.context import Clock, Context, guard_part
from device_parts.data import make_data
from device_parts.environment import PAPER, git_commit, nvidia_smi, versions
from device_parts.paper_part import part_paper
from device_parts.report import Figure, Report
from device_parts.resnet50_part import part_resnet50
from device_parts.sizes import FULL, PARTS, TINY
from device_parts.sr_part import part_sr
from device_parts.tests_part import finish_tests, start_tests

__all__ = ["RAY_NOTE", "run_check"]

RAY_NOTE = "not carried: its cp312 wheel is ~79 MB, over the 64 MiB carry limit; unused here"


def run_check(args: argparse.Namespace) -> Report:
    """Run the asked parts and write the report.

    Args:
        args: The parsed command line (``tiny``, ``out``, ``device``, ``parts``, ``budget``,
            ``keep``).

    Returns:
        The report, also written to ``args.out``.
    """
    ctx = _context(args)
    found = versions()
    _record_start(ctx, found)
    _setup_rows(ctx, found)
    parts = [p for p in PARTS if p in args.parts]
    try:
        _run_parts(ctx, parts)
    finally:
        _finish(ctx, args.keep)
    return ctx.report


def _context(args: argparse.Namespace) -> Context:
    """The run's sizes, device, report, scratch folder, clock and the paper's config."""
    sizes = TINY if args.tiny else FULL
    if args.budget:
        sizes = dataclasses.replace(sizes, budget=args.budget)
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    report = Report(args.out)
    work = Path(tempfile.mkdtemp(prefix="srmri-device-check-"))
    # The ingest's pseudonymisation key: a scratch one, so this never writes ~/.config/srmri.
    os.environ["SRMRI_SECRET_FILE"] = str(work / "secret.key")
    from trainer.experiment.config import load_pipeline_config

    clock = Clock(sizes.budget)
    return Context(report, sizes, device, work, clock, load_pipeline_config(str(PAPER), []))


def _record_start(ctx: Context, found: dict[str, str]) -> None:
    """The environment, the command and the sizes into ``meta``; the start line."""
    report = ctx.report
    report.meta.update(
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        command=" ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        commit=git_commit(),
        host=platform.node(),
        device=torch.cuda.get_device_name(ctx.device) if ctx.cuda else "cpu",
        sizes=dataclasses.asdict(ctx.sizes),
        versions=found,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        load_at_start=os.getloadavg(),
        nvidia_smi_at_start=nvidia_smi(),
    )
    report.log(f"start: {report.meta['command']} on {ctx.device}; {ctx.sizes}", echo=True)


def _setup_rows(ctx: Context, found: dict[str, str]) -> None:
    """The rows up front: the device, and DeepSpeed and Ray (there or not, and why)."""
    rep = ctx.report
    name = torch.cuda.get_device_name(ctx.device) if ctx.cuda else f"CPU, {os.cpu_count()} cores"
    note = f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {found['python']}"
    rep.add(Figure("setup", f"device: {name}", None, note=note))
    ds = found["deepspeed"]
    ds_result = "info" if ds != "missing" else "skipped (not installed: its tests skip)"
    rep.add(
        Figure(
            "setup",
            "deepspeed",
            None,
            result=ds_result,
            note=f"{ds}; whether it imports: the tests' rows",
        )
    )
    ray = found["ray"]
    ray_result = "info" if ray != "missing" else f"skipped ({RAY_NOTE})"
    rep.add(Figure("setup", "ray", None, result=ray_result, note=ray))


def _run_parts(ctx: Context, parts: list[str]) -> None:
    """The data and the asked parts in order, each guarded; a part without its needs is skipped."""
    # The tests run beside the ingest (CPU work) and end before any timing starts.
    tests = start_tests(ctx) if "tests" in parts else None
    if {"resnet50", "sr", "paper"} & set(parts):
        with guard_part(ctx, "data"):
            make_data(ctx)
    if tests is not None:
        with guard_part(ctx, "tests"):
            finish_tests(ctx, tests)
    runners = {"resnet50": part_resnet50, "sr": part_sr, "paper": part_paper}
    for part in (p for p in parts if p in runners):
        if ctx.data is None:
            ctx.report.add(Figure(part, "part", None, result="skipped (no shard set)"))
        elif ctx.clock.left() < 10:
            ctx.report.add(Figure(part, "part", None, result="skipped (time budget)"))
        else:
            with guard_part(ctx, part):
                runners[part](ctx)


def _finish(ctx: Context, keep: bool) -> None:
    """The closing ``meta``, the rows in part order, ``results.json``; the scratch folder goes."""
    report = ctx.report
    report.meta.update(
        wall_seconds=round(ctx.clock.elapsed(), 1),
        load_at_end=os.getloadavg(),
        nvidia_smi_at_end=nvidia_smi(),
    )
    order = {p: i for i, p in enumerate(("setup", "tests", "data", *PARTS[1:]))}
    report.figures.sort(key=lambda f: order.get(f.part, 99))  # stable within a part
    report.save()
    if keep:
        report.log(f"kept the scratch folder {ctx.work}", echo=True)
    else:
        shutil.rmtree(ctx.work, ignore_errors=True)
