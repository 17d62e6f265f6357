"""The pipeline's typed configuration: which data, which SR stage, which arms and seeds.

:class:`PipelineConfig` is loaded with :func:`load_pipeline_config` (YAML plus dotted overrides)
and read by both :mod:`trainer.experiment.pipeline`, which runs the stages, and
:mod:`trainer.experiment.report`, which reads back what they wrote; it lives here so that neither
of those two imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shards.ingest_config import IngestConfig
from srmri.config import load_config, require
from trainer.config import TrainConfig, load_train_config

__all__ = [
    "PipelineConfig",
    "ReportConfig",
    "StageConfig",
    "arm_run_name",
    "load_pipeline_config",
    "trainer_config",
]


Arm = Literal["hr", "lr", "sr", "lr+sr"]


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
    """

    out_dir: str = "runs/pipeline"
    data: IngestConfig = field(default_factory=IngestConfig)
    sr: StageConfig = field(default_factory=StageConfig)
    classify: StageConfig = field(default_factory=StageConfig)
    arms: list[Arm] = field(default_factory=lambda: ["hr", "lr", "sr", "lr+sr"])
    seeds: list[int] = field(default_factory=lambda: [0])
    enhance_batch: int = 16
    report: ReportConfig = field(default_factory=ReportConfig)

    def check(self) -> None:
        require(bool(self.arms), "arms", "name at least one input arm")
        require(len(set(self.arms)) == len(self.arms), "arms", "arms must be distinct")
        require(bool(self.seeds), "seeds", "name at least one seed")
        require(bool(self.classify.config), "classify.config", "a trainer YAML is required")
        needs_sr = any(a in ("sr", "lr+sr") for a in self.arms)
        require(not needs_sr or bool(self.sr.config), "sr.config", "the sr arms need an SR stage")


def trainer_config(stage: StageConfig, extra: list[str]) -> TrainConfig:
    """The stage's trainer config with the pipeline's own overrides applied last."""
    return load_train_config(stage.config or None, [*stage.overrides, *extra])


def arm_run_name(arm: str, seed: int) -> str:
    """Run directory name of one classifier (``lr+sr`` becomes ``lr-sr``)."""
    return f"{arm.replace('+', '-')}-seed{seed}"


def load_pipeline_config(path: str | None, overrides: list[str]) -> PipelineConfig:
    """Load and check a pipeline config (YAML plus dotted overrides)."""
    return load_config(PipelineConfig, path, overrides)
