"""Device check (issue 18): the paper's configuration on one GPU, in one command, one table.

What it runs, each part within a time budget (the whole under 8 minutes on one H200):

1. ``tests``: ``pytest -m cuda tests/test_cuda.py`` (degradation on CUDA against the CPU, a DDP
   step on an nccl group of one, bf16 and fp16-with-GradScaler steps, channels_last,
   ``torch.compile``, pinned-memory loading, DeepSpeed ZeRO-1/2 in bf16 when it imports, one
   real ``python -m trainer fit`` on CUDA). It runs in the background while the shard sets are
   made (that is CPU work), and is waited for before any timing starts.
2. ``resnet50``: the classifier of ``configs/paper.yaml`` (its classify stage:
   ``configs/classify.yaml`` plus the paper's overrides, built through ``trainer.factories`` and
   ``trainer.backend``): ResNet50, one channel, 224 px, bf16 autocast, channels_last. The
   largest batch that fits (doubling from ``batch_start`` until out of memory or the cap), then
   images/s on synthetic on-device data and end to end from the project's shards through
   ``shards.loader.create_loader`` (pinned memory, worker processes, the trainer's own train
   transform with augmentation), eager and under ``torch.compile``; the loader alone; peak GPU
   memory; end to end over synthetic against 97% and end to end against 3,000 images/s.
3. ``sr``: the paper's SR stage (``configs/sr-synth.yaml`` plus the paper's overrides: EDSR full
   preset, x2, 96 px patches, bf16): training patches/s through the trainer's backend, the model
   alone and ``shards.enhance.enhance`` in slices/s.
4. ``paper``: ``python -m trainer fit`` with the paper's classify stage (50 steps) and its SR
   stage (30 steps) on the built-in synthetic data at 224 px: the real configuration runs.

The shard sets are made by the project's ingest (``shards.ingest.ingest``, what ``python -m
shards synth`` and the pipeline's data stage run) from the paper's own ``data`` section: built-in
synthetic data at 224 px; only the count and the split fractions change, so that the train
split holds enough batches of the largest batch for one timed epoch.

``--tiny`` shrinks everything for a CPU (32 px, batch 2-4, two timed steps, no batch search, no
compile, 48 slices) so that ``tests/test_device_check.py`` runs it in about a minute; figures
that need CUDA then read ``n/a (no CUDA)``. The device is chosen automatically (``--device``).

Outputs (``--out DIR``; at most 8 files, which is what the device tool brings back):
``device_check.log`` (every step's detail), ``results.json`` (every figure, the environment and
the command; rewritten after each part), ``pytest_cuda.log``, ``fit_classify.log`` and
``fit_sr.log``; ``benchmarks/device_check.sh`` adds ``console.log``. The table is printed last.
``--report DIR`` prints the table of an existing ``DIR/results.json`` (the shell script does so
when the run itself was cut short).

Preparing the carried wheels (here, once; the device's image lacks webdataset, MONAI, nibabel,
nilearn, pydicom, imagehash and DeepSpeed, and reaches no registry)::

    bash benchmarks/device_check.sh --fetch-wheels

That downloads cp312 manylinux wheels for the device's Python 3.12 into ``.whl/`` (already
ignored by ``.gitignore``) with ``pip download --no-deps --only-binary=:all: --python-version
3.12 --implementation cp --platform manylinux_2_28_x86_64 [...] -d .whl NAME==VERSION``, and
builds DeepSpeed, which PyPI ships only as source, into a pure-Python wheel with ``DS_BUILD_OPS=0
pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl``. About 28 MB in all, inside
the 64 MiB a call may carry (the tracked tree adds about 2 MB). Ray is not carried: its cp312
wheel alone is about 79 MB, and nothing here uses it (the ingest runs on local processes).

The device call a session with a GPU makes (one call: a minute or two of start, then at most
about 8 minutes of run; ``timeout_s`` just above the script's own 500 s limit, which leaves
about 4 minutes of the 15 for one rerun while the machine is still warm)::

    run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=540)

To rerun only some parts in the time left: ``command="bash benchmarks/device_check.sh --parts
resnet50,sr"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # the project is not installed on the device

import torch  # noqa: E402
from gpu_throughput import (  # noqa: E402
    Rate,
    build_backend,
    loader_rate,
    measure,
    shard_batches,
    synthetic_batches,
)
from sr_throughput import enhance_rate, model_rate, train_rate  # noqa: E402

__all__ = ["FULL", "PARTS", "TINY", "Figure", "Report", "Sizes", "format_table", "main"]

PARTS = ("tests", "resnet50", "sr", "paper")
PAPER = ROOT / "configs" / "paper.yaml"
NO_CUDA = "n/a (no CUDA)"
E2E_TARGET = 3000.0  # images/s end to end on one H200 (issue 18)
RATIO_TARGET = 97.0  # end to end as % of synthetic
RAY_NOTE = "not carried: its cp312 wheel is ~79 MB, over the 64 MiB carry limit; unused here"


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: the device's full size, or ``--tiny`` for a CPU.

    Attributes:
        size: Image side of the shard sets and the classifier, in pixels.
        samples: Slices in the main shard set.
        slices_per_subject: Slices per synthetic subject (0: the paper's).
        enhance_samples: Slices in the set ``enhance`` is timed on (0: the main set).
        val_fraction: Split fraction of val (and of test) in the shard sets.
        batch_start: First batch of the search (the batch, with ``search`` off).
        batch_cap: Largest batch the search tries.
        search: Search for the largest batch that fits (on CUDA only); also marks the size
            the targets are judged at.
        steps: Timed steps at most per synthetic measurement.
        sr_steps: Timed steps at most of the SR training rate.
        e2e_steps: Timed steps at most from the shards (the epoch's end stops them too).
        warmup: Untimed steps first (synthetic).
        e2e_warmup: Untimed steps first from the shards (the workers' start).
        seconds: Time budget of each timed measurement.
        workers: Loader worker processes.
        compile: Also time under ``torch.compile`` (on CUDA only).
        sr_batch: Batch of the SR training rate (0: the paper's ``data.batch_size``).
        sr_slices: LR slices the SR model alone is timed on.
        fit_steps: Steps of the paper's classify fit.
        sr_fit_steps: Steps of the paper's SR fit.
        fit_batch: Batch of both fits (0: the paper's own).
        parallel_fits: Run the two fits side by side (else one after the other).
        precision: Training precision everywhere ("": the paper's, bf16).
        tests_timeout: Seconds the CUDA tests may take.
        budget: Seconds for the whole run; each part gets a share of what is left.
    """

    size: int
    samples: int
    slices_per_subject: int
    enhance_samples: int
    val_fraction: float
    batch_start: int
    batch_cap: int
    search: bool
    steps: int
    sr_steps: int
    e2e_steps: int
    warmup: int
    e2e_warmup: int
    seconds: float
    workers: int
    compile: bool
    sr_batch: int
    sr_slices: int
    fit_steps: int
    sr_fit_steps: int
    fit_batch: int
    parallel_fits: bool
    precision: str
    tests_timeout: float
    budget: float


