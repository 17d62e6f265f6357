"""The report's bootstrap does not depend on the ingest secret that names keys and patients."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from shards.writer import GROUP_PATIENT, ManifestRow, write_manifest
from trainer.experiment.report import _content_order
from trainer.experiment.stats import paired_bootstrap

N = 40


def _set(root: Path, salt: str) -> list[str]:
    """A manifest of N test slices of N / 4 patients; keys and pseudonyms depend on ``salt``."""
    root.mkdir()
    rows = []
    for i in range(N):
        key = hashlib.sha256(f"{salt}k{i}".encode()).hexdigest()[:16]
        patient = hashlib.sha256(f"{salt}p{i // 4}".encode()).hexdigest()[:16]
        sha = hashlib.sha256(f"pixels{i}".encode()).hexdigest()
        rows.append(
            ManifestRow(key=key, source="nifti", input_id="", slice=i % 3, label=i % 2,
                        class_name="", status="ok", split="test", group=patient,
                        group_kind=GROUP_PATIENT, sha256=sha)
        )  # fmt: skip
    write_manifest(root / "manifest.parquet", rows, {})
    return sorted(r.key for r in rows)  # the order the report reads predictions in


def test_the_interval_is_the_same_under_another_secret(tmp_path: Path) -> None:
    # The same slices, correct or not alike, under two secrets: one interval, not two.
    rng = np.random.default_rng(0)
    # correct or not, by content, for arms a and b
    hits = {f"pixels{i}": (rng.random(2) < (0.9, 0.6)).astype(int) for i in range(N)}
    intervals = []
    for salt in ("one", "two"):
        keys = _set(tmp_path / salt, salt)
        order, groups = _content_order(tmp_path / salt, keys)
        assert groups is not None and len(set(groups)) == N // 4
        by_key = _pixels_of(tmp_path / salt)
        a = np.array([hits[by_key[k]][0] for k in keys])[order]
        b = np.array([hits[by_key[k]][1] for k in keys])[order]
        intervals.append(paired_bootstrap(a, b, groups, n_boot=500))
    assert intervals[0] == intervals[1]


def _pixels_of(root: Path) -> dict[str, str]:
    """key -> the pixel label its sha256 was made from."""
    from shards.writer import read_manifest_rows

    names = {hashlib.sha256(f"pixels{i}".encode()).hexdigest(): f"pixels{i}" for i in range(N)}
    return {r.key: names[r.sha256] for r in read_manifest_rows(root)}
