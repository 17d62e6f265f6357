"""Old data is never served under new inputs: ingest and enhance fingerprints, content ids."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_shard_set
from input_trees import make_dicom_series

from shards.degrade import DegradeConfig
from shards.enhance import EnhanceSpec, enhance
from shards.format import read_index
from shards.ingest import ingest
from shards.ingest_config import IngestConfig
from shards.locate import read_mapping
from shards.sources import dicom
from shards.verify import verify
from shards.writer import read_manifest_rows
from srmri.config import ConfigError, load_config
from trainer.sr_bundle import weights_id
from trainer.srnet import SRConfig, create_sr_model

SIZE = 32


@pytest.fixture(autouse=True)
def _secret(tmp_path, monkeypatch):
    monkeypatch.setenv("SRMRI_SECRET_FILE", str(tmp_path / "secret.key"))


def run_dicom(inp: Path, out: Path, *overrides: str):
    items = ["source=dicom", f"input={inp}", f"out={out}", f"preprocess.size={SIZE}", "workers=1"]
    return ingest(load_config(IngestConfig, None, [*items, *overrides]), log=lambda _: None)


def relabel(root: Path, series: str, label: str) -> None:
    """Rewrite ``labels.csv`` with ``series`` labelled ``label``."""
    path = root / "labels.csv"
    rows = list(csv.reader(path.open()))
    rows = [[r[0], label] if r[0] == series else r for r in rows]
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def rows_of(out: Path, source_path: str) -> list:
    """The manifest rows of one input, found through the local path mapping (rows hold ids)."""
    paths = read_mapping(out)[1]
    return [r for r in read_manifest_rows(out) if paths.get(r.input_id) == source_path]


def classes_of(out: Path, source_path: str) -> set[str]:
    return {r.class_name for r in rows_of(out, source_path)}


def test_edited_inputs_rebuild_and_an_unchanged_rerun_reads_no_pixels(tmp_path, monkeypatch):
    inp, out = tmp_path / "dcm", tmp_path / "out"
    make_dicom_series(inp)
    first = run_dicom(inp, out)
    assert classes_of(out, "PAT-B/series2") == {"meningioma"}

    # an unchanged re-run hashes bytes but decodes nothing
    def no_decoding(item):
        raise AssertionError("an unchanged re-run must not read pixels")

    with monkeypatch.context() as m:
        m.setattr(dicom, "load_item", no_decoding)
        assert run_dicom(inp, out).skipped

    relabel(inp, "PAT-B/series2", "pituitary")  # a corrected labels table
    fixed = run_dicom(inp, out)  # the same command: no --overwrite needed
    assert not fixed.skipped and classes_of(out, "PAT-B/series2") == {"pituitary"}
    assert fixed.index.dataset_id != first.index.dataset_id and verify(out) == []

    n_before = len(rows_of(out, "PAT-A/series1"))
    for name in sorted(p.name for p in (inp / "PAT-A/series1").glob("*.dcm"))[:2]:
        (inp / "PAT-A/series1" / name).unlink()  # instances deleted from a series
    again = run_dicom(inp, out)
    assert not again.skipped and verify(out) == []
    n_after = len(rows_of(out, "PAT-A/series1"))
    assert n_after == n_before - 2
    assert run_dicom(inp, out).skipped

    # another config is still another data set: refused without --overwrite
    with pytest.raises(ConfigError, match="different data set"):
        run_dicom(inp, out, "max_slices_per_volume=2")


def test_dataset_id_is_of_the_content_not_the_paths(tmp_path):
    make_dicom_series(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    a = run_dicom(tmp_path / "a", tmp_path / "out_a")
    b = run_dicom(tmp_path / "elsewhere" / "b", tmp_path / "out_b")
    assert a.index.dataset_id == b.index.dataset_id
    assert a.index.fingerprint != b.index.fingerprint  # another input folder: another command
    relabel(tmp_path / "elsewhere" / "b", "PAT-A/series1", "pituitary")
    c = run_dicom(tmp_path / "elsewhere" / "b", tmp_path / "out_c")
    assert c.index.dataset_id != a.index.dataset_id


def test_interrupted_ingest_redoes_journaled_inputs_that_changed(tmp_path, monkeypatch):
    inp, out = tmp_path / "dcm", tmp_path / "out"
    make_dicom_series(inp)

    def crash(*args, **kwargs):
        raise RuntimeError("killed after processing")

    with monkeypatch.context() as m:
        m.setattr("shards.ingest.assemble", crash)
        with pytest.raises(RuntimeError):
            run_dicom(inp, out)
    assert (out / ".staging" / "journal.jsonl").is_file() and not (out / "index.json").exists()
    relabel(inp, "PAT-B/series2", "pituitary")
    result = run_dicom(inp, out)
    assert classes_of(out, "PAT-B/series2") == {"pituitary"}
    assert result.resumed_items == 2  # the two unchanged series came from the journal


def tiny_sr(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_sr_model(SRConfig(arch="edsr", scale=2, preset="tiny")).eval()


def run_enhance(src: Path, out: Path, model: torch.nn.Module, model_id: str):
    spec = EnhanceSpec(DegradeConfig(scale=2), seed=0, model_id=model_id, batch_size=8)
    return enhance(src, out, model, spec, device=torch.device("cpu"))


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {s.name: (root / s.name).read_bytes() for s in read_index(root).shards}


def test_enhance_with_another_model_or_source_rebuilds_and_sets_the_old_aside(tmp_path):
    src = tmp_path / "hr"
    make_shard_set(src, {"train": [4, 3], "val": [2, 2], "test": [2, 2]}, size=SIZE)
    out = tmp_path / "sr"
    a, b = tiny_sr(0), tiny_sr(1)
    first = run_enhance(src, out, a, "model-a")
    made_by_a = shard_bytes(out)
    second = run_enhance(src, out, b, "model-b")
    fresh = run_enhance(src, tmp_path / "fresh_b", b, "model-b")
    assert shard_bytes(out) == shard_bytes(tmp_path / "fresh_b") != made_by_a
    assert second.made_from["model"] == "model-b" and second.dataset_id == fresh.dataset_id
    assert second.dataset_id != first.dataset_id and verify(out) == []
    records = [json.loads(p.read_text()) for p in (out / ".done").glob("*.json")]
    assert {r["fingerprint"] for r in records} == {second.fingerprint}
    aside = tmp_path / f"sr.replaced-{first.fingerprint[:12]}"
    assert shard_bytes(aside) == made_by_a  # nothing is lost, nothing survives in OUT

    other_src = tmp_path / "hr2"
    make_shard_set(other_src, {"train": [3, 3], "val": [2, 1], "test": [1, 2]}, size=SIZE, seed=5)
    third = run_enhance(other_src, out, b, "model-b")
    assert third.source_dataset_id == read_index(other_src).dataset_id
    assert [s.name for s in third.shards] == [s.name for s in read_index(other_src).shards]
    assert verify(out) == [] and (tmp_path / f"sr.replaced-{second.fingerprint[:12]}").is_dir()


def test_weights_id_names_the_weights_not_the_path():
    a, b = tiny_sr(0), tiny_sr(1)
    assert weights_id(a, 5) == weights_id(tiny_sr(0), 5)
    assert weights_id(a, 5) != weights_id(b, 5) and weights_id(a, 5) != weights_id(a, 6)
    assert weights_id(a, 5).startswith("sr-") and "/" not in weights_id(a, 5)