FULL = Sizes(
    size=224,
    samples=12288,  # train split 9,830 at 10/10/80: 19 batches of 512, so 16 timed in one epoch
    slices_per_subject=0,
    enhance_samples=512,
    val_fraction=0.1,
    batch_start=64,
    batch_cap=512,  # ResNet50's images/s flattens out well before; the search logs each batch
    search=True,
    steps=60,
    sr_steps=400,
    e2e_steps=10**6,
    warmup=8,
    e2e_warmup=3,
    seconds=8.0,
    workers=max(1, min(14, (os.cpu_count() or 2) - 2)),
    compile=True,
    sr_batch=0,
    sr_slices=512,
    fit_steps=50,
    sr_fit_steps=30,
    fit_batch=0,
    parallel_fits=False,
    precision="",
    tests_timeout=240.0,
    budget=450.0,
)
TINY = Sizes(
    size=32,
    samples=48,
    slices_per_subject=1,  # small val/test splits (each class needs a subject in each)
    enhance_samples=0,
    val_fraction=0.1,
    batch_start=4,
    batch_cap=4,
    search=False,
    steps=2,
    sr_steps=2,
    e2e_steps=2,
    warmup=1,
    e2e_warmup=1,
    seconds=20.0,
    workers=1,
    compile=False,
    sr_batch=2,
    sr_slices=8,
    fit_steps=2,
    sr_fit_steps=2,
    fit_batch=2,
    parallel_fits=True,
    # bf16 convolutions on a CPU without bf16 units are emulated, about 5x slower than fp32:
    # the tiny run checks that the script works, the device run measures bf16.
    precision="fp32",
    tests_timeout=120.0,
    budget=170.0,
)
# Each part's share of the time left when it starts (the rest is kept for the later parts).
SHARE = {"resnet50": 0.5, "sr": 0.3, "paper": 0.9}


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


