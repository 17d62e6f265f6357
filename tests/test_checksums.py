"""Per-sample checksums: damage on disk is an error naming the shard and key, never a sample."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from helpers import make_shard_set

from shards import checksum
from shards.checksum import (
    CHECKSUM_SUFFIX,
    CorruptSampleError,
    check_sample,
    check_samples,
    payload_digest,
)
from shards.format import encode_sample, read_index, shard_name, to_uint16
from shards.loader import create_loader
from shards.shard_reader import iter_shard
from shards.verify import verify
from shards.writer import ManifestRow, write_manifest

COUNTS = {"train": [6, 5], "val": [4]}


def make_set(root: Path, seed: int = 0) -> Path:
    """A real shard set with a manifest (so ``verify`` has nothing else to report)."""
    index = make_shard_set(root, COUNTS, size=16, seed=seed)
    rows = []
    for info in index.shards:
        for key in member_keys(root / info.name):
            rows.append(ManifestRow(key, "synth", "", None, 0, "", "ok", "", info.split, info.name))
    write_manifest(root / "manifest.parquet", rows, {})
    return root


def member_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))


def overwrite(path: Path, member: str, at: int, new: bytes) -> bytes:
    """Replace bytes of one member's payload in place on disk; returns the old bytes."""
    with tarfile.open(path) as tar:
        start = tar.getmember(member).offset_data + at
    data = bytearray(path.read_bytes())
    old = bytes(data[start : start + len(new)])
    data[start : start + len(new)] = new
    path.write_bytes(bytes(data))
    return old


def read_all(root: Path, split: str, **kw) -> list[dict]:
    return list(create_loader(root, split, 2, mode="eval", **kw))


@pytest.mark.parametrize("workers", [0, 1])
def test_flipped_pixel_bytes_are_an_error_naming_shard_and_key(tmp_path: Path, workers: int):
    root = make_set(tmp_path / "set")
    shard = root / shard_name("train", 1)
    key = member_keys(shard)[2]
    old = overwrite(shard, f"{key}.npy", 200, b"\x00\xff\x00")  # inside the pixels
    assert old != b"\x00\xff\x00"
    with pytest.raises(Exception, match=rf"{shard}: sample '{key}': \.npy does not match") as exc:
        read_all(root, "train", num_workers=workers)
    assert "shards verify" in str(exc.value)
    # Switched off, the damage goes through unnoticed: the check is what catches it.
    assert len(read_all(root, "train", verify_checksums=False)) == 6


def test_a_changed_label_digit_is_an_error(tmp_path: Path):
    root = make_set(tmp_path / "set")
    shard = root / shard_name("val", 0)
    key = member_keys(shard)[1]
    old = overwrite(shard, f"{key}.cls", 0, b"3")
    assert old != b"3"  # a valid label, just the wrong one
    with pytest.raises(CorruptSampleError, match=rf"{shard}: sample '{key}': \.cls does not"):
        read_all(root, "val")


def test_damage_in_an_aligned_set_names_that_set(tmp_path: Path):
    root = make_set(tmp_path / "hr")
    sr = make_set(tmp_path / "sr", seed=1)
    shard = sr / shard_name("val", 0)
    key = member_keys(shard)[3]
    overwrite(shard, f"{key}.npy", 140, b"\x01")
    with pytest.raises(CorruptSampleError, match=rf"{shard}: sample '{key}'"):
        read_all(root, "val", aligned_roots=[sr])


def test_a_missing_checksum_member_is_damage_where_the_set_records_them(tmp_path: Path):
    root = make_set(tmp_path / "set")
    shard = root / shard_name("val", 0)
    key = member_keys(shard)[0]
    with tarfile.open(shard) as tar:  # rewrite the shard without one sample's checksum
        kept = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in kept:
            if m.name != f"{key}.{CHECKSUM_SUFFIX}":
                tar.addfile(m, io.BytesIO(data))
    with pytest.raises(CorruptSampleError, match=rf"sample '{key}': has no \.xxh3 member"):
        read_all(root, "val")


def write_old_set(root: Path) -> Path:
    """A set as written before checksums: no .xxh3 members, no sample_checksum in its index."""
    for info in read_index(make_set(root)).shards:
        path = root / info.name
        with tarfile.open(path) as tar:
            samples = {}
            for m in tar.getmembers():
                key, suffix = m.name.split(".", 1)
                samples.setdefault(key, {})[suffix] = tar.extractfile(m).read()
        with wds.TarWriter(str(path)) as sink:
            for key, parts in samples.items():
                parts.pop(CHECKSUM_SUFFIX)
                sink.write({"__key__": key, **parts})
    data = json.loads((root / "index.json").read_text())
    del data["sample_checksum"]
    (root / "index.json").write_text(json.dumps(data))
    return root


