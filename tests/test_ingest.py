"""Ingest end to end: real files of every format in, real shards and manifest out."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from input_trees import (
    add_bad_images,
    make_dicom_series,
    make_figshare_files,
    make_folder_tree,
    make_kaggle_tree,
    make_nifti_set,
)

from shards.format import decode_image, read_index
from shards.ingest import ingest
from shards.ingest_config import IngestConfig
from shards.inspect import contact_sheet, count_table, read_manifest_rows
from shards.locate import read_mapping
from shards.split import keys_hash
from shards.verify import verify
from srmri.config import ConfigError, load_config

SIZE = 64


@pytest.fixture(autouse=True)
def _secret(tmp_path, monkeypatch):
    monkeypatch.setenv("SRMRI_SECRET_FILE", str(tmp_path / "secret.key"))


def run_ingest(source: str, inp: Path | None, out: Path, *overrides: str):
    items = [f"source={source}", f"out={out}", f"preprocess.size={SIZE}", "workers=1"]
    if inp is not None:
        items.append(f"input={inp}")
    cfg = load_config(IngestConfig, None, [*items, *overrides])
    return ingest(cfg, log=lambda _: None)


def with_paths(out: Path) -> list[tuple[str, object]]:
    """Every manifest row with its input's relative path, from the local mapping file."""
    paths = read_mapping(out)[1]
    return [(paths[r.input_id], r) for r in read_manifest_rows(out)]


def shard_samples(out: Path) -> dict[str, dict]:
    """Every sample in every shard of a set: key -> {image, label, meta, shard}."""
    samples: dict[str, dict] = {}
    for info in read_index(out).shards:
        with tarfile.open(out / info.name) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"shard": info.name})[ext] = tar.extractfile(m).read()
    return samples


def all_output_text(out: Path) -> bytes:
    """Raw bytes of every file under OUT plus the decoded manifest (parquet compresses)."""
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    blobs.append(json.dumps(pq.read_table(out / "manifest.parquet").to_pylist()).encode())
    return b"\n".join(blobs)


def test_kaggle_round_trip_quarantine_and_test_split(tmp_path):
    inp, out = tmp_path / "kaggle", tmp_path / "out"
    written = make_kaggle_tree(inp, per_class=6)
    bad = add_bad_images(inp / "Training" / "glioma")
    result = run_ingest("kaggle", inp, out)
    rows = dict(with_paths(out))
    # nothing silently dropped: every file, good or bad, has exactly one row
    assert set(rows) == set(written) | {f"Training/glioma/{name}" for name in bad}
    for name, slug in bad.items():
        row = rows[f"Training/glioma/{name}"]
        assert row.status == "quarantined" and row.reason.startswith(slug), (name, row.reason)
        assert row.split == "" and row.shard == ""
    for rel, cls in written.items():
        row = rows[rel]
        assert row.status == "ok" and row.class_name == cls
        assert (row.split == "test") == rel.startswith("Testing/")
    assert {r.split for r in rows.values() if r.status == "ok"} == {"train", "val", "test"}
    # the shards hold exactly the usable rows, images stored losslessly at the asked size
    samples = shard_samples(out)
    ok = {r.key: r for r in rows.values() if r.status == "ok"}
    assert set(samples) == set(ok)
    for key, s in samples.items():
        img = decode_image(s["npy"])
        assert img.shape == (SIZE, SIZE) and img.dtype == np.uint16 and img.max() > 0
        meta = json.loads(s["json"])
        assert int(s["cls"]) == ok[key].label == meta["label"]
        assert meta["split"] == ok[key].split and s["shard"] == ok[key].shard
        assert [st["step"] for st in meta["steps"]][:2] == ["to_float", "crop_brain"]
    index = result.index
    test_keys = [k for k, r in ok.items() if r.split == "test"]
    assert index.test_keys_sha256 == keys_hash(test_keys)
    assert verify(out) == []
    assert (out / "config.yaml").is_file() and not (out / ".staging").exists()


