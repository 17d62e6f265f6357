"""The shard loader over real shard sets on disk, over HTTP and in real 2-process gloo jobs."""

from __future__ import annotations

import datetime
import functools
import http.server
import io
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import make_shard_set, run_distributed

from shards.checksum import payload_digest
from shards.degrade import sample_seed
from shards.format import decode_image
from shards.loader import ShardLoader, create_loader
from shards.tar_reader import mapped_members, tar_members

TRAIN = [7, 2, 12]  # uneven on purpose: 21 samples
VAL = [5, 2]


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("set")
    make_shard_set(root, {"train": TRAIN, "val": VAL}, size=16)
    return root


def stored_images(root: Path) -> dict[str, np.ndarray]:
    """Every sample's image read straight from the tars with the format's own decoder."""
    out = {}
    for path in sorted(root.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".npy"):
                    out[m.name[:-4]] = decode_image(tar.extractfile(m).read())
    return out


def keys_of(batches: list[dict[str, Any]]) -> list[list[str]]:
    return [b["key"] for b in batches]


# ---- 2 real gloo ranks x 2 workers -------------------------------------------------------------


def _ddp_check(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)
    loader = create_loader(root, "train", 2, mode="train", num_workers=2, seed=3)
    assert (loader.rank, loader.world_size) == (rank, world)
    steps, keys = 0, []
    for batch in loader:
        # A rank with an extra step would block here; the barrier below then times out.
        step = torch.tensor([steps])
        dist.all_reduce(step, op=dist.ReduceOp.MAX)
        assert step.item() == steps
        keys += batch["key"]
        steps += 1
    dist.monitored_barrier(timeout=timeout)
    assert steps == len(loader) == 21 // 2 // 2
    assert len(keys) == len(set(keys)) == steps * 2
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (steps, keys))
    assert len({s for s, _ in gathered}) == 1
    assert not set(gathered[0][1]) & set(gathered[1][1])

    loader = create_loader(root, "val", 3, mode="eval", num_workers=2)
    seen, padded, steps = [], 0, 0
    for batch in loader:
        dist.all_reduce(torch.ones(1))
        seen += [k for k, v in zip(batch["key"], batch["valid"].tolist()) if v]
        padded += int((~batch["valid"]).sum())
        steps += 1
    dist.monitored_barrier(timeout=timeout)
    assert steps == len(loader)
    dist.all_gather_object(gathered, (seen, padded))
    every = [k for s, _ in gathered for k in s]
    assert len(every) == len(set(every)) == sum(VAL)
    assert sum(p for _, p in gathered) == 2 * 4 - sum(VAL)


@pytest.mark.timeout(180)
def test_two_ranks_two_workers_uneven_shards(shard_root: Path) -> None:
    run_distributed(_ddp_check, 2, str(shard_root))


# ---- order, determinism, resume ----------------------------------------------------------------


def test_train_epochs_deterministic_and_different(shard_root: Path) -> None:
    def epoch_batches(epoch: int, seed: int = 0) -> list[dict[str, Any]]:
        loader = create_loader(shard_root, "train", 4, mode="train", seed=seed, shuffle_chunk=5)
        loader.set_epoch(epoch)
        return list(loader)

    first = epoch_batches(0)
    assert keys_of(first) == keys_of(epoch_batches(0))
    assert keys_of(first) != keys_of(epoch_batches(1))
    assert keys_of(first) != keys_of(epoch_batches(0, seed=1))
    flat = [k for ks in keys_of(first) for k in ks]
    assert len(flat) == len(set(flat)) == 21 // 4 * 4
    stored = stored_images(shard_root)
    for batch in first:
        assert batch["image"].shape == (4, 1, 16, 16) and batch["image"].dtype == torch.float32
        assert batch["label"].dtype == torch.int64 and batch["valid"].all()
        for key, image, label in zip(batch["key"], batch["image"], batch["label"]):
            expect = stored[key].astype(np.float32) / 65535
            np.testing.assert_allclose(image[0].numpy(), expect, rtol=1e-6)
            assert label.item() == int(key.split("_")[1]) % 4


@pytest.mark.parametrize(("workers", "batch", "stop"), [(0, 2, 3), (2, 3, 1), (2, 3, 5), (2, 2, 4)])
def test_mid_epoch_resume_yields_exactly_the_rest(
    shard_root: Path, workers: int, batch: int, stop: int
) -> None:
    def make() -> ShardLoader:
        loader = create_loader(
            shard_root, "train", batch, mode="train", num_workers=workers, shuffle_chunk=4, seed=7
        )
        loader.set_epoch(2)
        return loader

    full = list(make())
    interrupted = make()
    for done, b in enumerate(interrupted, start=1):
        assert b["key"] == full[done - 1]["key"]
        if done == stop:
            break
    state = interrupted.state_dict()
    assert (state["epoch"], state["batches_done"]) == (2, stop)

    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a trainer re-announcing the same epoch keeps the restored position
    rest = list(resumed)
    assert keys_of(rest) == keys_of(full[stop:])
    for a, b in zip(rest, full[stop:]):
        assert torch.equal(a["image"], b["image"])
    assert resumed.state_dict()["batches_done"] == len(resumed)
    assert keys_of(list(resumed)) == keys_of(full)  # the next pass plays the whole epoch again


