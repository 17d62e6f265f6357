"""The study's records and its statistics per comparison (:mod:`trainer.experiment.study`).

Everything here is plain data (``dataclasses.asdict`` of :class:`Study` is the JSON output)
computed from per-split correctness arrays; reading the pipeline folders is ``study``'s job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainer.experiment.stats import (
    MixedModelFit,
    hierarchical_bootstrap,
    holm_adjust,
    mcnemar_exact,
    mean_std,
    mixed_intercept,
    paired_bootstrap,
)

__all__ = [
    "ArmRow",
    "RunTest",
    "SRRow",
    "SplitData",
    "SplitInfo",
    "SplitInterval",
    "Study",
    "StudyComparison",
    "compare",
    "verdict",
]

MeanStd = tuple[float, float]


@dataclass
class SplitInfo:
    """What identifies one split's pipeline folder in the outputs (no path: privacy).

    Attributes:
        split_seed: ``data.split.seed`` its data set was made with (None if not recorded).
        dataset_id: Its shard set's content id (differs between splits).
        data_fingerprint: Its data stage's fingerprint.
        test_keys_sha256: Hash of its test keys (equal only for the same split).
        report_fingerprint: Its report stage's fingerprint.
        test_samples: Its test slices.
        resampled: What its bootstraps resample: ``patients`` or ``samples``.
        label: How the tables name it: ``split <seed>`` (its dataset id without a seed).
    """

    split_seed: int | None
    dataset_id: str
    data_fingerprint: str
    test_keys_sha256: str
    report_fingerprint: str
    test_samples: int
    resampled: str = ""
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:  # a field, not a property: the JSON rows name splits by it
            seed = self.split_seed
            self.label = f"split {seed}" if seed is not None else self.dataset_id[:12]


@dataclass
class SplitData:
    """One split's test results: per arm bool ``[n_seeds, n_test]`` (content order), groups."""

    info: SplitInfo
    correct: Mapping[str, np.ndarray]
    groups: list[str] | None


@dataclass
class SplitInterval:
    """One split's paired difference as its report computes it (patients resampled).

    Attributes:
        split: The split's label.
        diff: Seed-averaged accuracy difference on that split.
        ci_low: Lower bound of the percentile bootstrap over its test patients.
        ci_high: Upper bound of it.
    """

    split: str
    diff: float
    ci_low: float
    ci_high: float


@dataclass
class RunTest:
    """One (split, seed) run of a comparison: its accuracy difference and exact McNemar test.

    Attributes:
        split: The split's label.
        seed: The model seed (seed ``s`` of one arm against seed ``s`` of the other).
        diff: Accuracy difference of the two runs on the split's test slices.
        only_a: Slices only the first arm got right.
        only_b: Slices only the second arm got right.
        pvalue: Exact two-sided McNemar p-value.
        pvalue_holm: It Holm-adjusted across the comparison's runs.
    """

    split: str
    seed: int
    diff: float
    only_a: int
    only_b: int
    pvalue: float
    pvalue_holm: float = float("nan")


@dataclass
class StudyComparison:
    """Arm ``a`` against arm ``b`` across every split and seed.

    Attributes:
        a: The arm.
        b: The arm it is compared with (``lr``).
        diff: Mean paired accuracy difference over the (split, seed) runs.
        ci_low: Lower bound of the hierarchical bootstrap interval (the primary one).
        ci_high: Upper bound of it.
        verdict: ``helps``, ``hurts`` or ``cannot tell`` (:func:`verdict`).
        mixed: The mixed model of the per-run differences (random intercept per split).
        per_split: Each split's own interval.
        runs: Each run's difference and McNemar test.
    """

    a: str
    b: str
    diff: float
    ci_low: float
    ci_high: float
    verdict: str
    mixed: MixedModelFit
    per_split: list[SplitInterval] = field(default_factory=list)
    runs: list[RunTest] = field(default_factory=list)


@dataclass
class ArmRow:
    """One arm over every (split, seed) run: mean and sd of its test metrics."""

    arm: str
    runs: int
    accuracy: MeanStd
    balanced_accuracy: MeanStd

    @classmethod
    def of(cls, arm: str, per_run: Sequence[Mapping[str, float]]) -> ArmRow:
        """From the runs' ``per_seed`` entries of ``results.json``."""
        return cls(
            arm=arm,
            runs=len(per_run),
            accuracy=mean_std([m["accuracy"] for m in per_run]),
            balanced_accuracy=mean_std([m["balanced_accuracy"] for m in per_run]),
        )


