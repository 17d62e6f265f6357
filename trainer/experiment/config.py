"""The pipeline's typed configuration: which data, which SR stage, which arms and seeds.

:class:`PipelineConfig` is loaded with :func:`load_pipeline_config` (YAML plus dotted overrides)
and read by both :mod:`trainer.experiment.pipeline`, which runs the stages, and
:mod:`trainer.experiment.report`, which reads back what they wrote; it lives here so that neither
of those two imports the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from shards.ingest_config import IngestConfig
from srmri.config import load_config, require
from trainer.config import LoggingConfig, TrainConfig, load_train_config
from trainer.input_kind import InputKind, needs_sr, path_safe

__all__ = [
    "DATA_IGNORE",
    "ONE_PROCESS_KINDS",
    "STAGES_FILE",
    "STAGE_KINDS",
    "TRAIN_IGNORE",
    "Arm",
    "ExecutorConfig",
    "ExecutorKind",
    "ExecutorResources",
    "PipelineConfig",
    "ReportConfig",
    "StageConfig",
    "StageKind",
    "StageRecord",
    "StageResources",
    "StageStatus",
    "arm_run_dir",
    "arm_run_name",
    "data_dir",
    "load_pipeline_config",
    "read_stages",
    "runs_dir",
    "sr_data_dir",
    "sr_run_dir",
    "trainer_config",
]

# An arm is the input kind its classifiers see.
Arm = InputKind
SR_RUN_NAME = "sr"
STAGES_FILE = "stages.json"

# Keys of a stage's config that cannot change what it produces, left out of its fingerprint:
# where it writes (the pipeline fixes those paths; what is in them is fingerprinted as the
# upstream stages) and how much it logs, where it is tracked or how it is scheduled.
TRAIN_IGNORE = (
    "out_dir",
    "name",
    "data.root",
    "data.sr_root",
    "train.log_every",
    "train.resume",
    "logging",
)
DATA_IGNORE = ("out", "workers", "ray_address", "overwrite")

StageStatus = Literal["started", "done"]


@dataclass(frozen=True)
class StageRecord:
    """One stage's entry in ``OUT/stages.json``.

    Attributes:
        fingerprint: The stage's fingerprint: its own config and its upstream stages'.
        status: ``started`` (it ran, or is running, under that fingerprint) or ``done``.
        upstream: Upstream stage name -> the fingerprint it had (informative; already folded
            into ``fingerprint``).
    """

    fingerprint: str
    status: StageStatus = "done"
    upstream: dict[str, str] = field(default_factory=dict)


def read_stages(out: Path) -> dict[str, StageRecord]:
    """The stage records of the pipeline writing to ``out`` (empty when it never ran).

    Args:
        out: The pipeline's ``out_dir``.

    Returns:
        Stage name -> its record. An entry of the first format (a bare config hash) reads as a
        finished stage under that hash.
    """
    path = Path(out) / STAGES_FILE
    if not path.is_file():
        return {}
    records: dict[str, StageRecord] = {}
    for name, entry in json.loads(path.read_text()).items():
        if isinstance(entry, str):
            records[name] = StageRecord(entry)
        else:
            records[name] = StageRecord(
                str(entry["fingerprint"]), entry.get("status", "done"), entry.get("upstream", {})
            )
    return records


@dataclass
class StageConfig:
    """A training stage: a trainer YAML plus overrides (the pipeline adds data paths)."""

    config: str = ""
    overrides: list[str] = field(default_factory=list)


@dataclass
class ReportConfig:
    """What the report computes.

    Attributes:
        bootstrap: Bootstrap replicates for the paired confidence intervals.
        gradcam_per_class: Correct and wrong test samples per class shown with Grad-CAM.
        pairs: Paired comparisons (a, b) reported as a - b.
    """

    bootstrap: int = 2000
    gradcam_per_class: int = 2
    pairs: list[tuple[str, str]] = field(
        default_factory=lambda: [("lr+sr", "lr"), ("sr", "lr"), ("hr", "lr")]
    )


# The kinds of stage (the part of a stage's name before "/"); each has its executor resources.
StageKind = Literal["data", "sr", "enhance", "classify", "evaluate", "report"]
STAGE_KINDS: tuple[StageKind, ...] = get_args(StageKind)
# How the stages are run: one after another in this process, or as Ray tasks.
ExecutorKind = Literal["serial", "ray"]
# Kinds that run in one process whatever the ranks (ingest and the report are rank 0's work):
# an executor gives them one rank, and under torchrun only rank 0 runs them (the others wait).
ONE_PROCESS_KINDS: tuple[StageKind, ...] = ("data", "report")


@dataclass
class StageResources:
    """What one stage of a kind gets from a parallel executor (the serial one ignores it).

    Attributes:
        cpus: CPUs reserved per stage (Ray ``num_cpus``; fractions share a core).
        gpus: GPUs reserved per stage (Ray ``num_gpus``); a multi-rank stage needs one per rank.
        ranks: Processes of a distributed stage (torchrun on the node the stage lands on).
    """

    cpus: float = 1.0
    gpus: float = 0.0
    ranks: int = 1


@dataclass
class ExecutorResources:
    """:class:`StageResources` per stage kind (see :data:`STAGE_KINDS`)."""

    data: StageResources = field(default_factory=StageResources)
    sr: StageResources = field(default_factory=StageResources)
    enhance: StageResources = field(default_factory=StageResources)
    classify: StageResources = field(default_factory=StageResources)
    evaluate: StageResources = field(default_factory=StageResources)
    report: StageResources = field(default_factory=StageResources)


@dataclass
class ExecutorConfig:
    """How the stages are run; no part of any stage's fingerprint (it changes no result).

    Attributes:
        kind: ``serial`` (one process, one stage after another) or ``ray`` (every stage a Ray
            task, independent stages at the same time: :mod:`trainer.experiment.ray_executor`).
        address: The Ray cluster (``HOST:PORT`` of its GCS, ``auto`` or ``ray://HOST:PORT``);
            empty: ``$RAY_ADDRESS`` (set inside a Ray job), else a local Ray started for the run.
        resources: What each kind of stage reserves.
    """

    kind: ExecutorKind = "serial"
    address: str = ""
    resources: ExecutorResources = field(default_factory=ExecutorResources)

    def check(self) -> None:
        require(
            not self.address.startswith(("http://", "https://")),
            "executor.address",
            f"{self.address} is a dashboard address (what `launch ray --address` takes); give "
            "the cluster's GCS address HOST:PORT (port 6379 by default), auto or ray://HOST:PORT",
        )
        for kind in STAGE_KINDS:
            self._check_kind(kind, getattr(self.resources, kind))

    @staticmethod
    def _check_kind(kind: str, res: StageResources) -> None:
        key = f"executor.resources.{kind}"
        require(res.cpus >= 0, f"{key}.cpus", f"must be >= 0, got {res.cpus}")
        require(res.gpus >= 0, f"{key}.gpus", f"must be >= 0, got {res.gpus}")
        require(res.ranks >= 1, f"{key}.ranks", f"must be >= 1, got {res.ranks}")
        require(
            res.ranks == 1 or kind not in ONE_PROCESS_KINDS,
            f"{key}.ranks",
            f"a {kind} stage runs in one process, got {res.ranks} ranks",
        )
        # DDP with NCCL refuses two ranks on one device: a GPU stage needs a GPU per rank.
        require(
            res.gpus == 0 or res.gpus >= res.ranks,
            f"{key}.gpus",
            f"{res.ranks} ranks need {res.ranks} GPUs (one each), got {res.gpus:g}",
        )


@dataclass
class PipelineConfig:
    """The whole experiment.

    Attributes:
        out_dir: Everything goes here: data, runs, report.
        data: How the data set is made (``source: synth`` is the built-in default).
        sr: The SR training stage (``task: sr`` trainer config).
        classify: The classifier stage (``task: classify`` trainer config).
        arms: Input arms trained and compared.
        seeds: Classifier seeds per arm.
        enhance_batch: Batch size of the enhance stage.
        report: Report settings.
        logging: MLflow tracking of the whole pipeline, set once: with ``mlflow_uri`` set the
            pipeline is one parent run (the report is logged to it) and every training stage
            a child run under it, whatever the stage configs say; empty: each stage's own.
        executor: How the stages run (serial or as Ray tasks) and what each kind reserves.
    """

    out_dir: str = "runs/pipeline"
    data: IngestConfig = field(default_factory=IngestConfig)
    sr: StageConfig = field(default_factory=StageConfig)
    classify: StageConfig = field(default_factory=StageConfig)
    arms: list[Arm] = field(default_factory=lambda: ["hr", "lr", "sr", "lr+sr"])
    seeds: list[int] = field(default_factory=lambda: [0])
    enhance_batch: int = 16
    report: ReportConfig = field(default_factory=ReportConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def check(self) -> None:
        require(bool(self.arms), "arms", "name at least one input arm")
        require(len(set(self.arms)) == len(self.arms), "arms", "arms must be distinct")
        require(bool(self.seeds), "seeds", "name at least one seed")
        require(bool(self.classify.config), "classify.config", "a trainer YAML is required")
        require(
            not self.sr_arms() or bool(self.sr.config), "sr.config", "the sr arms need an SR stage"
        )

    def sr_arms(self) -> list[Arm]:
        """The arms that classify SR-enhanced images (they need the SR and enhance stages)."""
        return [a for a in self.arms if needs_sr(a)]


def trainer_config(stage: StageConfig, extra: list[str]) -> TrainConfig:
    """The stage's trainer config with the pipeline's own overrides applied last."""
    return load_train_config(stage.config or None, [*stage.overrides, *extra])


def data_dir(out: Path) -> Path:
    """The shard set the data stage writes (every classifier's ``data.root``)."""
    return out / "data"


def sr_data_dir(out: Path) -> Path:
    """The SR-enhanced shard set the enhance stage writes (the sr arms' ``data.sr_root``)."""
    return out / "data-sr"


def runs_dir(out: Path) -> Path:
    """The parent folder of every training run of the pipeline (its trainers' ``out_dir``)."""
    return out / "runs"


def sr_run_dir(out: Path) -> Path:
    """The SR stage's run directory (its trainer config's ``name`` is :data:`SR_RUN_NAME`)."""
    return runs_dir(out) / SR_RUN_NAME


def arm_run_name(arm: str, seed: int) -> str:
    """Run directory name of one classifier (``lr+sr`` becomes ``lr-sr``)."""
    return f"{path_safe(arm)}-seed{seed}"


def arm_run_dir(out: Path, arm: str, seed: int) -> Path:
    """Run directory of one classifier of the pipeline writing to ``out``.

    Args:
        out: The pipeline's ``out_dir``.
        arm: The classifier's input arm.
        seed: Its seed.

    Returns:
        ``out/runs/<arm_run_name>``: the trainer's ``run_dir_of`` for that run's config.
    """
    return runs_dir(out) / arm_run_name(arm, seed)


def load_pipeline_config(path: str | None, overrides: list[str]) -> PipelineConfig:
    """Load and check a pipeline config (YAML plus dotted overrides)."""
    return load_config(PipelineConfig, path, overrides)
