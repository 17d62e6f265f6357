"""The records of the pipeline's report: what ``results.json`` holds and the pages state."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.experiment.stats import PairedComparison

__all__ = [
    "SUMMARY",
    "ArmResults",
    "MeanStd",
    "ReportProtocol",
    "Results",
    "RunProvenance",
    "SRSummary",
]

SUMMARY = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "ece")
MeanStd = tuple[float, float]


@dataclass
class ArmResults:
    """One arm's test results over its seeds.

    Attributes:
        seeds: The seeds its classifiers were trained with.
        summary: Metric (one of ``SUMMARY``) -> (mean, sd) over seeds.
        per_class: Class -> ``precision``/``recall``/``f1`` -> (mean, sd) over seeds.
        per_seed: Per seed, in ``seeds`` order, the ``SUMMARY`` metrics.
    """

    seeds: list[int]
    summary: dict[str, MeanStd]
    per_class: dict[str, dict[str, MeanStd]]
    per_seed: list[dict[str, float]]


@dataclass
class ReportProtocol:
    """How the numbers were obtained, stated in the report.

    Attributes:
        seeds: Classifier seeds per arm.
        split: Which split was scored and how it is protected.
        ci: How the confidence intervals were computed (and what was resampled).
        test: The significance test and its multiplicity correction.
    """

    seeds: list[int]
    split: str
    ci: str
    test: str


@dataclass
class SRSummary:
    """The SR stage in the report.

    Attributes:
        scale: Upsampling factor.
        arch: SR network architecture.
        preset: Its size preset.
        best: The SR run's best validation metrics (``sr_psnr``, ``bicubic_ssim``, ...).
        epochs: Epochs it trained for.
    """

    scale: int
    arch: str
    preset: str
    best: dict[str, float]
    epochs: int | None


@dataclass
class RunProvenance:
    """What made one run's weights, for checking a reproduction.

    Attributes:
        stage: Its pipeline stage (``sr``, ``classify/hr-seed0``, ...).
        run: Its run directory's name.
        fingerprint: The stage's fingerprint recorded in ``stages.json`` ("" if none was).
        checkpoint: The checkpoint the weights were read from (its folder name).
        weights_sha256: :func:`weights_sha256` of that checkpoint's fp32 weights.
    """

    stage: str
    run: str
    fingerprint: str
    checkpoint: str
    weights_sha256: str


@dataclass
class Results:
    """Everything the report states; ``results.json`` is :meth:`to_json` of it.

    Attributes:
        classes: Class names in label order.
        source: The data stage's source (``synth``, ``kaggle``, ``nifti``, ...).
        train_samples: Training samples of the shard set.
        test_samples: Test samples each classifier was scored on.
        test_keys_sha256: Hash of the test keys (equal to the one recorded at ingest).
        dataset_id: Id of the shard set.
        arms: Arm -> its results, in the config's arm order.
        comparisons: The paired comparisons of ``report.pairs`` (plus each arm no pair names
            minus lr: :func:`trainer.experiment.report.report_pairs`) that could be made.
        protocol: How the numbers were obtained.
        sr: The SR stage, or None when no SR arm ran.
        data_fingerprint: The data stage's fingerprint ("" until :func:`build_report` sets it).
        provenance: Per run, its fingerprint and weights hash (set by :func:`build_report`).
        confusion: Arm -> confusion matrix summed over seeds (for the figure; not serialised).
        runs: Arm -> its run directories, one per seed (for the figures; not serialised).
    """

    classes: list[str]
    source: str
    train_samples: int
    test_samples: int
    test_keys_sha256: str
    dataset_id: str
    arms: dict[str, ArmResults]
    comparisons: list[PairedComparison]
    protocol: ReportProtocol
    sr: SRSummary | None = None
    data_fingerprint: str = ""
    provenance: list[RunProvenance] = field(default_factory=list)
    confusion: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    runs: dict[str, list[Path]] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The serialised fields as plain data, in the order ``results.json`` lists them."""
        return {
            "classes": self.classes,
            "source": self.source,
            "train_samples": self.train_samples,
            "test_samples": self.test_samples,
            "test_keys_sha256": self.test_keys_sha256,
            "dataset_id": self.dataset_id,
            "arms": {arm: asdict(r) for arm, r in self.arms.items()},
            "comparisons": [asdict(c) for c in self.comparisons],
            "protocol": asdict(self.protocol),
            "sr": None if self.sr is None else asdict(self.sr),
            "data_fingerprint": self.data_fingerprint,
            "runs": [asdict(p) for p in self.provenance],
        }
