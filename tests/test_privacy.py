"""No name from the input tree in any shareable output; the local bridge back to real files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from input_trees import make_kaggle_tree
from planted_trees import PLANTED_SOURCES, TOKENS, make_planted_tree

from shards.ingest import ingest
from shards.ingest_config import IngestConfig
from shards.inspect import count_table
from shards.locate import locate, mapping_path, read_mapping
from shards.privacy import redact
from shards.writer import read_manifest_rows
from srmri.config import load_config

SIZE = 32


@pytest.fixture(autouse=True)
def _secret(tmp_path, monkeypatch):
    monkeypatch.setenv("SRMRI_SECRET_FILE", str(tmp_path / "key" / "secret.key"))


def run(source: str, inp: Path, out: Path, lines: list[str], *overrides: str):
    items = [f"source={source}", f"input={inp}", f"out={out}", f"preprocess.size={SIZE}"]
    items += ["workers=1", "max_slices_per_volume=4", *overrides]
    return ingest(load_config(IngestConfig, None, items), log=lines.append)


def persisted(out: Path) -> bytes:
    """Every byte a shard set folder holds, plus its manifest decoded (parquet compresses)."""
    blobs = [p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()]
    if (out / "manifest.parquet").is_file():
        table = pq.read_table(out / "manifest.parquet")
        blobs.append(json.dumps(table.to_pylist()).encode())
        blobs.append(repr(table.schema.metadata).encode())
    return b"\n".join(blobs)


def assert_no_token(haystack: bytes, what: str) -> None:
    low = haystack.lower()
    for token in TOKENS:
        assert token.encode() not in low, f"{token!r} leaked into {what}"


@pytest.mark.parametrize("source", PLANTED_SOURCES)
def test_planted_identifiers_reach_no_output(tmp_path, capfd, source):
    planted = make_planted_tree(tmp_path / "in", source)
    out, lines = tmp_path / "out", []
    result = run(source, planted.root, out, lines)
    table = count_table(out)
    captured = capfd.readouterr()
    assert_no_token(persisted(out), f"the {source} set")
    assert_no_token("\n".join([*lines, table, captured.out, captured.err]).encode(), "the log")
    files = persisted(out)
    for local in (planted.root, out, tmp_path):  # config.yaml and index.json hold no path
        assert str(local).encode() not in files
    rows = read_manifest_rows(out)
    assert [r.status for r in rows].count("skipped") == planted.skipped
    assert result.index.num_samples("test") > 0
    # a guessed path cannot be checked against a key: keys are keyed, not plain hashes
    root, paths = read_mapping(out)
    assert root == planted.root and {r.input_id for r in rows} <= set(paths)
    plain = {hashlib.sha1(rel.encode()).hexdigest()[:16] for rel in paths.values()}
    assert not plain & {r.key.split("_")[1] for r in rows}
    assert not plain & set(paths)
    # in and out are counted and agree
    entries = sum(1 for p in planted.root.rglob("*") if not p.is_dir())
    assert lines[-1].startswith(f"in: {entries} files and links under the input; out: {entries} ")
    assert f"quarantined {planted.quarantined}," in lines[-1]
    assert f"skipped {planted.skipped})" in lines[-1]


def test_mapping_file_is_private_local_and_locate_finds_quarantined_files(tmp_path):
    planted = make_planted_tree(tmp_path / "in", "kaggle")
    out = tmp_path / "out"
    result = run("kaggle", planted.root, out, [])
    where = mapping_path(result.index.fingerprint)
    assert where.is_file() and out not in where.parents
    assert where.stat().st_mode & 0o777 == 0o600 and where.parent.stat().st_mode & 0o777 == 0o700
    assert "PRIVATE" in where.name and b"DOE_JANE" in where.read_bytes()  # it is the bridge
    bad = [hit for hit in locate(out) if hit.row.status == "quarantined"]
    assert sorted(Path(h.path).name for h in bad) == sorted(
        ["MRN12345_empty.jpg", "DOE_JANE_19700101_text.jpg", "MRN12345_19700101_cut.jpg"]
    )
    assert all(Path(h.path).is_file() for h in bad)
    key = bad[0].row.key
    proc = subprocess.run(
        [sys.executable, "-m", "shards", "locate", str(out), key],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert bad[0].path in proc.stdout and key in proc.stdout
    with pytest.raises(FileNotFoundError, match="no path mapping"):
        read_mapping(out, secret_file=tmp_path / "elsewhere" / "secret.key")


def test_keys_depend_on_the_secret_and_the_journal_names_nothing(tmp_path, monkeypatch):
    planted = make_planted_tree(tmp_path / "in", "dicom")
    a = run("dicom", planted.root, tmp_path / "a", [])
    monkeypatch.setenv("SRMRI_SECRET_FILE", str(tmp_path / "other" / "secret.key"))
    b = run("dicom", planted.root, tmp_path / "b", [])
    assert not {r.key for r in a.rows} & {r.key for r in b.rows}
    assert {r.status for r in a.rows} == {r.status for r in b.rows}

    def crash(*args, **kwargs):
        raise RuntimeError("stopped after processing")

    monkeypatch.setattr("shards.ingest.assemble", crash)
    with pytest.raises(RuntimeError):
        run("dicom", planted.root, tmp_path / "c", [])
    staged = tmp_path / "c" / ".staging"
    assert (staged / "journal.jsonl").is_file()
    assert_no_token(persisted(tmp_path / "c"), "the staging journal")


def test_what_a_set_holds_does_not_depend_on_the_secret(tmp_path, monkeypatch):
    # Keys are keyed hashes, so they differ per secret; the split, the sample order in each
    # shard and the dataset_id must not, or the same command gives other numbers elsewhere.
    inp = tmp_path / "kaggle"
    make_kaggle_tree(inp, per_class=8)  # no patient ids: every slice is its own group
    a = run("kaggle", inp, tmp_path / "a", [], "split.val_fraction=0.3")
    monkeypatch.setenv("SRMRI_SECRET_FILE", str(tmp_path / "other" / "secret.key"))
    b = run("kaggle", inp, tmp_path / "b", [], "split.val_fraction=0.3")
    assert not {r.key for r in a.rows} & {r.key for r in b.rows}
    assert a.index.dataset_id == b.index.dataset_id

    def by_content(rows):
        return sorted((r.sha256, r.split, r.shard) for r in rows if r.status == "ok")

    assert by_content(a.rows) == by_content(b.rows)
    assert len({r.split for r in a.rows if r.status == "ok"}) == 3
    for info in a.index.shards:  # same pixels in the same order, only the keys differ
        assert [d for _, d in _payloads(tmp_path / "a" / info.name)] == [
            d for _, d in _payloads(tmp_path / "b" / info.name)
        ]


def _payloads(shard: Path) -> list[tuple[str, str]]:
    import tarfile

    with tarfile.open(shard) as tar:
        return [
            (m.name, hashlib.sha256(tar.extractfile(m).read()).hexdigest())
            for m in tar.getmembers()
            if m.name.endswith(".npy")
        ]


def test_redact_takes_every_name_out_of_a_reason():
    paths = ["/data/DOE_JANE_MRN12345/series1", "DOE_JANE_MRN12345/series1"]
    names = ["DOE_JANE_MRN12345", "series1", "IM_19700101.dcm"]
    reason = (
        "unreadable: IM_19700101.dcm in '/data/DOE_JANE_MRN12345/series1': "
        "No such file or directory: 'DOE_JANE_MRN12345/series1/IM_19700101.dcm'"
    )
    clean = redact(reason, paths, names)
    assert clean.startswith("unreadable: ") and "<path>" in clean
    assert_no_token(clean.encode(), "a reason")
    # a name in another form (upper case here) is caught by the fragment check
    assert redact("bad: file doe_jane_mrn12345.DCM", paths, names) == (
        "bad: (detail withheld: it would name the input)"
    )
    assert redact("no_slices", paths, names) == "no_slices"


def test_per_sample_draws_do_not_depend_on_the_secret(tmp_path, monkeypatch):
    # The LR degradation and the augmentation of each sample are seeded from its payload's
    # digest: seeded from the key (a keyed hash of the secret) they gave another training run
    # on every machine that ingested the same scans.
    from shards.degrade import DegradeConfig
    from shards.loader import create_loader
    from trainer.augment import AugmentConfig, create_augmentation
    from trainer.inputs import InputTransform

    inp = tmp_path / "kaggle"
    make_kaggle_tree(inp, per_class=6)
    run("kaggle", inp, tmp_path / "a", [], "split.val_fraction=0.3")
    monkeypatch.setenv("SRMRI_SECRET_FILE", str(tmp_path / "other" / "secret.key"))
    run("kaggle", inp, tmp_path / "b", [], "split.val_fraction=0.3")
    batches = {}
    for name in ("a", "b"):
        lr = InputTransform(
            "lr", DegradeConfig(scale=2, noise_sigma=0.02), "bicubic", 3, train=True,
            augmentation=create_augmentation(AugmentConfig()),
        )  # fmt: skip
        loader = create_loader(tmp_path / name, "train", 4, mode="train", seed=3, transform=lr)
        loader.set_epoch(1)
        batches[name] = list(loader)
    assert len(batches["a"]) == len(batches["b"]) > 1
    for a, b in zip(batches["a"], batches["b"]):
        assert a["key"] != b["key"] and a["digest"] == b["digest"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
