"""``python -m trainer.experiment study OUT ...``: the pre-registered analysis across splits.

Each ``OUT`` is one finished pipeline folder or its archive (``trainer.experiment archive``),
one split seed of the same slices, the same arms and model seeds. Per comparison (every arm
minus ``lr``) it gives, as RESULTS.md pre-registers (issue 17): the mean paired difference
over the (split, seed) runs with a hierarchical bootstrap interval (splits, then patients, then
seeds) and a linear mixed model beside it; the per-split interval the report computes; exact
McNemar per run, Holm-adjusted within the comparison; then every arm's accuracy over the runs
and the SR quality per split.

Folders are read only after all of them are checked: each report finished and current, the
same arms and seeds everywhere, no split twice. The outputs identify a folder by its data set
id and fingerprints, never by a path (the privacy rule: a path may name a patient); only an
error, printed to the person who ran the command, names the folder as it was given.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shards.format import read_index
from srmri.atomic import write_text
from trainer.experiment.archive import FolderError, finished_report, verify_archive
from trainer.experiment.config import DATA_IGNORE, arm_run_dir, data_dir
from trainer.experiment.report import BASELINE_ARM, ReportError, arm_correctness
from trainer.experiment.study_stats import (
    ArmRow,
    SplitData,
    SplitInfo,
    SRRow,
    Study,
    StudyComparison,
    compare,
)

__all__ = ["StudyError", "main", "run_study"]

# Parts of the ingest config that may differ between the splits of one study: the split itself
# and what DATA_IGNORE already leaves out of the data stage's fingerprint.
_SPLIT_FREE = {"split", "secret_file", *DATA_IGNORE}


class StudyError(FolderError):
    """The folders cannot be analysed together (mismatched, or a split twice)."""


@dataclass
class _Folder:
    """One pipeline folder's report and data set, read before any prediction is."""

    name: str
    out: Path
    results: dict[str, Any]
    info: SplitInfo
    data_config: dict[str, Any]


def _read_folder(out: Path) -> _Folder:
    """Check one folder's report and read what identifies its split (no predictions yet)."""
    name = str(out)
    verify_archive(out, name)
    results, report_fp = finished_report(out, name)
    try:
        index = read_index(data_dir(out))
    except (OSError, ValueError) as exc:
        raise StudyError(f"{name}: cannot read its data set's index.json: {exc}") from exc
    if index.dataset_id != results["dataset_id"]:
        raise StudyError(f"{name}: results.json is of another data set than its data/ holds")
    split = index.config.get("split", {})
    info = SplitInfo(
        split_seed=split.get("seed"),
        dataset_id=index.dataset_id,
        data_fingerprint=results.get("data_fingerprint", ""),
        test_keys_sha256=index.test_keys_sha256,
        report_fingerprint=report_fp,
        test_samples=int(results["test_samples"]),
    )
    config = {k: v for k, v in index.config.items() if k not in _SPLIT_FREE}
    # Only the split's seed may differ: the same fractions, as pre-registered.
    config["split"] = {k: v for k, v in split.items() if k != "seed"}
    return _Folder(name, out, results, info, config)


def _arms_seeds(folder: _Folder) -> tuple[list[str], dict[str, list[int]]]:
    arms = folder.results["arms"]
    return list(arms), {arm: list(r["seeds"]) for arm, r in arms.items()}


def _check_same_design(first: _Folder, other: _Folder) -> None:
    """Refuse a folder whose arms, seeds or data (the split apart) differ from the first's."""
    arms, seeds = _arms_seeds(first)
    their_arms, their_seeds = _arms_seeds(other)
    if sorted(their_arms) != sorted(arms):
        raise StudyError(f"{other.name} has arms {their_arms}, but {first.name} has {arms}")
    for arm in arms:
        if their_seeds[arm] != seeds[arm]:
            raise StudyError(
                f"{other.name}: arm {arm} has seeds {their_seeds[arm]}, "
                f"but in {first.name} {seeds[arm]}"
            )
    ours, theirs = first.data_config, other.data_config
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differ:
        raise StudyError(
            f"{other.name}: its data differ from {first.name}'s in more than the split's seed "
            f"({', '.join(differ)}); a study compares splits of the same slices"
        )


def _check_together(folders: list[_Folder]) -> None:
    """Refuse folders that do not form one study: other arms, seeds or data; a split twice."""
    first = folders[0]
    if BASELINE_ARM not in first.results["arms"]:
        raise StudyError(f"{first.name}: no {BASELINE_ARM} arm, so nothing to compare against")
    for other in folders[1:]:
        _check_same_design(first, other)
    for i, f in enumerate(folders):
        for g in folders[:i]:
            if f.info.test_keys_sha256 == g.info.test_keys_sha256:
                raise StudyError(
                    f"{f.name} is the same split as {g.name} (split seed {f.info.split_seed}, "
                    f"test keys {f.info.test_keys_sha256[:12]}…): give each split once"
                )


