"""Near duplicates that are really found (issue 13), through the real ingest.

The two failures of the issue, each planted as a copy in ``Testing/`` of every ``Training/``
image of a small Kaggle fixture tree: a JPEG re-encode at quality 70, and a 0.75x downscale
with a clean (zeroed) background. Before the canonical frame, thumbnail correlations of such
copies were 0.94-0.985 (threshold 0.99) and most of them were missed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from input_trees import make_kaggle_tree
from PIL import Image

from shards import dedup
from shards.ingest import ingest
from shards.ingest_config import IngestConfig
from shards.inspect import read_manifest_rows
from shards.locate import read_mapping
from shards.preprocess import PreprocessConfig, preprocess
from shards.synth import SynthConfig, render_synth, synth_items
from shards.writer import ManifestRow
from srmri.config import ConfigError, load_config

SIZE = 64


@pytest.fixture(autouse=True)
def _secret(tmp_path, monkeypatch):
    monkeypatch.setenv("SRMRI_SECRET_FILE", str(tmp_path / "secret.key"))


def _jpeg_q70(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / f"zz_q70_{src.stem}.jpg"
    with Image.open(src) as img:
        img.save(dst, format="JPEG", quality=70)
    return dst


def _downscale_clean(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / f"zz_small_{src.stem}.png"
    with Image.open(src) as img:
        gray = img.convert("L")
        size = (round(0.75 * gray.width), round(0.75 * gray.height))
        small = np.asarray(gray.resize(size, Image.Resampling.BICUBIC))
    # The fixture's background is noise in 0..20; the copy's is cleaned to 0.
    Image.fromarray(np.where(small < 24, 0, small).astype(np.uint8)).save(dst)
    return dst


def _plant(root: Path, copy: Callable[[Path, Path], Path]) -> dict[str, str]:
    """A small Kaggle tree with a copy of each Training image in Testing (same class).

    Returns:
        Copy's rel_path -> its original's rel_path.
    """
    make_kaggle_tree(root, per_class=2, seed=0)
    pairs = {}
    for src in sorted((root / "Training").rglob("*.jpg")):
        dst = copy(src, root / "Testing" / src.parent.name)
        pairs[dst.relative_to(root).as_posix()] = src.relative_to(root).as_posix()
    return pairs


def _ingest(inp: Path, out: Path, *overrides: str) -> dict[str, ManifestRow]:
    items = ["source=kaggle", f"input={inp}", f"out={out}", f"preprocess.size={SIZE}"]
    cfg = load_config(IngestConfig, None, [*items, "workers=1", *overrides])
    ingest(cfg, log=lambda _: None)
    paths = read_mapping(out)[1]
    return {paths[r.input_id]: r for r in read_manifest_rows(out)}


def _assert_found(rows: dict[str, ManifestRow], pairs: dict[str, str]) -> None:
    """Each copy is clustered with its original, as cross-split leakage, and nothing else is."""
    missed = []
    for copy_path, orig_path in pairs.items():
        copy, orig = rows[copy_path], rows[orig_path]
        # Testing/ lists before Training/, so the original is the later record of the pair.
        if not (orig.duplicate_of == copy.key and orig.duplicate_kind == "near"):
            missed.append(orig_path)
            continue
        assert copy.leakage and orig.leakage and copy.split == "test" and orig.split != "test"
    assert not missed, f"copies not found of {missed}"
    flagged = {p for p, r in rows.items() if r.duplicate_of}
    assert flagged == set(pairs.values())  # distinct fixture images are never flagged


def test_jpeg_q70_reencode_of_a_fixture_is_found_as_leakage(tmp_path):
    pairs = _plant(tmp_path / "in", _jpeg_q70)
    _assert_found(_ingest(tmp_path / "in", tmp_path / "out"), pairs)


def test_downscale_075_with_clean_background_is_found_as_leakage(tmp_path):
    pairs = _plant(tmp_path / "in", _downscale_clean)
    _assert_found(_ingest(tmp_path / "in", tmp_path / "out"), pairs)


def test_near_distance_0_and_min_correlation_1_each_turn_near_search_off(tmp_path):
    _plant(tmp_path / "in", _jpeg_q70)
    for i, override in enumerate(("dedup.near_distance=0", "dedup.min_correlation=1.0")):
        rows = _ingest(tmp_path / "in", tmp_path / f"out{i}", override)
        assert not any(r.duplicate_of for r in rows.values()), override


def test_dedup_remove_drops_the_training_copy_of_a_near_duplicate(tmp_path):
    pairs = _plant(tmp_path / "in", _jpeg_q70)
    rows = _ingest(tmp_path / "in", tmp_path / "out", "dedup.remove=true")
    for copy_path, orig_path in pairs.items():
        assert rows[orig_path].status == "duplicate_removed", orig_path
        assert rows[copy_path].status == "ok"


def test_dedup_config_rejects_out_of_range_values():
    for override in ("dedup.near_distance=129", "dedup.min_correlation=0"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_config(IngestConfig, None, ["source=synth", "out=x", override])


def _synth_slices(n_subjects: int) -> tuple[list[np.ndarray], list[int]]:
    """Processed slices of distinct synthetic subjects (4 slices each) and their subject."""
    cfg = SynthConfig(n=4 * n_subjects, seed=3)
    images, subjects = [], []
    for item in synth_items(cfg):
        img, _ = preprocess(
            render_synth(cfg, item.synth_index, item.label).image, PreprocessConfig(SIZE)
        )
        images.append(img)
        subjects.append(item.synth_index // 4)
    return images, subjects


def test_distinct_synthetic_subjects_are_not_near_duplicates():
    images, subjects = _synth_slices(12)
    cfg = dedup.DedupConfig()
    hashes = [dedup.phash(img) for img in images]
    thumbs = np.stack([dedup.thumbnail(img) for img in images])
    pairs = dedup.near_pairs(hashes, thumbs, cfg.near_distance, cfg.min_correlation)
    assert [(i, j) for i, j in pairs if subjects[i] != subjects[j]] == []
    # Same-subject neighbours may look alike; the ingest passes groups, which leaves them out.
    assert (
        dedup.near_pairs(hashes, thumbs, cfg.near_distance, groups=[str(s) for s in subjects]) == []
    )


def test_features_are_those_of_the_staged_pixels_and_search_is_deterministic():
    images, _ = _synth_slices(3)
    staged = [np.round(img * 65535.0).astype(np.uint16) for img in images]
    # The manifest's phash (of the float slice) is the hash assemble compares (of the staged).
    assert [dedup.phash(i) for i in images] == [dedup.phash(s) for s in staged]
    assert all(
        np.array_equal(dedup.thumbnail(i), dedup.thumbnail(s)) for i, s in zip(images, staged)
    )
    hashes = [dedup.phash(s) for s in staged] * 2  # every slice twice: all pairs are near
    thumbs = np.stack([dedup.thumbnail(s) for s in staged] * 2)
    whole = dedup.near_pairs(hashes, thumbs, 32, 0.99)
    assert {(i, i + len(staged)) for i in range(len(staged))} <= set(whole)
    assert dedup.near_pairs(hashes, thumbs, 32, 0.99, block=5) == whole
    assert dedup.near_pairs(hashes, None, 32, block=5) == dedup.near_pairs(hashes, None, 32)