def test_unknown_class_folder_is_named_and_class_map_fixes_it(tmp_path):
    inp = tmp_path / "kaggle"
    make_kaggle_tree(inp, per_class=2)
    (inp / "Training" / "notumor").rename(inp / "Training" / "no_tumor")
    with pytest.raises(Exception, match=r"no_tumor.*glioma.*meningioma.*notumor.*pituitary"):
        run_ingest("kaggle", inp, tmp_path / "o1")
    result = run_ingest("kaggle", inp, tmp_path / "o2", "class_map={no_tumor: notumor}")
    assert result.index.counts["samples"]["train"]["notumor"] >= 1


def test_other_formats_round_trip_grouped_by_patient(tmp_path):
    folder_labels = make_folder_tree(tmp_path / "folder")
    out = tmp_path / "o_folder"
    run_ingest("folder", tmp_path / "folder", out, "classes=[glioma,meningioma,notumor,pituitary]")
    rows = read_manifest_rows(out)
    assert {p for p, _ in with_paths(out)} == set(folder_labels)
    assert all(r.status == "ok" for r in rows) and verify(out) == []
    # no patient id in a folder tree: every sample is its own group, and the manifest says so
    assert all(r.group_kind == "sample" for r in rows)
    assert len({r.group for r in rows}) == len(rows)

    records = make_figshare_files(tmp_path / "fig", n=9)
    out = tmp_path / "o_fig"
    run_ingest("figshare", tmp_path / "fig", out)
    rows = read_manifest_rows(out)
    code_to_name = {1: "meningioma", 2: "glioma", 3: "pituitary"}
    for path, r in with_paths(out):
        assert r.class_name == code_to_name[records[path].label_code]
    by_patient: dict[str, set] = {}
    for path, r in with_paths(out):
        by_patient.setdefault(records[path].pid, set()).add((r.group, r.split))
    assert all(len(v) == 1 for v in by_patient.values()), "a patient spans groups or splits"
    assert len(by_patient) >= 3
    assert all(r.group_kind == "patient" for r in rows)
    samples = shard_samples(out)
    assert all(json.loads(s["json"])["group_kind"] == "patient" for s in samples.values())