def test_eval_tiny_split_pads_every_rank(tmp_path: Path) -> None:
    make_shard_set(tmp_path, {"train": [4], "val": [1]}, size=8)
    per_rank = [
        list(create_loader(tmp_path, "val", 4, mode="eval", rank=r, world_size=3)) for r in range(3)
    ]
    assert [len(b) for b in per_rank] == [1, 1, 1]
    valid = [k for bs in per_rank for k, v in zip(bs[0]["key"], bs[0]["valid"]) if v]
    assert valid == ["toy_000004"]
    assert [bs[0]["valid"].tolist() for bs in per_rank] == [[True], [False], [False]]


# ---- transform, aligned sets, http -------------------------------------------------------------


def _mark(sample: dict[str, Any]) -> dict[str, Any]:
    assert sample["image"].shape == (1, 16, 16) and isinstance(sample["seed"], int)
    sample["seen_seed"] = torch.tensor(sample["seed"])
    sample["image"] = sample["image"].flip(-1) if sample["seed"] % 2 else sample["image"]
    return sample


def test_transform_sees_per_sample_seed(shard_root: Path) -> None:
    plain = create_loader(shard_root, "train", 4, mode="train", seed=5)
    marked = create_loader(shard_root, "train", 4, mode="train", seed=5, transform=_mark)
    for loader in (plain, marked):
        loader.set_epoch(1)
    for a, b in zip(plain, marked):
        assert a["key"] == b["key"] and a["digest"] == b["digest"]
        for i, digest in enumerate(b["digest"]):
            # seeded by what the sample holds: its payload's digest, not its key
            assert digest == payload_digest(_npy_of(shard_root, b["key"][i]))
            assert b["seen_seed"][i].item() == b["seed"][i].item() == sample_seed(5, 1, digest)
            want = a["image"][i].flip(-1) if sample_seed(5, 1, digest) % 2 else a["image"][i]
            assert torch.equal(b["image"][i], want)
    evals = [create_loader(shard_root, "val", 8, mode="eval", seed=5) for _ in range(2)]
    evals[1].set_epoch(4)
    batches = [next(iter(e)) for e in evals]
    assert batches[0]["seed"].tolist() == batches[1]["seed"].tolist()
    assert batches[0]["seed"].tolist() == [sample_seed(5, -1, d) for d in batches[0]["digest"]]


def _npy_of(root: Path, key: str) -> bytes:
    """The stored ``.npy`` payload of ``key`` (read with tarfile, not the loader)."""
    import tarfile

    for shard in sorted(root.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name == f"{key}.npy":
                    return tar.extractfile(member).read()
    raise KeyError(key)


def test_aligned_roots(shard_root: Path, tmp_path: Path) -> None:
    other = tmp_path / "sr"
    make_shard_set(other, {"train": TRAIN, "val": VAL}, size=16, seed=1)
    loader = create_loader(shard_root, "train", 4, mode="train", aligned_roots=[other])
    stored = stored_images(other)
    for batch in loader:
        assert len(batch["aligned"]) == 1
        assert not torch.equal(batch["aligned"][0], batch["image"])
        for key, image in zip(batch["key"], batch["aligned"][0]):
            np.testing.assert_allclose(image[0].numpy(), stored[key] / 65535, rtol=1e-6)

    counts = tmp_path / "counts"
    make_shard_set(counts, {"train": [7, 3, 11]}, size=16)
    with pytest.raises(ValueError, match=r"aligned shard set .*counts.*differs"):
        create_loader(shard_root, "train", 4, mode="train", aligned_roots=[counts])
    shifted = tmp_path / "keys"  # same names and counts, other keys: caught while reading
    make_shard_set(shifted, {"val": [1], "train": TRAIN}, size=16)
    loader = create_loader(shard_root, "train", 4, mode="train", aligned_roots=[shifted])
    with pytest.raises(ValueError, match="same keys in the same order"):
        list(loader)


def test_an_aligned_set_made_from_another_data_set_is_refused(
    shard_root: Path, tmp_path: Path
) -> None:
    import dataclasses

    from shards.format import read_index, write_index

    own = read_index(shard_root).dataset_id
    for made_for, refused in ((own, False), ("an-older-version", True)):
        sr = tmp_path / f"sr-{refused}"
        index = make_shard_set(sr, {"train": TRAIN, "val": VAL}, size=16, seed=1)
        write_index(sr, dataclasses.replace(index, source_dataset_id=made_for))
        if not refused:
            create_loader(shard_root, "train", 4, mode="train", aligned_roots=[sr])
            continue
        with pytest.raises(
            ValueError, match=r"made from data set an-older-version.*re-run enhance"
        ):
            create_loader(shard_root, "train", 4, mode="train", aligned_roots=[sr])


@pytest.fixture
def http_root(shard_root: Path) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(shard_root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("split", "mode", "workers"), [("train", "train", 2), ("val", "eval", 0)])
def test_http_matches_local(
    shard_root: Path, http_root: str, split: str, mode: Any, workers: int
) -> None:
    local = list(create_loader(shard_root, split, 3, mode=mode, num_workers=workers))
    remote = list(create_loader(http_root, split, 3, mode=mode, num_workers=workers))
    assert keys_of(remote) == keys_of(local) and len(local) > 0
    for a, b in zip(local, remote):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["valid"], b["valid"])


