"""One pipeline stage and its record: what it is, whether it ran, and running it once.

A :class:`Stage` is a unit of work with a fingerprint (its own config and its upstream stages').
``OUT/stages.json`` (:class:`Stages`) records, per stage, the fingerprint it ran under and
whether it finished. Stages of one pipeline may run at the same time in separate processes (the
Ray and Slurm executors), so each record is written under an exclusive lock on
``OUT/stages.json.lock``, merged into what the file holds then: no process overwrites another's
record with its own stale copy of the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

from srmri.atomic import write_json
from srmri.distributed import print0
from trainer.experiment.config import (
    ONE_PROCESS_KINDS,
    STAGES_FILE,
    StageKind,
    StageRecord,
    StageStatus,
    read_stages,
)

__all__ = ["PipelineError", "Stage", "StageKind", "Stages", "barrier", "locked", "run_stage"]


class PipelineError(RuntimeError):
    """A stage cannot run now (its upstream is not done, or the inputs changed under it)."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the pipeline.

    Attributes:
        name: Its key in ``stages.json`` (``data``, ``sr``, ``enhance``, ``classify/RUN``,
            ``evaluate/RUN``, ``report``).
        fingerprint: Its own config's fingerprint combined with ``upstream``.
        output: What it writes (a folder, or the report's page); moved aside when the
            fingerprint changed.
        work: Runs it.
        upstream: Upstream stage name -> fingerprint: the stages that must be done before it.
        always: Whether ``work`` runs even when done before under the same fingerprint (the
            data stage: only ingest can tell whether its inputs changed since).
    """

    name: str
    fingerprint: str
    output: Path
    work: Callable[[], Any]
    upstream: dict[str, str] = dataclasses.field(default_factory=dict)
    always: bool = False

    @property
    def kind(self) -> StageKind:
        """What the stage does: the part of its name before ``/``."""
        return self.name.split("/", 1)[0]  # type: ignore[return-value]

    @property
    def main_only(self) -> bool:
        """Whether only rank 0 runs ``work`` (the others wait): :data:`ONE_PROCESS_KINDS`."""
        return self.kind in ONE_PROCESS_KINDS


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the pipeline folder's exclusive lock (``OUT/stages.json.lock``) inside the block."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{STAGES_FILE}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Stages:
    """``OUT/stages.json``: per stage, the fingerprint it ran under and whether it finished."""

    def __init__(self, out: Path, is_main: bool) -> None:
        self.out = out
        self.is_main = is_main
        self.records = read_stages(out)

    def get(self, name: str) -> StageRecord | None:
        """The record of stage ``name``, or None when it never started."""
        return self.records.get(name)

    def done(self, stage: Stage) -> bool:
        """Whether ``stage`` finished under its current fingerprint."""
        record = self.records.get(stage.name)
        return (
            record is not None
            and record.fingerprint == stage.fingerprint
            and (record.status == "done")
        )

    def mark(self, stage: Stage, status: StageStatus) -> None:
        """Record ``stage`` as started or done under its fingerprint (rank 0 writes the file)."""
        record = StageRecord(stage.fingerprint, status, dict(stage.upstream))
        self.records[stage.name] = record
        if not self.is_main:
            return
        with locked(self.out):  # another stage's process may have written since we read
            on_disk = read_stages(self.out)
            theirs = on_disk.get(stage.name)
            if status == "started" and theirs == dataclasses.replace(record, status="done"):
                # A second process of the same stage read the record before the first one
                # finished: its "started" would make finished work look unfinished.
                record = theirs
            self.records = {**on_disk, stage.name: record}
            data = {name: dataclasses.asdict(r) for name, r in self.records.items()}
            write_json(self.out / STAGES_FILE, data, indent=1)


def barrier() -> None:
    """Wait for every rank (nothing to do outside torchrun)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _move_aside(path: Path, old: str) -> Path | None:
    """Rename ``path`` to ``NAME.replaced-<old[:10]>`` (numbered if taken); None if absent."""
    if not path.exists():
        return None
    target = path.with_name(f"{path.name}.replaced-{old[:10]}")
    n = 2
    while target.exists():
        target = path.with_name(f"{path.name}.replaced-{old[:10]}-{n}")
        n += 1
    path.rename(target)
    return target


def _work(stages: Stages, stage: Stage) -> None:
    """Run the stage's work (on rank 0 only for a main-only stage), then wait for every rank."""
    if not stage.main_only or stages.is_main:
        stage.work()
    barrier()


def run_stage(stages: Stages, stage: Stage) -> None:
    """Skip, check, resume or (after moving a stale output aside) run one stage.

    Args:
        stages: The pipeline's stage records.
        stage: The stage.
    """
    before = stages.get(stage.name)
    same = before is not None and before.fingerprint == stage.fingerprint
    if same and before.status == "done":
        verb = "checking" if stage.always else "skipped"
        print0(f"[pipeline] {stage.name}: done before ({stage.fingerprint[:10]}), {verb}")
        if stage.always:
            _work(stages, stage)
        return
    if before is not None and not same:
        # Another config made what is there: continuing from it would keep stale weights.
        moved = _move_aside(stage.output, before.fingerprint) if stages.is_main else None
        barrier()
        where = f"; moved {stage.output} to {moved.name}" if moved is not None else ""
        print0(
            f"[pipeline] {stage.name}: config or upstream changed ({before.fingerprint[:10]} -> "
            f"{stage.fingerprint[:10]}), redone from scratch{where}"
        )
    print0(f"[pipeline] {stage.name}: running")
    stages.mark(stage, "started")
    start = time.perf_counter()
    _work(stages, stage)
    stages.mark(stage, "done")
    # One line per stage that a user (and benchmarks/quickstart_time.py) reads the profile from.
    print0(f"[pipeline] {stage.name}: done in {time.perf_counter() - start:.1f} s")