def test_volumes_quarantine_and_no_header_value_anywhere(tmp_path, capfd):
    nset = make_nifti_set(tmp_path / "nii")
    out_n = tmp_path / "o_nii"
    run_ingest("nifti", tmp_path / "nii", out_n, "max_slices_per_volume=4")
    rows = with_paths(out_n)
    for rel, slug in nset.bad.items():
        bad_rows = [r for p, r in rows if p == rel]
        assert bad_rows and all(r.status == "quarantined" for r in bad_rows), rel
        assert all(r.reason.startswith(slug) for r in bad_rows), [r.reason for r in bad_rows]
    listed = [r for p, r in rows if p == "sub-03.nii"]
    assert sorted(r.slice for r in listed) == [10, 14, 18]
    ok = [r for _, r in rows if r.status == "ok"]
    groups = {p: r.group for p, r in rows if r.status == "ok"}
    assert groups["sub-01/anat/sub-01_T1w.nii.gz"] == groups["sub-02/anat/sub-02_T1w.nii.gz"]
    assert len({r.split for r in ok if r.group == groups["sub-03.nii"]}) == 1

    dset = make_dicom_series(tmp_path / "dcm")
    out_d = tmp_path / "o_dcm"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shards",
            "ingest",
            "--source",
            "dicom",
            "--out",
            str(out_d),
            "--size",
            str(SIZE),
            "--workers",
            "1",
            str(tmp_path / "dcm"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = read_manifest_rows(out_d)
    assert any(r.status == "quarantined" and r.reason.startswith("no_pixel_data") for r in rows)
    assert sum(r.status == "ok" for r in rows) >= 8
    captured = capfd.readouterr()
    haystack = b"\n".join(
        [
            all_output_text(out_d),
            all_output_text(out_n),
            proc.stdout.encode(),
            proc.stderr.encode(),
            captured.out.encode(),
            captured.err.encode(),
        ]
    )
    for field, value in {**dset.headers, **nset.headers}.items():
        for token in {value, *value.split("^"), *value.split(" ")}:
            if len(token) >= 5:
                assert token.encode() not in haystack, f"{field} value {token!r} leaked"


def test_cross_split_duplicates_reported_and_dedup_removes_later_copy(tmp_path):
    inp = tmp_path / "kaggle"
    make_kaggle_tree(inp, per_class=4)
    src = sorted((inp / "Training" / "meningioma").glob("*.jpg"))[0]
    shutil.copy(src, inp / "Testing" / "meningioma" / "zz_copy.jpg")
    run_ingest("kaggle", inp, tmp_path / "o1")
    rows = dict(with_paths(tmp_path / "o1"))
    copy = rows["Testing/meningioma/zz_copy.jpg"]
    orig = rows[src.relative_to(inp).as_posix()]
    # Testing/ lists before Training/, so the training copy is the later one: the locked test
    # split keeps its sample and --dedup removes the training copy.
    assert orig.duplicate_of == copy.key and orig.duplicate_kind == "exact"
    assert copy.leakage and orig.leakage and copy.split == "test" and orig.split != "test"
    assert "leakage" in count_table(tmp_path / "o1")

    run_ingest("kaggle", inp, tmp_path / "o2", "dedup.remove=true")
    rows = dict(with_paths(tmp_path / "o2"))
    assert rows[src.relative_to(inp).as_posix()].status == "duplicate_removed"
    assert rows["Testing/meningioma/zz_copy.jpg"].status == "ok"
    assert verify(tmp_path / "o2") == []


def test_group_kind_column_and_manifests_without_it(tmp_path):
    inp = tmp_path / "kaggle"
    make_kaggle_tree(inp, per_class=2)
    add_bad_images(inp / "Training" / "glioma")
    run_ingest("kaggle", inp, tmp_path / "kaggle_out")
    kaggle = read_manifest_rows(tmp_path / "kaggle_out")
    sliced = [r for r in kaggle if r.group]
    assert sliced and all(r.group_kind == "sample" for r in sliced)
    assert all(r.group_kind == "" for r in kaggle if not r.group)
    synth_out = tmp_path / "synth_out"
    run_ingest("synth", None, synth_out, "synth.n=8")  # synthetic subjects are patients
    synth = read_manifest_rows(synth_out)
    assert all(r.group_kind == "patient" for r in synth)
    # A manifest written before the column existed: the kind is derived from the group.
    for out, rows in ((tmp_path / "kaggle_out", kaggle), (synth_out, synth)):
        path = out / "manifest.parquet"
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["group_kind"]), path)
        assert [r.group_kind for r in read_manifest_rows(out)] == [r.group_kind for r in rows]


def test_verify_catches_corruption_and_cli_exit_status(tmp_path):
    out = tmp_path / "out"
    run_ingest("synth", None, out, "synth.n=24")
    shard = out / read_index(out).shards[0].name
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify(out)
    assert len(problems) == 1 and shard.name in problems[0] and "sha256" in problems[0]
    proc = subprocess.run([sys.executable, "-m", "shards", "verify", str(out)], capture_output=True)
    assert proc.returncode == 1 and shard.name.encode() in proc.stderr


def test_out_with_other_data_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    run_ingest("synth", None, out, "synth.n=12")
    again = run_ingest("synth", None, out, "synth.n=12")
    assert again.skipped
    with pytest.raises(ConfigError, match="different data set"):
        run_ingest("synth", None, out, "synth.n=16")
    result = run_ingest("synth", None, out, "synth.n=16", "overwrite=true")
    assert result.index.counts["inputs"] == 16 and verify(out) == []


def test_a_set_from_before_checksums_is_rebuilt_not_called_finished(tmp_path):
    # Same command, same inputs, but its samples carry no checksums: the loader would refuse
    # it, so "nothing to do" would leave the user a set nothing can read.
    from shards.loader import create_loader

    out = tmp_path / "out"
    run_ingest("synth", None, out, "synth.n=12")
    index = json.loads((out / "index.json").read_text())
    index["sample_checksum"] = ""  # what a set written before checksums records
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="written before samples carried checksums"):
        create_loader(out, "train", 2, mode="eval")
    again = run_ingest("synth", None, out, "synth.n=12")
    assert not again.skipped and read_index(out).sample_checksum
    assert sum(len(b["key"]) for b in create_loader(out, "train", 2, mode="eval")) > 0


