"""Every input accounted for: each file or link under INPUT has a row, or the ingest stops."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from input_trees import brain_image, brain_volume, make_dicom_series, make_kaggle_tree
from PIL import Image

from shards.assemble import UnusableSetError
from shards.ingest import ingest
from shards.ingest_config import IngestConfig
from shards.locate import read_mapping
from shards.writer import read_manifest_rows
from srmri.config import load_config

SIZE = 32


@pytest.fixture(autouse=True)
def _secret(tmp_path, monkeypatch):
    monkeypatch.setenv("SRMRI_SECRET_FILE", str(tmp_path / "secret.key"))


def run(source: str, inp: Path, out: Path, lines: list[str] | None = None, *overrides: str):
    items = [f"source={source}", f"input={inp}", f"out={out}", f"preprocess.size={SIZE}"]
    cfg = load_config(IngestConfig, None, [*items, "workers=1", *overrides])
    return ingest(cfg, log=(lines if lines is not None else []).append)


def rows_by_path(out: Path) -> dict[str, list]:
    """Relative path -> its manifest rows, through the local mapping (rows hold ids only)."""
    paths = read_mapping(out)[1]
    found: dict[str, list] = {}
    for r in read_manifest_rows(out):
        found.setdefault(paths[r.input_id], []).append(r)
    return found


def add_odd_entries(root: Path) -> dict[str, str]:
    """Links of every kind, unsupported files and a non-UTF-8 name in a Kaggle tree.

    Returns:
        relative path -> the status (``ok``) or skip reason slug its row must have.
    """
    glioma = root / "Training" / "glioma"
    rng = np.random.default_rng(7)
    extra = root / "Training" / "notumor" / "batch2"
    extra.mkdir()
    Image.fromarray(brain_image(96, 80, "notumor", rng).astype(np.uint8)).save(extra / "b.png")
    (glioma / "linked_batch").symlink_to(os.path.relpath(extra, glioma))  # inside: read
    outside = root.parent / "elsewhere"
    outside.mkdir()
    Image.fromarray(brain_image(96, 80, "glioma", rng).astype(np.uint8)).save(outside / "o.png")
    (glioma / "outside_batch").symlink_to(outside)
    (glioma / "loop").symlink_to("loop")
    (glioma / "up").symlink_to("..")
    (glioma / "gone.jpg").symlink_to("missing.jpg")
    Image.fromarray(brain_image(96, 80, "glioma", rng).astype(np.uint8)).save(glioma / "a.bmp")
    Image.fromarray(brain_image(96, 80, "glioma", rng).astype(np.uint8)).save(glioma / "a.webp")
    odd = os.fsdecode(b"scan_\xff\xfe.jpg")  # Latin-1 bytes: no UTF-8 name
    Image.fromarray(brain_image(96, 80, "glioma", rng).astype(np.uint8)).save(glioma / odd, "JPEG")
    (glioma / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return {
        "Training/notumor/batch2/b.png": "ok",
        "Training/glioma/linked_batch/b.png": "ok",
        "Training/glioma/outside_batch": "link_outside_tree",
        "Training/glioma/loop": "link_loop",
        "Training/glioma/up": "link_loop",
        "Training/glioma/gone.jpg": "dangling_link",
        "Training/glioma/a.bmp": "unsupported_extension",
        "Training/glioma/a.webp": "unsupported_extension",
        f"Training/glioma/{odd}": "ok",
        "Training/glioma/.DS_Store": "hidden",
    }


def test_every_file_and_link_gets_exactly_one_row(tmp_path):
    root = tmp_path / "kaggle"
    written = make_kaggle_tree(root, per_class=3)
    odd = add_odd_entries(root)
    lines: list[str] = []
    run("kaggle", root, tmp_path / "out", lines)
    rows = rows_by_path(tmp_path / "out")
    assert set(rows) == set(written) | set(odd)
    assert all(len(v) == 1 for v in rows.values())
    for rel, want in odd.items():
        (row,) = rows[rel]
        got = row.status if want == "ok" else row.reason.split(":")[0]
        assert got == want, (rel, row.status, row.reason)
        assert want == "ok" or row.status == "skipped"
    name = next(rel for rel in rows if rel.startswith("Training/glioma/scan_"))
    assert os.fsencode(name) == b"Training/glioma/scan_\xff\xfe.jpg"  # the exact bytes back
    n = len(written) + len(odd)
    assert lines[-1].startswith(f"in: {n} files and links under the input; out: {n} ")
    assert f"skipped {sum(v != 'ok' for v in odd.values())})" in lines[-1]


def test_series_files_the_reader_passes_over_get_rows(tmp_path):
    make_dicom_series(tmp_path / "dcm")  # PAT-A/series1 holds a stray notes.txt
    (tmp_path / "dcm" / "PAT-A" / "series1" / "IM9999.dcm").write_bytes(b"")
    run("dicom", tmp_path / "dcm", tmp_path / "out")
    rows = rows_by_path(tmp_path / "out")
    (notes,) = rows["PAT-A/series1/notes.txt"]
    assert notes.status == "skipped" and notes.reason.startswith("not_dicom")
    (empty,) = rows["PAT-A/series1/IM9999.dcm"]
    assert empty.status == "quarantined" and empty.reason.startswith("empty_file")
    assert [r.status for r in rows["PAT-A/series1"]] == ["ok"] * 5  # the series is still read
    (table,) = rows["labels.csv"]
    assert table.reason.startswith("labels_table")


def test_no_usable_input_exits_non_zero_with_every_row(tmp_path):
    root = tmp_path / "folder"
    (root / "glioma").mkdir(parents=True)
    (root / "notumor").mkdir()
    (root / "glioma" / "empty.jpg").write_bytes(b"")
    (root / "glioma" / "text.png").write_text("not an image\n")
    (root / "notumor" / "notes.txt").write_text("notes\n")
    with pytest.raises(UnusableSetError, match="no usable input"):
        run("folder", root, tmp_path / "out")
    rows = rows_by_path(tmp_path / "out")
    assert {k: v[0].status for k, v in rows.items()} == {
        "glioma/empty.jpg": "quarantined",
        "glioma/text.png": "quarantined",
        "notumor/notes.txt": "skipped",
    }
    assert not (tmp_path / "out" / "index.json").exists()
    cmd = [sys.executable, "-m", "shards", "ingest", "--source", "folder", "--workers", "1"]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path / "cli"), str(root)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0 and "no usable input" in proc.stderr
    assert "quarantined 2" in proc.stdout and "skipped 1" in proc.stdout


def test_duplicate_patients_leaving_no_test_split_stop_the_ingest(tmp_path):
    root = tmp_path / "nii"
    (root / "sub-1").mkdir(parents=True)
    vol = brain_volume((40, 48, 32), "glioma", np.random.default_rng(0))
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(root / "sub-1" / "t1.nii.gz"))
    for k in (2, 3):  # the same scan again under two more patients: all joined as duplicates
        shutil.copytree(root / "sub-1", root / f"sub-{k}")
    table = "file,label,patient\n" + "".join(f"sub-{k}/t1.nii.gz,glioma,P{k}\n" for k in (1, 2, 3))
    (root / "labels.csv").write_text(table)
    with pytest.raises(UnusableSetError, match=r"test split(s)? (is|are) empty.*1 group"):
        run("nifti", root, tmp_path / "out", None, "max_slices_per_volume=4")
    assert not (tmp_path / "out" / "index.json").exists()
    lines: list[str] = []
    result = run(
        "nifti", root, tmp_path / "out2", lines, "max_slices_per_volume=4", "split.test_fraction=0"
    )
    assert any(line.startswith("warning: split: the val split is empty") for line in lines)
    stored = sum(r.status == "ok" for r in result.rows)
    assert result.index.num_samples("train") == stored > 0 == result.index.num_samples("val")