# ---- tar reading ------------------------------------------------------------------------------


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT])
def test_plain_tar_formats_and_damage(shard_root: Path, tmp_path: Path, tar_format: int) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in shard_root.iterdir():
        if path.suffix != ".tar":
            (copy / path.name).write_bytes(path.read_bytes())
            continue
        with (
            tarfile.open(path) as src,
            tarfile.open(copy / path.name, "w", format=tar_format) as dst,
        ):
            for m in src.getmembers():
                m.pax_headers = {}
                m.mtime = int(m.mtime)
                dst.addfile(m, src.extractfile(m))
    want = list(create_loader(shard_root, "val", 3, mode="eval"))
    got = list(create_loader(copy, "val", 3, mode="eval"))
    assert keys_of(got) == keys_of(want)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, want))

    data = (copy / "val-000000.tar").read_bytes()
    (copy / "val-000000.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"val-000000.tar: .*(truncated|ends after)"):
        list(create_loader(copy, "val", 3, mode="eval"))
    (copy / "val-000000.tar").write_bytes(data[:100] + b"X" + data[101:])
    with pytest.raises(ValueError, match=r"val-000000.tar: bad tar header checksum"):
        list(create_loader(copy, "val", 3, mode="eval"))


@pytest.mark.parametrize(
    "tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]
)
def test_mapped_walk_reads_what_the_stream_reader_reads(tmp_path: Path, tar_format: int) -> None:
    path = tmp_path / "t.tar"
    names = ["a.npy", "a.cls", "d/" * 60 + "long.npy", "p" * 90 + "/" + "q" * 90 + ".cls"]
    with tarfile.open(path, "w", format=tar_format) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = 700 * i + 3, 1.5 if tar_format == tarfile.PAX_FORMAT else 0
            tar.addfile(info, io.BytesIO(bytes([i]) * info.size))
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # not a regular file: not a member
    data = path.read_bytes()
    streamed = list(tar_members(io.BytesIO(data), "t", lambda name: True))
    walked = list(mapped_members(data, "t"))
    assert [(name, data[at : at + n]) for name, at, n in walked] == streamed
    assert [name for name, _ in streamed] == names
    last = walked[-1][1] - 512  # the last member's own header
    for at in (0, 130, 150, last + 5, last + 126):  # names, size and checksum fields
        damaged = bytearray(data)
        damaged[at] ^= 0x10
        with pytest.raises(ValueError, match="t: bad tar header"):
            list(mapped_members(bytes(damaged), "t"))
    after = walked[-1][1] + (walked[-1][2] + 511) // 512 * 512 + 512  # the folder's header
    for cut in (len(data) // 2, walked[-1][1] + 1, after):
        with pytest.raises(ValueError, match="t: truncated"):
            list(mapped_members(data[:cut], "t"))


# ---- errors ------------------------------------------------------------------------------------


def test_clear_errors(shard_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'train' has 21 samples.*world_size 4 x batch_size 8"):
        create_loader(shard_root, "train", 8, mode="train", rank=0, world_size=4)
    assert len(create_loader(shard_root, "train", 8, mode="eval", rank=0, world_size=4)) == 1
    with pytest.raises(ValueError, match=rf"{shard_root}: no shards for split 'test'"):
        create_loader(shard_root, "test", 2, mode="eval")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        create_loader(tmp_path, "train", 2, mode="train")

    state = create_loader(shard_root, "train", 2, mode="train", num_workers=2).state_dict()
    for other in (
        create_loader(shard_root, "train", 2, mode="train", rank=0, world_size=2, num_workers=2),
        create_loader(shard_root, "train", 3, mode="train", num_workers=2),
        create_loader(shard_root, "train", 2, mode="train", num_workers=0),
    ):
        with pytest.raises(ValueError, match="saved with other settings"):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        other.load_state_dict({"epoch": 0, "batches_done": 1})