def test_a_set_without_checksums_is_refused_but_still_verifies(tmp_path: Path):
    root = write_old_set(tmp_path / "old")
    assert read_index(root).sample_checksum == ""
    with pytest.raises(ValueError, match=r"written before samples carried checksums.*ingest"):
        create_loader(root, "train", 2, mode="train")
    problems = verify(root)
    assert all("sha256" in p for p in problems) and len(problems) == 3  # rewritten shards
    assert len(read_all(root, "train", verify_checksums=False)) == 6
    sr = write_old_set(tmp_path / "old-sr")
    with pytest.raises(ValueError, match=rf"{sr}: this shard set was written before"):
        create_loader(make_set(tmp_path / "new"), "val", 2, mode="eval", aligned_roots=[sr])


def test_verify_names_every_damaged_sample(tmp_path: Path):
    root = make_set(tmp_path / "set")
    assert verify(root) == []
    shard = root / shard_name("train", 0)
    keys = member_keys(shard)
    overwrite(shard, f"{keys[1]}.npy", 150, b"\x07\x07")
    overwrite(shard, f"{keys[4]}.json", 1, b"#")
    problems = verify(root)
    assert problems[0].startswith(f"{shard}: sha256")
    assert problems[1].startswith(f"{shard}: sample '{keys[1]}': .npy does not match its checksum")
    assert problems[2].startswith(f"{shard}: sample '{keys[4]}': .json does not match")
    assert len(problems) == 3  # a damaged sample does not hide the ones after it (count ok)


def test_encode_sample_records_each_member(tmp_path: Path):
    sample = encode_sample("k", to_uint16(np.full((4, 4), 0.5)), 2, {"a": 1})
    lines = sample[CHECKSUM_SUFFIX].decode().splitlines()
    assert [line.split()[0] for line in lines] == ["cls", "json", "npy"]
    path = tmp_path / "one.tar"
    with wds.TarWriter(str(path), mtime=0) as sink:
        sink.write(sample)
    with tarfile.open(path) as tar:  # an integer mtime: no pax header before every member
        assert [m.pax_headers for m in tar.getmembers()] == [{}] * 4
    [(key, parts)] = list(iter_shard(str(path), 0, frozenset({"cls", "npy"}), checksums="require"))
    assert key == "k" and sorted(parts) == ["cls", "npy"] and bytes(parts["cls"]) == b"2"
    assert read_index(make_set(tmp_path / "set")).sample_checksum == "xxh3_64"


def test_samples_checked_together_agree_with_one_by_one(tmp_path: Path):
    shard = str(make_set(tmp_path / "set") / shard_name("train", 0))
    samples = list(iter_shard(shard, 0, frozenset({"cls", "npy", "xxh3"}), checksums="off"))
    one_by_one = [check_sample(shard, key, parts, True, "npy") for key, parts in samples]
    assert check_samples(shard, samples, True, "npy") == one_by_one
    assert one_by_one == [payload_digest(parts["npy"]) for _, parts in samples]
    assert checksum._check_canonical(samples, "npy") == one_by_one  # the group's fast path

    def with_member(i: int, member: bytes) -> list:
        key, parts = samples[i]
        return [*samples[:i], (key, {**parts, CHECKSUM_SUFFIX: member}), *samples[i + 1 :]]

    # laid out otherwise (lines in another order): checked one by one, the same outcome
    lines = samples[1][1][CHECKSUM_SUFFIX].splitlines(keepends=True)
    assert check_samples(shard, with_member(1, b"".join(lines[::-1])), True, "npy") == one_by_one
    # two neighbours' members that only together hold their lines: never taken as valid
    a = samples[2][1][CHECKSUM_SUFFIX].splitlines(keepends=True)
    b = samples[3][1][CHECKSUM_SUFFIX].splitlines(keepends=True)
    shifted = with_member(2, b"".join(a + b[:1]))
    shifted = [*shifted[:3], (samples[3][0], {**samples[3][1], CHECKSUM_SUFFIX: b"".join(b[1:])})]
    shifted += samples[4:]
    with pytest.raises(CorruptSampleError, match=rf"sample '({samples[2][0]}|{samples[3][0]})'"):
        check_samples(shard, shifted, True, "npy")
    # a wrong label digit in one sample of the group: that sample is named
    key, parts = samples[4]
    damaged = [*samples[:4], (key, {**parts, "cls": b"3" if parts["cls"] != b"3" else b"2"})]
    with pytest.raises(CorruptSampleError, match=rf"sample '{key}': \.cls does not match"):
        check_samples(shard, damaged + samples[5:], True, "npy")
    # no checksum members (a set written before them): nothing to compare, unless required
    bare = [(k, {s: v for s, v in p.items() if s != CHECKSUM_SUFFIX}) for k, p in samples]
    assert check_samples(shard, bare, False, "npy") == [None] * len(samples)
    with pytest.raises(CorruptSampleError, match=r"has no \.xxh3 member"):
        check_samples(shard, bare, True, "npy")