def _unjudged(ctx: Context) -> str:
    """The result of a target figure that is not judged here, and why."""
    return NO_CUDA if not ctx.cuda else "info (target is for the full size)"


def _verdict(ok: bool) -> str:
    return "pass" if ok else "fail"


# ------------------------------------------------------------------------------------ helpers


def _versions() -> dict[str, str]:
    """Installed versions of what the check leans on, from package metadata (no imports)."""
    out: dict[str, str] = {"python": platform.python_version()}
    names = [
        "torch",
        "timm",
        "torchmetrics",
        "numpy",
        "webdataset",
        "monai",
        "nibabel",
        "nilearn",
        "pydicom",
        "imagehash",
        "xxhash",
        "deepspeed",
        "ray",
    ]
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            # Carried wheels installed with --target have metadata too; a module without it
            # (a source checkout on the path) still counts as there.
            out[name] = "?" if importlib.util.find_spec(name) else "missing"
    return out


def _git_commit() -> str:
    """The checkout's commit, read-only ('' where there is no git, as on the device)."""
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return proc.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _nvidia_smi() -> str:
    """``nvidia-smi`` clocks, power and temperature as they read now ('' where there is none)."""
    if shutil.which("nvidia-smi") is None:
        return ""
    q = "name,driver_version,memory.total,clocks.sm,clocks.mem,power.draw,temperature.gpu"
    try:
        proc = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return proc.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _env_for_children() -> dict[str, str]:
    """The subprocesses' environment: this one's, with the project importable from ROOT."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # every child makes its own group of one
    return env


class Logged:
    """A command running in ROOT with its output into a log file; see :meth:`wait`.

    Args:
        cmd: The command.
        log: File for its stdout and stderr (the command line is its first line).
    """

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        self._fh = open(log, "w")  # noqa: SIM115 - open while the command runs
        self._fh.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        self._fh.flush()
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=_env_for_children(), stdout=self._fh, stderr=subprocess.STDOUT
        )

    def wait(self, timeout: float) -> tuple[int, float, str]:
        """Wait at most ``timeout`` seconds (then kill it).

        Args:
            timeout: Seconds from now.

        Returns:
            (exit status, 124 if it was killed; wall seconds since it started; the log's text).
        """
        try:
            rc = self.proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = 124
            self._fh.write(f"\n[device_check] killed after {timeout:.0f} s (time budget)\n")
        self._fh.close()
        return rc, time.perf_counter() - self.t0, self.log.read_text(errors="replace")


def _reset_peak(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)


def _peak_gib(ctx: Context) -> float | None:
    return torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.cuda else None


def _rate_note(rate: Rate, extra: str = "") -> str:
    lo, med, hi = rate.spread()
    note = f"{rate.steps} steps in {rate.seconds:.1f} s; chunks min/median/max "
    note += f"{lo:.0f}/{med:.0f}/{hi:.0f}"
    return f"{note}; {extra}" if extra else note


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:160]


@contextmanager
def _part(ctx: Context, part: str) -> Iterator[None]:
    """Run one part: log its start and end, turn an exception into an error row, save."""
    left = ctx.clock.left()
    ctx.report.log(f"== {part} (at {ctx.clock.elapsed():.0f} s, {left:.0f} s left)", echo=True)
    t0 = time.monotonic()
    try:
        yield
    except Exception as exc:  # one part's failure must not hide the others' figures
        ctx.report.log(traceback.format_exc())
        ctx.report.add(Figure(part, "part failed", None, result=f"error ({_short(exc)})"))
    finally:
        seconds = time.monotonic() - t0
        ctx.report.meta.setdefault("part_seconds", {})[part] = round(seconds, 1)
        ctx.report.log(f"== {part} done in {seconds:.1f} s", echo=True)
        if ctx.cuda:
            torch.cuda.empty_cache()
        ctx.report.save()


# --------------------------------------------------------------------------------------- data


def make_data(ctx: Context) -> None:
    """Make the shard sets with the project's ingest from the paper's ``data`` section.

    Args:
        ctx: The run context (``ctx.data`` and ``ctx.enhance_data`` are set here).
    """
    from shards.ingest import ingest

    s = ctx.sizes
    workers = max(1, (os.cpu_count() or 2) - 1) if ctx.cuda else 1

    def one(name: str, n: int) -> Path:
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
                f"ingest {name}: {n} slices, {s.size} px",
                n / seconds,
                "slices/s",
                note=note,
            )
        )
        return out

    ctx.data = one("shards", s.samples)
    ctx.enhance_data = one("shards-enhance", s.enhance_samples) if s.enhance_samples else ctx.data


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


def _stage_config(ctx: Context, stage: str, extra: list[str]) -> Any:
    """The trainer config (``TrainConfig``) of one of the paper's stages, classify or sr."""
    from trainer.experiment.config import trainer_config

    return trainer_config(
        getattr(ctx.pipe, stage), [f"data.root={ctx.data}", *extra, *_precision(ctx)]
    )


def _precision(ctx: Context) -> list[str]:
    """The override of the run's precision, if it has its own (``--tiny``)."""
    return [f"train.precision={ctx.sizes.precision}"] if ctx.sizes.precision else []


# -------------------------------------------------------------------------------- part: tests


def start_tests(ctx: Context) -> Logged:
    """Start ``pytest -m cuda tests/test_cuda.py`` in the background; see :func:`finish_tests`.

    Args:
        ctx: The run context.

    Returns:
        The running command.
    """
    xml = ctx.work / "pytest_cuda.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "tests/test_cuda.py",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
    ]
    if importlib.util.find_spec("pytest_timeout"):  # a hung test must not take the budget
        cmd.append("--timeout=240")
    ctx.report.log("tests: started in the background", echo=True)
    return Logged(cmd, ctx.report.out / "pytest_cuda.log")


