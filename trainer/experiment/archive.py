"""``python -m trainer.experiment archive OUT DEST``: a finished pipeline's records, to keep.

A pipeline folder is mostly shards and checkpoints (hundreds of MB for synth-v1); its report
and the study read only a few of its files. The archive is those files, copied byte for byte
under the same relative paths, so that ``study`` and a reader take it as the folder itself:
``stages.json``, ``results.json``, the report (``report.md``, ``report.html``,
``report_files/``), the data set's ``index.json``, ``manifest.parquet`` and ``config.yaml``
(shard sets record them without a local path) and each classifier's test predictions
(``eval-test/predictions_test.parquet``; its metrics are in ``results.json``). Nothing else
goes in: no weights, no images, no ``pipeline.yaml`` or ``metrics_test.json`` (they name the
machine's paths, ``pipeline.yaml`` a real input's too).

``archive.json``, written last, lists every file with its sha256 and the report stage's
fingerprint; the archive is built beside DEST and renamed into place, so a half-written one
never looks finished, and ``study`` checks every file against the list before reading it. A
pipeline refuses to run into an archive: it holds no data or weights to continue from.

A study whose folders live on machines that are not kept (issue 17's grid runs across sessions)
keeps each finished split as an archive under version control.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from shards.format import INDEX_NAME, MANIFEST_NAME
from shards.writer import file_sha256
from srmri.atomic import write_json
from trainer.experiment.config import STAGES_FILE, arm_run_dir, data_dir, read_stages
from trainer.rundir import eval_dir_of, predictions_path

__all__ = [
    "ARCHIVE_FILE",
    "FolderError",
    "archive_folder",
    "finished_report",
    "is_archive",
    "main",
    "verify_archive",
]

ARCHIVE_FILE = "archive.json"
ARCHIVE_FORMAT = 1
_REPORT_FILES = ("results.json", "report.md", "report.html")
_DATA_FILES = (INDEX_NAME, MANIFEST_NAME, "config.yaml")


class FolderError(RuntimeError):
    """A pipeline folder (or archive) that is unfinished, out of date or damaged."""


def finished_report(out: Path, name: str) -> tuple[dict[str, Any], str]:
    """``results.json`` of a finished, current report and the report stage's fingerprint.

    Args:
        out: The pipeline folder or archive.
        name: How errors name it (the path as the person gave it).

    Returns:
        ``(results, fingerprint)``: the parsed ``results.json`` and the report's fingerprint.

    Raises:
        FolderError: No pipeline folder, the report unfinished, or a stage re-run since it.
    """
    stages = read_stages(out)
    if not stages:
        raise FolderError(f"{name}: not a pipeline folder (it has no {STAGES_FILE})")
    report = stages.get("report")
    if report is None or report.status != "done":
        state = "never ran" if report is None else report.status
        raise FolderError(f"{name}: its report is unfinished (stage report {state}); finish it")
    results = out / "results.json"
    if not results.is_file():
        raise FolderError(f"{name}: its report is unfinished (no results.json)")
    # A stage re-run under another config after the report leaves a report of older runs.
    for stage, fingerprint in report.upstream.items():
        record = stages.get(stage)
        if stage != "data" and (record is None or record.fingerprint != fingerprint):
            raise FolderError(
                f"{name}: its report is out of date (stage {stage} changed since it was "
                "written); run the pipeline again to rebuild it"
            )
    return json.loads(results.read_text()), report.fingerprint


def _members(out: Path, results: dict[str, Any]) -> list[Path]:
    """The relative paths an archive of ``out`` holds (every one must exist)."""
    members = [Path(STAGES_FILE), *(Path(n) for n in _REPORT_FILES)]
    if (out / "report_files").is_dir():
        members += sorted(p.relative_to(out) for p in (out / "report_files").iterdir())
    members += [data_dir(Path()) / n for n in _DATA_FILES]
    for arm, record in results["arms"].items():
        for seed in record["seeds"]:
            test = eval_dir_of(arm_run_dir(Path(), arm, seed), "test")
            members.append(predictions_path(test, "test"))
    return members


def is_archive(out: Path) -> bool:
    """Whether ``out`` is an archive (it has ``archive.json``), not a pipeline's own folder."""
    return (Path(out) / ARCHIVE_FILE).is_file()


def archive_folder(out: Path, dest: Path) -> Path:
    """Copy a finished pipeline folder's records into a new archive ``dest``.

    Args:
        out: The finished pipeline folder.
        dest: The archive to make; it must not exist.

    Returns:
        ``dest``.

    Raises:
        FolderError: The report unfinished or out of date, a record missing, or ``dest`` there.
    """
    out, dest = Path(out), Path(dest)
    results, fingerprint = finished_report(out, str(out))
    if dest.exists():
        raise FolderError(f"{dest}: already exists; archive into a new folder")
    members = _members(out, results)
    missing = [str(m) for m in members if not (out / m).is_file()]
    if missing:
        raise FolderError(f"{out}: cannot archive, missing {', '.join(missing)}")
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # an earlier interrupted archive
    for m in members:
        (partial / m).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / m, partial / m)
    files = {m.as_posix(): file_sha256(partial / m) for m in members}
    record = {
        "format": ARCHIVE_FORMAT,
        "report_fingerprint": fingerprint,
        "dataset_id": results["dataset_id"],
        "files": files,
    }
    write_json(partial / ARCHIVE_FILE, record)
    partial.rename(dest)
    return dest


def verify_archive(out: Path, name: str) -> None:
    """Check an archive's files against its ``archive.json`` (a plain folder passes as is).

    Args:
        out: The folder.
        name: How errors name it.

    Raises:
        FolderError: A listed file missing or changed, or the report not the archived one.
    """
    if not is_archive(out):
        return
    record = json.loads((out / ARCHIVE_FILE).read_text())
    if record.get("format") != ARCHIVE_FORMAT:
        raise FolderError(f"{name}: archive format {record.get('format')}, not {ARCHIVE_FORMAT}")
    for rel, sha in record["files"].items():
        path = out / rel
        if not path.is_file():
            raise FolderError(f"{name}: archived file {rel} is missing")
        if file_sha256(path) != sha:
            raise FolderError(f"{name}: archived file {rel} changed since it was archived")
    _, fingerprint = finished_report(out, name)
    if fingerprint != record["report_fingerprint"]:
        raise FolderError(f"{name}: its report is not the one archived ({ARCHIVE_FILE})")


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.experiment archive OUT DEST``; returns the exit status."""
    prog = "python -m trainer.experiment archive"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("out", type=Path, metavar="OUT", help="a finished pipeline folder")
    parser.add_argument("dest", type=Path, metavar="DEST", help="the archive to make (new)")
    args = parser.parse_args(argv)
    try:
        archive_folder(args.out, args.dest)
        verify_archive(args.dest, str(args.dest))
    except FolderError as exc:
        print(f"archive: error: {exc}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in args.dest.rglob("*") if p.is_file())
    print(f"archive: {args.dest} ({size / 1e6:.1f} MB)")
    return 0
