"""srmri's shard loader side by side with its peers, per wall second and per CPU second.

Every pipeline reads the same ``--n`` images of ``--size`` px (16-bit, 4 classes), draws a
random ``--crop`` crop and a horizontal flip per sample, and delivers float32 ``[B,1,C,C]``
batches in [0, 1] (plus labels) of ``--batch`` samples to the main process, with one torch
thread, for each ``--workers`` count. Pipelines:

* ``srmri``: :func:`shards.loader.create_loader` with ``image_dtype="uint16"`` (the transform
  crops and flips the stored values; per-sample checksums verified); ``srmri-nocheck``: the
  same with ``verify_checksums=False`` (what the checksums cost); ``srmri-float``: float32
  images to the transform (what the trainer's transforms receive); ``srmri-before``: the
  loader of ``--before`` (a copy of an older ``shards`` package), if given, with the settings
  of ``srmri`` when it knows per-sample checksums (else those of the issue-2 loader).
* ``litdata``: ``litdata.StreamingDataset(batch_decode=1)`` over ``litdata.optimize`` chunks.
* ``mosaic``: MosaicML ``streaming.StreamingDataset`` over MDS shards (``ndarray`` column).
* ``webdataset``: plain ``webdataset.WebDataset`` over tar shards of ``.npy`` + ``.cls``.
* ``imagefolder``: torchvision ``ImageFolder`` over 16-bit PNG files.

The peers run in their own virtual environment, never the project's (set up once)::

    python3 -m venv /tmp/srmri-peers
    /tmp/srmri-peers/bin/pip install -r benchmarks/requirements-peers.txt
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loader_peers.py \\
        --peer-python /tmp/srmri-peers/bin/python

Each measurement is one epoch in a fresh interpreter (worker start-up included; CPU time is
that process's plus its reaped workers'). Rounds are interleaved (round 1 runs every pipeline
and worker count, then round 2, ...) so load from other jobs spreads over all of them; the
table shows medians over the rounds.

What the checksums cost is then measured apart (``--cost-epochs``, 0 skips it), since it is
smaller than the spread between two epochs on a shared machine (epochs of one process varied by
+-20% there): without workers, ``srmri`` and ``srmri-nocheck`` make the same batches in turns
in one process, each batch's CPU time taken apart (:func:`checksum_cost`); the difference per
sample, times each worker count's samples per CPU second, is the share of the throughput the
checks cost (a worker runs the same checks per sample). The rows ``srmri`` and
``srmri-nocheck`` of the table show the same difference, within that spread.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_pipelines import PEERS, run_peer, write_peer_stores

OURS = ("srmri", "srmri-nocheck", "srmri-float", "srmri-before")


def synth_data(root: Path, n: int, size: int) -> None:
    """Write ``images.npy`` (uint16 ``[n,size,size]``) and ``labels.npy``: the shared inputs."""
    rng = np.random.default_rng(0)
    images = np.lib.format.open_memmap(
        root / "images.npy", mode="w+", dtype=np.uint16, shape=(n, size, size)
    )
    for i in range(n):  # smooth random structure plus noise, like a scan (as benchmarks/loader)
        coarse = rng.random((size // 16, size // 16), dtype=np.float32)
        image = np.kron(coarse, np.ones((16, 16), np.float32)) * 0.8
        image += rng.random((size, size), dtype=np.float32) * 0.2
        images[i] = (image * 65535).astype(np.uint16)
    images.flush()
    np.save(root / "labels.npy", np.arange(n, dtype=np.int64) % 4)


def write_our_set(root: Path, shard_size: int) -> None:
    """Write the inputs as an srmri shard set in ``root/srmri`` (project venv only)."""
    import webdataset as wds

    from shards.format import DatasetIndex, ShardInfo, encode_sample, shard_name, write_index

    images, labels = np.load(root / "images.npy", mmap_mode="r"), np.load(root / "labels.npy")
    out = root / "srmri"
    out.mkdir()
    infos: list[ShardInfo] = []
    for start in range(0, len(images), shard_size):
        infos.append(ShardInfo(shard_name("train", len(infos)), "train", 0, ""))
        with wds.TarWriter(str(out / infos[-1].name), mtime=0) as sink:
            for i in range(start, min(start + shard_size, len(images))):
                key = f"img_{i:07d}"
                sink.write(encode_sample(key, images[i], int(labels[i]), {"key": key}))
                infos[-1].count += 1
    classes = ["glioma", "meningioma", "notumor", "pituitary"]
    write_index(out, DatasetIndex("peers-bench", classes, images.shape[1], infos, ""))
    # The same shards for an older loader, whose index format knew no sample_checksum.
    before = root / "srmri-before"
    before.mkdir()
    for info in infos:
        (before / info.name).symlink_to(out / info.name)
    index = json.loads((out / "index.json").read_text())
    index.pop("sample_checksum")
    (before / "index.json").write_text(json.dumps(index))


def run_ours(name: str, root: Path, workers: int, batch: int, crop: int) -> dict[str, float]:
    """One timed epoch of our loader (``name`` says which variant)."""
    import torch

    torch.set_num_threads(1)
    return timed_epoch(our_loader(name, root, workers, batch, crop))


def our_loader(name: str, root: Path, workers: int, batch: int, crop: int) -> Any:
    """The loader of one of our variants (see the module docstring)."""
    from loader import CropFlip  # benchmarks/loader.py (project venv only)

    from shards.loader import create_loader

    old = name == "srmri-before" and importlib.util.find_spec("shards.checksum") is None
    kwargs: dict[str, Any] = {}
    if name in ("srmri", "srmri-nocheck") or (name == "srmri-before" and not old):
        kwargs["image_dtype"] = "uint16"
    if name == "srmri-nocheck":
        kwargs["verify_checksums"] = False
    return create_loader(
        root / ("srmri-before" if old else "srmri"), "train", batch,
        mode="train", num_workers=workers, transform=CropFlip(crop), **kwargs,
    )  # fmt: skip


def checksum_cost(root: Path, args: argparse.Namespace) -> dict[str, float]:
    """This thread's CPU microseconds per sample with and without checksums, no workers.

    ``srmri`` and ``srmri-nocheck`` make the same batches; they take turns batch by batch
    (which goes first alternates), each batch timed on its own, so that both see the same
    load and neither gains from the other having just read the same samples.
    """
    import torch

    torch.set_num_threads(1)
    on, off = (our_loader(n, root, 0, args.batch, args.crop) for n in OURS[:2])
    spent, samples = {"on": 0.0, "off": 0.0}, 0
    for epoch in range(args.cost_epochs):
        on.set_epoch(epoch)
        off.set_epoch(epoch)
        turns = [("on", iter(on)), ("off", iter(off))]
        for step in range(len(on)):
            for side, batches in turns[:: 1 if step % 2 else -1]:
                start = time.thread_time()
                samples += len(next(batches)["image"]) * (side == "on")
                spent[side] += time.thread_time() - start
    return {side: 1e6 * cpu / samples for side, cpu in spent.items()}


def timed_epoch(batches: Any) -> dict[str, float]:
    """Samples, wall seconds and CPU seconds (this process + reaped children) of one epoch."""
    import resource

    def cpu() -> float:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    wall, used, count = time.perf_counter(), cpu(), 0
    it = iter(batches)
    for batch in it:
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        assert images.dtype.is_floating_point and images.shape[-1] == images.shape[-2]
        count += len(images)
    del it  # joins the workers, so their CPU time is in RUSAGE_CHILDREN
    return {"samples": count, "wall": time.perf_counter() - wall, "cpu": cpu() - used}


def measure(args: argparse.Namespace, root: Path, name: str, workers: int) -> dict[str, float]:
    """Run one pipeline's epoch in a fresh interpreter and return its figures."""
    python = sys.executable if name in OURS else args.peer_python
    cmd = [python, __file__, "--run", name, "--workers", str(workers), "--dir", str(root)]
    cmd += ["--batch", str(args.batch), "--crop", str(args.crop)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if name == "srmri-before":
        env["PYTHONPATH"] = str(args.before)  # its `shards` package shadows the installed one
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{name} with {workers} workers failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows: dict[tuple[str, int], list[dict[str, float]]], args: argparse.Namespace) -> None:
    """Print medians per pipeline and worker count, wall and per CPU second."""
    print(f"\nmedians of {args.rounds} interleaved rounds; samples/s (wall) | per CPU-second")
    names = list(dict.fromkeys(name for name, _ in rows))
    print(f"{'pipeline':<15}" + "".join(f"{f'{w} workers':>22}" for w in args.workers))
    for name in names:
        line = f"{name:<15}"
        for w in args.workers:
            runs = rows[name, w]
            wall = statistics.median(r["samples"] / r["wall"] for r in runs)
            cpu = statistics.median(r["samples"] / r["cpu"] for r in runs)
            line += f"{wall:>13.0f} | {cpu:>6.0f}"
        print(line, flush=True)