def finish_tests(ctx: Context, running: Logged) -> None:
    """Wait for the CUDA tests; one row per test on CUDA, a summary row on a CPU.

    Args:
        ctx: The run context.
        running: What :func:`start_tests` returned.
    """
    timeout = min(ctx.sizes.tests_timeout - (time.perf_counter() - running.t0), ctx.clock.left())
    rc, seconds, _ = running.wait(timeout)
    cases = _junit_cases(ctx.work / "pytest_cuda.xml")
    counts = {k: sum(1 for c in cases if c[1] == k) for k in ("passed", "failed", "skipped")}
    ctx.report.meta["tests"] = {"exit": rc, "seconds": round(seconds, 1), **counts}
    note = f"exit {rc} in {seconds:.0f} s; pytest_cuda.log"
    if rc == 124:
        note = f"killed after {seconds:.0f} s (time budget); pytest_cuda.log"
    if not ctx.cuda:
        ctx.report.add(
            Figure(
                "tests",
                "pytest -m cuda: skipped",
                counts["skipped"],
                "tests",
                "all pass on CUDA",
                NO_CUDA,
                note,
            )
        )
        return
    for name, outcome, message in cases:
        result = {"passed": "pass", "failed": "fail"}.get(outcome, f"skipped ({message[:100]})")
        note = message[:160] if outcome == "failed" else ""
        ctx.report.add(Figure("tests", name, None, target="pass", result=result, note=note))
    ok = rc == 0 and counts["failed"] == 0 and counts["passed"] > 0
    note = f"{counts['failed']} failed, {counts['skipped']} skipped; {note}"
    ctx.report.add(
        Figure(
            "tests",
            "pytest -m cuda: passed",
            counts["passed"],
            "tests",
            "all pass",
            _verdict(ok),
            note,
        )
    )