def test_interrupted_ingest_resumes_to_the_same_set(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "shards",
        "synth",
        "--n",
        "120",
        "--size",
        str(SIZE),
        "--seed",
        "3",
        "--workers",
        "1",
        "--out",
    ]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    journal = killed / ".staging" / "journal.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if journal.is_file() and journal.read_text().count("\n") >= 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "index.json").exists(), "a killed ingest must not look finished"
    with pytest.raises(FileNotFoundError):
        read_index(killed)
    resumed = subprocess.run([*cmd, str(killed)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    fresh = tmp_path / "fresh"
    subprocess.run([*cmd, str(fresh)], env=env, capture_output=True, check=True)
    a, b = read_index(killed), read_index(fresh)
    assert [(s.name, s.sha256) for s in a.shards] == [(s.name, s.sha256) for s in b.shards]
    assert verify(killed) == []


def test_ray_fan_out_gives_the_same_output(tmp_path):
    pytest.importorskip("ray")
    local = run_ingest("synth", None, tmp_path / "local", "synth.n=16")
    # A fresh process: Ray keeps process-wide state (auth mode, core worker) after shutdown that
    # would leak into later tests that start their own Ray.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "shards", "synth", "--n", "16", "--size", str(SIZE)]
    cmd += ["--seed", "0", "--out", str(out), "--ray-address", "local"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    viaray = read_index(out)
    assert [s.sha256 for s in local.index.shards] == [s.sha256 for s in viaray.shards]


def test_inspect_counts_and_contact_sheet(tmp_path):
    out = tmp_path / "out"
    run_ingest("synth", None, out, "synth.n=24")
    table = count_table(out)
    assert "train" in table and "status: ok 24" in table
    png = contact_sheet(out, per_class=3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_split_is_stratified_grouped_and_seeded():
    from shards.split import SplitConfig, assign_splits

    labels = [i % 4 for i in range(400)]
    groups = [f"g{i // 4}" for i in range(400)]  # each group holds one of each class
    content = [f"{(i * 7919) % 400:04d}" for i in range(400)]  # pixel hashes stand-ins
    cfg = SplitConfig(val_fraction=0.2, test_fraction=0.2, seed=5)
    splits = assign_splits(labels, groups, [None] * 400, cfg, content)
    assert splits == assign_splits(labels, groups, [None] * 400, cfg, content)
    other = SplitConfig(0.2, 0.2, seed=6)
    assert splits != assign_splits(labels, groups, [None] * 400, other, content)
    # Other group names (another machine's secret key pseudonymises patients differently),
    # same content: the same split.
    renamed = [f"p{(int(g[1:]) * 37) % 101:03d}x{g}" for g in groups]
    assert splits == assign_splits(labels, renamed, [None] * 400, cfg, content)
    for s, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        assert abs(splits.count(s) / 400 - frac) < 0.03
    by_group: dict[str, set] = {}
    for g, s in zip(groups, splits):
        by_group.setdefault(g, set()).add(s)
    assert all(len(v) == 1 for v in by_group.values())


def test_secret_file_is_private_and_pseudonyms_are_keyed(tmp_path):
    from shards.privacy import load_secret, pseudonymize

    key = load_secret(tmp_path / "k" / "secret.key")
    assert (tmp_path / "k" / "secret.key").stat().st_mode & 0o777 == 0o600
    assert load_secret(tmp_path / "k" / "secret.key") == key
    other = load_secret(tmp_path / "k2")
    assert pseudonymize("PAT-1", key) == pseudonymize("PAT-1", key)
    assert pseudonymize("PAT-1", key) != pseudonymize("PAT-1", other)
    assert "PAT" not in pseudonymize("PAT-1", key)