@dataclass
class SRRow:
    """One split's SR model on its validation slices, against the plain upsamplers."""

    split: str
    arch: str
    epochs: int | None
    psnr: dict[str, float]
    ssim: dict[str, float]

    @classmethod
    def of(cls, info: SplitInfo, sr: Mapping[str, Any]) -> SRRow:
        """From the ``sr`` section of the split's ``results.json``."""
        best = sr.get("best", {})
        methods = ("sr", "bicubic", "zero_fill")
        nan = float("nan")
        return cls(
            split=info.label,
            arch=f"{sr.get('arch', '')}/{sr.get('preset', '')} x{sr.get('scale', '')}",
            epochs=sr.get("epochs"),
            psnr={m: float(best.get(f"{m}_psnr", nan)) for m in methods},
            ssim={m: float(best.get(f"{m}_ssim", nan)) for m in methods},
        )


@dataclass
class Study:
    """Everything the study reports; ``dataclasses.asdict`` of it is the JSON output.

    Attributes:
        splits: Each input folder's identity, in the order given.
        arms: The arms (the first folder's order).
        seeds: The model seeds of every arm.
        bootstrap: Replicates of the hierarchical bootstrap.
        split_bootstrap: Replicates of each per-split bootstrap.
        seed: Seed of the hierarchical bootstrap.
        comparisons: Every arm minus ``lr``.
        arm_table: Every arm over all runs.
        sr_table: The SR model per split (empty when no SR stage ran).
    """

    splits: list[SplitInfo]
    arms: list[str]
    seeds: list[int]
    bootstrap: int
    split_bootstrap: int
    seed: int
    comparisons: list[StudyComparison]
    arm_table: list[ArmRow]
    sr_table: list[SRRow]


def verdict(ci_low: float, ci_high: float) -> str:
    """The pre-registered reading of a primary interval of ``a - b``.

    Returns:
        ``helps`` when it lies entirely above zero, ``hurts`` entirely below, else
        ``cannot tell`` (whatever the mean).
    """
    if ci_low > 0:
        return "helps"
    if ci_high < 0:
        return "hurts"
    return "cannot tell"


def _diffs(split: SplitData, a: str, b: str) -> np.ndarray:
    """Paired per-slice difference ``[n_seeds, n_test]`` of arm a minus arm b on one split."""
    return split.correct[a].astype(np.float64) - split.correct[b].astype(np.float64)


def _run_tests(splits: Sequence[SplitData], seeds: Sequence[int], a: str, b: str) -> list[RunTest]:
    """Per (split, seed): the accuracy difference and McNemar, Holm-adjusted over all of them."""
    tests = []
    for split in splits:
        for i, seed in enumerate(seeds):
            ca, cb = split.correct[a][i], split.correct[b][i]
            m = mcnemar_exact(ca, cb)
            diff = float(ca.mean() - cb.mean())
            tests.append(RunTest(split.info.label, seed, diff, m.only_a, m.only_b, m.pvalue))
    for test, adjusted in zip(tests, holm_adjust([t.pvalue for t in tests])):
        test.pvalue_holm = adjusted
    return tests


def compare(
    splits: Sequence[SplitData],
    a: str,
    b: str,
    seeds: Sequence[int],
    n_boot: int = 10000,
    split_boot: int = 2000,
    seed: int = 0,
) -> StudyComparison:
    """Arm a minus arm b: every pre-registered statistic.

    Args:
        splits: Every split's test results (the same arms and seeds in each).
        a: The arm.
        b: The arm it is compared with.
        seeds: The model seeds, in the order of the correctness rows.
        n_boot: Replicates of the hierarchical bootstrap.
        split_boot: Replicates of each per-split bootstrap.
        seed: Seed of the hierarchical bootstrap (per split: 0, as the report's).

    Returns:
        The comparison.
    """
    diffs = [_diffs(s, a, b) for s in splits]
    diff, lo, hi = hierarchical_bootstrap(
        diffs, [s.groups for s in splits], n_boot=n_boot, seed=seed
    )
    runs = _run_tests(splits, seeds, a, b)
    mixed = mixed_intercept([r.diff for r in runs], [r.split for r in runs])
    per_split = [
        SplitInterval(
            s.info.label, *paired_bootstrap(s.correct[a], s.correct[b], s.groups, split_boot)
        )
        for s in splits
    ]
    return StudyComparison(
        a,
        b,
        diff,
        ci_low=lo,
        ci_high=hi,
        verdict=verdict(lo, hi),
        mixed=mixed,
        per_split=per_split,
        runs=runs,
    )