def _junit_cases(xml: Path) -> list[tuple[str, str, str]]:
    """(test name, outcome, message) of every test case in a JUnit XML file."""
    if not xml.is_file():
        return []
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message", "")
            elif child.tag == "skipped":
                outcome, message = "skipped", child.get("message", "")
        cases.append((case.get("name", "?"), outcome, message.replace("\n", " ")))
    return cases


# ----------------------------------------------------------------------------- part: resnet50


def part_resnet50(ctx: Context) -> None:
    """ResNet50 as the paper's classify stage builds it: batch search, synthetic vs end to end.

    Args:
        ctx: The run context (needs ``ctx.data``).
    """
    from shards.format import read_index
    from trainer.task import create_task

    s, dev, rep = ctx.sizes, ctx.device, ctx.report
    budget_end = time.monotonic() + ctx.clock.share("resnet50")
    cfg = _stage_config(ctx, "classify", ["task=classify", "data.inputs=hr"])
    classes = list(read_index(ctx.data).classes)
    transform = create_task(cfg, classes).transform(True)  # the trainer's train transform
    what = f"{cfg.model.name} {s.size} px {cfg.train.precision}"
    what += f" channels_last={cfg.model.channels_last}"
    rep.log(f"resnet50: {what}; model {cfg.model}; optim {cfg.optim}; train {cfg.train}")

    def backend(batch: int, compiled: bool = False) -> Any:
        model = dataclasses.replace(cfg.model, compile=compiled)
        return build_backend(
            model,
            cfg.optim,
            cfg.train,
            cfg.backend,
            device=dev,
            batch=batch,
            num_classes=len(classes),
            seed=cfg.train.seed,
        )

    def seconds() -> float:  # each timed measurement's share of the part's budget
        return max(1.0, min(s.seconds, (budget_end - time.monotonic()) / 6))

    searched = s.search and ctx.cuda
    batch = _largest_batch(ctx, backend, len(classes)) if searched else s.batch_start
    how = f"doubling from {s.batch_start} to the cap {s.batch_cap}; search in results.json"
    rep.add(
        Figure(
            "resnet50",
            "batch (largest that fits)" if searched else "batch",
            batch,
            "images",
            note=how if searched else "fixed (no search)",
        )
    )
    synth_kw = {"batch": batch, "steps": s.steps, "warmup": s.warmup}
    e2e_kw = {"batch": batch, "steps": s.e2e_steps, "warmup": s.e2e_warmup}
    best_synth = 0.0
    for compiled in (False, True) if s.compile and ctx.cuda else (False,):
        tag = "compiled" if compiled else "eager"
        if compiled and time.monotonic() > budget_end - 40:
            rep.add(Figure("resnet50", "torch.compile runs", None, result="skipped (time budget)"))
            break
        _reset_peak(ctx)
        b = backend(batch, compiled)
        if compiled:  # the first step compiles forward and backward: timed on its own
            t0 = time.perf_counter()
            measure(
                b,
                synthetic_batches(dev, batch, s.size, len(classes)),
                batch=batch,
                steps=1,
                warmup=0,
            )
            rep.add(
                Figure(
                    "resnet50",
                    "torch.compile: first step",
                    time.perf_counter() - t0,
                    "s",
                    note="compiles forward and backward",
                )
            )
        synth = measure(
            b,
            synthetic_batches(dev, batch, s.size, len(classes)),
            max_seconds=seconds(),
            **synth_kw,
        )
        e2e_batches = shard_batches(
            ctx.data, dev, batch, s.workers, transform=transform, seed=cfg.train.seed, epochs=1
        )
        e2e = measure(b, e2e_batches, max_seconds=seconds(), **e2e_kw)
        peak = _peak_gib(ctx)
        del b, e2e_batches
        best_synth = max(best_synth, synth.per_s)
        rep.add(
            Figure(
                "resnet50",
                f"synthetic on device, {tag}",
                synth.per_s,
                "img/s",
                note=f"{what}, batch {batch}; {_rate_note(synth)}",
            )
        )
        where = f"{s.workers} workers, pinned={ctx.cuda}, within one epoch"
        rep.add(
            Figure(
                "resnet50",
                f"end to end from shards, {tag}",
                e2e.per_s,
                "img/s",
                f">= {E2E_TARGET:,.0f}",
                _verdict(e2e.per_s >= E2E_TARGET) if ctx.judged else _unjudged(ctx),
                _rate_note(e2e, where),
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
                _verdict(ratio >= RATIO_TARGET) if ctx.judged else _unjudged(ctx),
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
    if not (s.compile and ctx.cuda):
        why = NO_CUDA if not ctx.cuda else "skipped (--tiny)"
        rep.add(Figure("resnet50", "torch.compile runs", None, result=why))
    _loader_figures(ctx, batch, transform, best_synth, seconds)
    if ctx.cuda and time.monotonic() < budget_end - 15:
        _cudnn_benchmark_figure(ctx, backend, batch, len(classes), seconds())


def _largest_batch(ctx: Context, backend: Callable[[int], Any], classes: int) -> int:
    """Double the batch from ``batch_start`` until out of memory or the cap; the last that ran."""
    s, dev = ctx.sizes, ctx.device
    best, batch, tried = s.batch_start, s.batch_start, []
    while batch <= s.batch_cap:
        _reset_peak(ctx)
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
            tried.append(f"{batch}: {rate.per_s:.0f} img/s, {_peak_gib(ctx):.1f} GiB")
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


def _loader_figures(
    ctx: Context, batch: int, transform: Any, synth: float, seconds: Callable[[], float]
) -> None:
    """The loader alone (with and without the train transform), and what limits end to end."""
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
            note=_rate_note(alone, where),
        )
    )
    rep.add(
        Figure(
            "resnet50",
            "loader alone, no transform",
            raw.per_s,
            "img/s",
            note=_rate_note(raw, "read, checksum, decode only"),
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


def _cudnn_benchmark_figure(
    ctx: Context, backend: Callable[[int], Any], batch: int, classes: int, seconds: float
) -> None:
    """Synthetic eager with ``cudnn.benchmark`` on: the trainer leaves it off (torch's default)."""
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
    note = "the trainer leaves cudnn.benchmark off; " + _rate_note(rate)
    ctx.report.add(
        Figure("resnet50", "synthetic eager, cudnn.benchmark=True", rate.per_s, "img/s", note=note)
    )


# ---------------------------------------------------------------------------------- part: sr


def part_sr(ctx: Context) -> None:
    """The paper's SR stage in its precision: training patches/s, model and enhance slices/s.

    Args:
        ctx: The run context (needs ``ctx.data`` and ``ctx.enhance_data``).
    """
    from shards.degrade import degrade
    from shards.enhance import EnhanceSpec
    from trainer.srnet import count_parameters, create_sr_model

    s, dev, rep = ctx.sizes, ctx.device, ctx.report
    budget_end = time.monotonic() + ctx.clock.share("sr")
    cfg = _stage_config(ctx, "sr", ["task=sr"])
    sr, prec = cfg.sr, cfg.train.precision
    patch = min(sr.patch_size, s.size - s.size % sr.scale)
    what = f"EDSR {sr.preset} x{sr.scale} {prec}"

    def seconds() -> float:  # each timed measurement's share of the part's budget
        return max(1.0, min(s.seconds, (budget_end - time.monotonic()) / 5))

    torch.manual_seed(cfg.train.seed)
    net = create_sr_model(sr)
    params = count_parameters(net)
    paper_batch = cfg.data.batch_size
    batches = [s.sr_batch or paper_batch] + ([paper_batch * 8] if ctx.cuda else [])
    for batch in batches:
        rate = train_rate(
            net,
            sr.scale,
            patch,
            batch,
            s.sr_steps,
            device=dev,
            precision=prec,
            optim=cfg.optim,
            warmup=s.warmup,
            max_seconds=seconds(),
        )
        label = {paper_batch: "the paper's batch", 8 * paper_batch: "8x the paper's batch"}
        note = f"{what}, {params:,} parameters, {label.get(batch, 'tiny')}, trainer.backend"
        rep.add(
            Figure(
                "sr", f"train, {patch} px HR patches, batch {batch}", rate, "patches/s", note=note
            )
        )
    net.eval()
    degradation = cfg.sr_degradation()
    lr = torch.stack([degrade(x, degradation, None)[0] for x in _some_slices(ctx, s.sr_slices)])
    batch = ctx.pipe.enhance_batch
    enhance_precision = "bf16" if ctx.cuda else "fp32"  # what enhance autocasts to
    # A GPU runs the slices in milliseconds: repeat passes for at least 2 s there.
    only = model_rate(
        net, lr, batch, device=dev, precision=enhance_precision, min_seconds=2.0 * ctx.cuda
    )
    note = f"batch {batch}, {len(lr)} slices in device memory, "
    note += f"{'bf16' if ctx.cuda else 'fp32'} as enhance runs"
    rep.add(
        Figure(
            "sr",
            f"model alone, {lr.shape[-2]}x{lr.shape[-1]} LR slices",
            only,
            "slices/s",
            note=note,
        )
    )
    spec = EnhanceSpec(degradation, cfg.train.seed, "device-check", batch)
    e2e = enhance_rate(ctx.enhance_data, ctx.work / "shards-sr", net, spec, dev)
    note = f"{e2e / only:.0%} of the model alone; enhance degrades each slice on the CPU"
    rep.add(
        Figure("sr", "enhance end to end: read, degrade, SR, write", e2e, "slices/s", note=note)
    )


def _some_slices(ctx: Context, n: int) -> list[torch.Tensor]:
    """Up to ``n`` stored slices of the enhance set as float32 ``[1, H, W]`` (model alone)."""
    from shards.format import decode_image, from_uint16, read_index
    from shards.loader import iter_shard

    root = ctx.enhance_data
    out: list[torch.Tensor] = []
    for info in read_index(root).shards:
        for _, parts in iter_shard(str(root / info.name), 0, frozenset({"npy"})):
            out.append(torch.from_numpy(from_uint16(decode_image(parts["npy"])))[None])
            if len(out) == n:
                return out
    return out


# ------------------------------------------------------------------------------- part: paper


def part_paper(ctx: Context) -> None:
    """``python -m trainer fit`` of the paper's classify and SR stages, a few dozen steps each.

    On the device one after the other (their rates stay apart); with ``--tiny`` side by side,
    since each spends most of its time importing torch and timm.

    Args:
        ctx: The run context (needs ``ctx.data``).
    """
    s = ctx.sizes
    budget_end = time.monotonic() + ctx.clock.share("paper")
    stages = (("classify", s.fit_steps), ("sr", s.sr_fit_steps))
    if s.parallel_fits:
        running = [(stage, steps, _start_fit(ctx, stage, steps)) for stage, steps in stages]
        for stage, steps, fit in running:
            _finish_fit(ctx, stage, steps, fit, budget_end - time.monotonic())
        return
    for stage, steps in stages:
        left = budget_end - time.monotonic()
        fit = _start_fit(ctx, stage, steps)
        _finish_fit(ctx, stage, steps, fit, left / 2 if stage == "classify" else left)


def _start_fit(ctx: Context, stage: str, steps: int) -> Logged:
    """Start ``python -m trainer fit`` of one of the paper's stages, cut to ``steps`` steps."""
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
    extra += _precision(ctx)
    if s.fit_batch:
        extra += [
            f"data.batch_size={s.fit_batch}",
            f"data.eval_batch_size={s.fit_batch}",
            f"data.num_workers={s.workers}",
        ]
    cmd = [
        sys.executable,
        "-m",
        "trainer",
        "fit",
        "--config",
        cfg_stage.config,
        *cfg_stage.overrides,
        *extra,
    ]
    return Logged(cmd, ctx.report.out / f"fit_{stage}.log")


def _finish_fit(ctx: Context, stage: str, steps: int, fit: Logged, timeout: float) -> None:
    """Wait for one fit and add its rows: steps done, the loop's rate, a validation figure."""
    rc, seconds, text = fit.wait(timeout)
    metrics_path = ctx.work / "runs" / f"paper-{stage}" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    done = int(metrics.get("steps", 0))
    status = _verdict(rc == 0 and done == steps)
    note = f"exit {rc}, {seconds:.0f} s wall; {fit.log.name}"
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


# ------------------------------------------------------------------------------------- main


def _setup_rows(ctx: Context, versions: dict[str, str]) -> None:
    """The rows up front: the device, and DeepSpeed and Ray (there or not, and why)."""
    rep = ctx.report
    name = torch.cuda.get_device_name(ctx.device) if ctx.cuda else f"CPU, {os.cpu_count()} cores"
    note = f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {versions['python']}"
    rep.add(Figure("setup", f"device: {name}", None, note=note))
    ds = versions["deepspeed"]
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
    ray = versions["ray"]
    ray_result = "info" if ray != "missing" else f"skipped ({RAY_NOTE})"
    rep.add(Figure("setup", "ray", None, result=ray_result, note=ray))


def run_check(args: argparse.Namespace) -> Report:
    """Run the asked parts and write the report.

    Args:
        args: The parsed command line (``tiny``, ``out``, ``device``, ``parts``, ``budget``,
            ``keep``).

    Returns:
        The report, also written to ``args.out``.
    """
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
    ctx = Context(report, sizes, device, work, clock, load_pipeline_config(str(PAPER), []))
    versions = _versions()
    report.meta.update(
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        command=" ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        commit=_git_commit(),
        host=platform.node(),
        device=torch.cuda.get_device_name(device) if use_cuda else "cpu",
        sizes=dataclasses.asdict(sizes),
        versions=versions,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        load_at_start=os.getloadavg(),
        nvidia_smi_at_start=_nvidia_smi(),
    )
    report.log(f"start: {report.meta['command']} on {device}; {sizes}", echo=True)
    _setup_rows(ctx, versions)
    parts = [p for p in PARTS if p in args.parts]
    try:
        # The tests run beside the ingest (CPU work) and end before any timing starts.
        tests = start_tests(ctx) if "tests" in parts else None
        if {"resnet50", "sr", "paper"} & set(parts):
            with _part(ctx, "data"):
                make_data(ctx)
        if tests is not None:
            with _part(ctx, "tests"):
                finish_tests(ctx, tests)
        runners = {"resnet50": part_resnet50, "sr": part_sr, "paper": part_paper}
        for part in (p for p in parts if p in runners):
            if ctx.data is None:
                report.add(Figure(part, "part", None, result="skipped (no shard set)"))
            elif clock.left() < 10:
                report.add(Figure(part, "part", None, result="skipped (time budget)"))
            else:
                with _part(ctx, part):
                    runners[part](ctx)
    finally:
        report.meta.update(
            wall_seconds=round(clock.elapsed(), 1),
            load_at_end=os.getloadavg(),
            nvidia_smi_at_end=_nvidia_smi(),
        )
        order = {p: i for i, p in enumerate(("setup", "tests", "data", *PARTS[1:]))}
        report.figures.sort(key=lambda f: order.get(f.part, 99))  # stable within a part
        report.save()
        if args.keep:
            report.log(f"kept the scratch folder {work}", echo=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return report


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


def main(argv: list[str] | None = None) -> int:
    """Command line; see the module docstring.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 when the run finished (whatever it measured; the table says how it
        went), 1 when ``--report`` found no results.
    """
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="the CPU size (tests run it)")
    parser.add_argument("--out", type=Path, default=Path("runs/device-check"))
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument("--budget", type=float, default=0.0, help="seconds for the whole run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch shard sets")
    parser.add_argument("--report", type=Path, default=None, help="print DIR/results.json")
    args = parser.parse_args(argv)
    if args.report is not None:
        return print_report(args.report)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {PARTS}")
    run_check(args).close()
    return print_report(args.out)


if __name__ == "__main__":
    sys.exit(main())