def report_cost(args: argparse.Namespace, root: Path, rows: dict) -> None:
    """Measure the checks' CPU per sample; print it as a share of each worker count's rate."""
    cmd = [sys.executable, __file__, "--run", "checksum-cost", "--dir", str(root)]
    cmd += ["--batch", str(args.batch), "--crop", str(args.crop)]
    cmd += ["--cost-epochs", str(args.cost_epochs)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"checksum cost failed:\n{done.stderr[-3000:]}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    check = got["on"] - got["off"]
    loads = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(
        f"\nchecksums: {got['on']:.1f} us CPU per sample with, {got['off']:.1f} without "
        f"(0 workers, batches taking turns, {args.cost_epochs} epochs, load {loads}): "
        f"{check:.1f} us, as a share of srmri's rate per CPU-second:"
    )
    for w in args.workers:
        if ("srmri", w) in rows:
            rate = statistics.median(r["samples"] / r["cpu"] for r in rows["srmri", w])
            print(f"  {w} workers: {check * rate / 1e4:.1f}%", flush=True)


def orchestrate(args: argparse.Namespace) -> None:
    """Write every store, then run the interleaved rounds and print the table."""
    print("command:", shlex.join(["python", *sys.argv]))
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}")
    before = ["srmri-before"] if args.before else []
    names = ["srmri", "srmri-nocheck", "srmri-float", *before, *PEERS]
    names = [n for n in names if n in (args.pipelines or names)]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        synth_data(root, args.n, args.size)
        write_our_set(root, args.shard_size)
        write = [args.peer_python, __file__, "--write-peers", "--dir", str(root)]
        subprocess.run(
            [*write, "--shard-size", str(args.shard_size)],
            check=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        print(f"wrote {args.n} samples into 5 stores in {time.perf_counter() - t0:.0f} s")
        rows: dict[tuple[str, int], list[dict[str, float]]] = {}
        for r in range(args.rounds):
            for w in args.workers:
                for name in names:
                    got = measure(args, root, name, w)
                    rows.setdefault((name, w), []).append(got)
                    rate, per_cpu = got["samples"] / got["wall"], got["samples"] / got["cpu"]
                    print(f"  {name} {w} workers: {rate:.0f}/s, {per_cpu:.0f}/CPU-s", flush=True)
            loads = Path("/proc/loadavg").read_text().split()[:3]
            print(f"round {r + 1} done, load {' '.join(loads)}", flush=True)
        report(rows, args)
        if args.cost_epochs:
            report_cost(args, root, rows)
    print(f"load after: {Path('/proc/loadavg').read_text().strip()}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults: the settings of issue 13)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=4160, help="samples")
    p.add_argument("--size", type=int, default=256, help="image side")
    p.add_argument("--crop", type=int, default=224, help="random crop side")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    p.add_argument("--shard-size", type=int, default=520, help="samples per shard / chunk")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median shown)")
    p.add_argument("--peer-python", default="/tmp/srmri-peers/bin/python", help="peers' venv")
    p.add_argument("--before", type=Path, default=None, help="folder holding an older shards/")
    p.add_argument("--pipelines", nargs="+", default=None, help="run only these (default: all)")
    p.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    p.add_argument("--cost-epochs", type=int, default=4, help="epochs timing the checks")
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one measurement
    p.add_argument("--write-peers", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Orchestrate, or (internally) write the peers' stores or run one measurement."""
    args = parse_args(argv)
    if args.write_peers:
        write_peer_stores(args.dir, args.shard_size)
    elif args.run == "checksum-cost":
        print(json.dumps(checksum_cost(args.dir, args)))
    elif args.run in OURS:
        print(json.dumps(run_ours(args.run, args.dir, args.workers[0], args.batch, args.crop)))
    elif args.run is not None:
        result = run_peer(args.run, args.dir, args.workers[0], args.batch, args.crop)
        print(json.dumps(timed_epoch(result)))
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