def _load_split(folder: _Folder, arms: list[str], seeds: dict[str, list[int]]) -> SplitData:
    """Read one checked folder's per-seed test correctness (content order) and groups."""
    runs = {arm: [arm_run_dir(folder.out, arm, s) for s in seeds[arm]] for arm in arms}
    try:
        correct, groups = arm_correctness(runs, folder.out, read_index(data_dir(folder.out)))
    except (ReportError, FileNotFoundError) as exc:
        raise StudyError(f"{folder.name}: cannot read its test predictions: {exc}") from exc
    folder.info.resampled = "patients" if groups is not None else "samples"
    return SplitData(folder.info, correct, groups)


def _arm_table(folders: list[_Folder], arms: list[str]) -> list[ArmRow]:
    """Every arm's accuracy and balanced accuracy over all its (split, seed) runs."""
    rows = []
    for arm in arms:
        runs = [m for f in folders for m in f.results["arms"][arm]["per_seed"]]
        rows.append(ArmRow.of(arm, runs))
    return rows


def _sr_table(folders: list[_Folder]) -> list[SRRow]:
    """Each split's SR model against bicubic and zero-filling (none when no SR stage ran)."""
    return [SRRow.of(f.info, f.results["sr"]) for f in folders if f.results.get("sr")]


def run_study(
    outs: list[Path], n_boot: int = 10000, split_boot: int = 2000, seed: int = 0
) -> Study:
    """Check the pipeline folders, then compute every pre-registered table.

    Args:
        outs: One finished pipeline folder per split.
        n_boot: Replicates of the hierarchical (across-split) bootstrap.
        split_boot: Replicates of each per-split bootstrap (the report's).
        seed: Seed of the hierarchical bootstrap (the per-split one uses the report's, 0).

    Returns:
        The study.

    Raises:
        StudyError: Fewer than two folders, or folders that cannot be analysed together.
        FolderError: A folder unfinished or out of date, or an archive changed since made.
    """
    if len(outs) < 2:
        raise StudyError("name at least two pipeline folders, one per split")
    folders = [_read_folder(Path(o)) for o in outs]
    _check_together(folders)
    arms, seeds = _arms_seeds(folders[0])
    splits = [_load_split(f, arms, seeds) for f in folders]
    pairs = [(arm, BASELINE_ARM) for arm in arms if arm != BASELINE_ARM]
    comparisons: list[StudyComparison] = [
        compare(splits, a, b, seeds[a], n_boot=n_boot, split_boot=split_boot, seed=seed)
        for a, b in pairs
    ]
    return Study(
        splits=[s.info for s in splits],
        arms=arms,
        seeds=seeds[arms[0]],
        bootstrap=n_boot,
        split_bootstrap=split_boot,
        seed=seed,
        comparisons=comparisons,
        arm_table=_arm_table(folders, arms),
        sr_table=_sr_table(folders),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.experiment study OUT OUT ... [--out FILE.md] [--json FILE]
    [--bootstrap N] [--split-bootstrap N] [--seed S]``; returns the exit status."""
    from trainer.experiment.study_pages import study_markdown

    parser = argparse.ArgumentParser(prog="python -m trainer.experiment study", description=__doc__)
    parser.add_argument("outs", nargs="+", type=Path, metavar="OUT", help="pipeline folders")
    parser.add_argument("--out", type=Path, help="write the markdown here (default: stdout)")
    parser.add_argument("--json", type=Path, help="also write the study as JSON here")
    parser.add_argument("--bootstrap", type=int, default=10000, help="hierarchical replicates")
    parser.add_argument("--split-bootstrap", type=int, default=2000, help="per-split replicates")
    parser.add_argument("--seed", type=int, default=0, help="seed of the hierarchical bootstrap")
    args = parser.parse_args(argv)
    if min(args.bootstrap, args.split_bootstrap) < 1:
        parser.error("--bootstrap and --split-bootstrap need at least one replicate")
    try:
        study = run_study(args.outs, args.bootstrap, args.split_bootstrap, args.seed)
    except FolderError as exc:  # StudyError too
        print(f"study: error: {exc}", file=sys.stderr)
        return 1
    text = study_markdown(study)
    if args.out is None:
        print(text)
    else:
        write_text(args.out, text)
    if args.json is not None:
        write_text(args.json, json.dumps(asdict(study), indent=1))
    return 0
