"""Trainer throughput (images/s): synthetic on-device data vs end to end from shards.

Synthetic: one fixed batch already on the device (the upper bound: model + optimizer only).
End to end: the real ``shards.loader`` reading a shard set (one is written to a temp folder when
``--shards`` is not given) with pinned memory and worker processes, feeding the same trainer step.
Both with and without ``torch.compile``. Defaults are the issue's setting (ResNet50, 224 px,
bf16, channels_last, one GPU); tiny flags run it on a CPU:

    python benchmarks/gpu_throughput.py                       # GPU, ResNet50 224 bf16
    python benchmarks/gpu_throughput.py --device cpu --model resnet10t --size 32 --batch 8 \\
        --steps 4 --warmup 1 --workers 0 --precision fp32 --no-compile

The pieces (:func:`build_backend`, :func:`measure`, :func:`synthetic_batches`,
:func:`shard_batches`, :func:`loader_rate`) are public: ``benchmarks/device_check.py`` times the
paper's configuration with them.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from shards.format import DatasetIndex, ShardInfo, encode_sample, shard_name, to_uint16, write_index
from shards.loader import Transform, create_loader
from trainer.backend import Backend, create_backend
from trainer.config import BackendConfig, ModelConfig, OptimConfig, TrainSection
from trainer.factories import create_model, create_optimizer

__all__ = [
    "Rate",
    "build_backend",
    "loader_rate",
    "main",
    "measure",
    "shard_batches",
    "synthetic_batches",
    "train_step",
    "write_synthetic_shards",
]

CLASSES = 4
Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Rate:
    """A measured rate: the total over every timed step, and the rate of each chunk of steps.

    Attributes:
        per_s: Images (or samples) per second over all timed steps.
        steps: Timed steps (fewer than asked when the batches or the time budget ran out).
        seconds: Timed wall seconds.
        chunks: The rate of each chunk of steps (the device synchronised only at chunk ends,
            so the spread costs no per-step synchronisation).
    """

    per_s: float
    steps: int
    seconds: float
    chunks: list[float] = field(default_factory=list)

    def spread(self) -> tuple[float, float, float]:
        """(min, median, max) of the chunk rates (all three ``per_s`` with one chunk)."""
        if not self.chunks:
            return (self.per_s, self.per_s, self.per_s)
        return (min(self.chunks), statistics.median(self.chunks), max(self.chunks))


def write_synthetic_shards(root: Path, n: int, size: int, per_shard: int = 512) -> Path:
    """Write ``n`` random uint16 ``size``x``size`` train samples as a shard set; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    infos = []
    for i, start in enumerate(range(0, n, per_shard)):
        count = min(per_shard, n - start)
        name = shard_name("train", i)
        with wds.TarWriter(str(root / name)) as sink:
            for j in range(start, start + count):
                img = to_uint16(rng.random((size, size), dtype=np.float32))
                sink.write(encode_sample(f"s{j:08d}", img, j % CLASSES, {"key": f"s{j:08d}"}))
        data = (root / name).read_bytes()
        infos.append(ShardInfo(name, "train", count, hashlib.sha256(data).hexdigest(), len(data)))
    index = DatasetIndex(f"bench-{n}-{size}", [f"c{c}" for c in range(CLASSES)], size, infos, "")
    write_index(root, index)
    return root


def build_backend(
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    train: TrainSection,
    backend_cfg: BackendConfig,
    *,
    device: torch.device,
    batch: int,
    num_classes: int = CLASSES,
    seed: int = 0,
) -> Backend:
    """The trainer's model, optimizer and backend, built as ``trainer.loop.build_run`` does.

    Args:
        model_cfg: The ``model`` section (timm name, channels_last, compile, ...).
        optim_cfg: The ``optim`` section.
        train: The ``train`` section (precision, grad_accum, clip_grad).
        backend_cfg: The ``backend`` section.
        device: Where the model runs.
        batch: Samples per micro-step (DeepSpeed's bookkeeping).
        num_classes: Classifier outputs.
        seed: Seed of the initial weights.

    Returns:
        The backend, its model on ``device``.
    """
    torch.manual_seed(seed)
    model = create_model(model_cfg, num_classes)
    return create_backend(
        backend_cfg,
        train,
        model=model,
        optimizer=create_optimizer(model, optim_cfg),
        device=device,
        micro_batch=batch,
        model_cfg=model_cfg,
    )


def train_step(b: Backend, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One training step, as ``ClassificationTask.train_loss`` and the loop do it for ``hr``.

    Args:
        b: The backend.
        x: Images ``[B, 1, H, W]`` (any device; moved by the backend).
        y: Labels ``[B]``.

    Returns:
        The detached loss (still on the device: no host synchronisation here).
    """
    with b.micro_step():
        loss = F.cross_entropy(b.model(b.to_input(x)).float(), y.to(b.device, non_blocking=True))
        b.backward(loss)
    b.step()
    return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    b: Backend,
    batches: Batches,
    *,
    batch: int,
    steps: int,
    warmup: int,
    chunk: int = 5,
    max_seconds: float = math.inf,
) -> Rate:
    """Images/s of :func:`train_step` over up to ``steps`` steps after ``warmup`` untimed ones.

    Timing stops early when ``batches`` ends (e.g. at the end of a loader's epoch) or when
    ``max_seconds`` of timed steps have passed (checked at chunk ends).

    Args:
        b: The backend (put in train mode here).
        batches: Source of ``(images, labels)``.
        batch: Images per step.
        steps: Timed steps at most.
        warmup: Untimed steps first (compilation, cuDNN autotuning, loader start-up).
        chunk: Steps per timed chunk (the device is synchronised at each chunk's end).
        max_seconds: Time budget of the timed steps.

    Returns:
        The rate; zero steps (rate 0) if ``batches`` ended during the warmup.
    """
    b.train()
    for _ in range(warmup):
        pair = next(batches, None)
        if pair is None:
            return Rate(0.0, 0, 0.0)
        train_step(b, *pair)
    _sync(b.device)
    done, seconds, chunks = 0, 0.0, []
    while done < steps and seconds < max_seconds:
        t0 = time.perf_counter()
        n = 0
        for _ in range(min(chunk, steps - done)):
            pair = next(batches, None)
            if pair is None:
                break
            train_step(b, *pair)
            n += 1
        _sync(b.device)
        dt = time.perf_counter() - t0
        if n == 0:
            break
        done, seconds = done + n, seconds + dt
        chunks.append(n * batch / dt)
        if n < chunk and done < steps:  # the batches ran out
            break
    return Rate(done * batch / seconds if seconds else 0.0, done, seconds, chunks)


def synthetic_batches(
    device: torch.device, batch: int, size: int, classes: int = CLASSES
) -> Batches:
    """One fixed random batch on ``device``, forever (random, not zeros: see METHOD.md)."""
    x = torch.rand(batch, 1, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    while True:
        yield x, y


def shard_batches(
    root: Path | str,
    device: torch.device,
    batch: int,
    workers: int,
    *,
    transform: Transform | None = None,
    seed: int = 0,
    epochs: int | None = None,
) -> Batches:
    """``(image, label)`` batches of the train split through ``shards.loader.create_loader``.

    Pinned memory on CUDA (as ``trainer.loop`` asks for it); the images stay on the host, the
    backend's ``to_input`` moves them (non-blocking).

    Args:
        root: The shard set.
        device: Where training runs (decides pinning).
        batch: Samples per batch.
        workers: Loader worker processes.
        transform: Per-sample transform run in the workers (e.g. the trainer's input transform).
        seed: Loader seed.
        epochs: Stop after this many epochs (None: forever). Each epoch starts its workers
            anew, so a rate meant to be steady should be timed within one epoch.

    Returns:
        The batches.
    """
    loader = create_loader(root, "train", batch, mode="train", seed=seed, num_workers=workers,
                           transform=transform, pin_memory=device.type == "cuda", rank=0,
                           world_size=1)  # fmt: skip
    for epoch in range(epochs) if epochs is not None else iter(int, 1):
        loader.set_epoch(epoch)
        for item in loader:
            yield item["image"], item["label"]


def loader_rate(
    root: Path | str,
    device: torch.device,
    batch: int,
    workers: int,
    *,
    transform: Transform | None = None,
    warmup: int = 2,
    max_seconds: float = math.inf,
) -> Rate:
    """Images/s of the loader alone over one epoch (no model), the ceiling of end to end.

    Each batch is copied to ``device`` (non-blocking from pinned memory, as training does) so
    that the host-to-device copy counts too.

    Args:
        root: The shard set.
        device: Where the batches go.
        batch: Samples per batch.
        workers: Loader worker processes.
        transform: Per-sample transform run in the workers.
        warmup: Untimed batches first (worker start-up).
        max_seconds: Time budget of the timed part.

    Returns:
        The rate over the rest of the epoch (or the budget).
    """
    batches = shard_batches(root, device, batch, workers, transform=transform, epochs=1)
    for _ in range(warmup):
        if next(batches, None) is None:
            return Rate(0.0, 0, 0.0)
    done, t0, chunks, t_chunk, n_chunk = 0, time.perf_counter(), [], time.perf_counter(), 0
    for x, _ in batches:
        x.to(device, non_blocking=True)
        done, n_chunk = done + 1, n_chunk + 1
        if n_chunk == 5:
            _sync(device)
            now = time.perf_counter()
            chunks.append(n_chunk * batch / (now - t_chunk))
            t_chunk, n_chunk = now, 0
        if time.perf_counter() - t0 > max_seconds:
            break
    _sync(device)
    seconds = time.perf_counter() - t0
    return Rate(done * batch / seconds if done else 0.0, done, seconds, chunks)


def _args_backend(args: argparse.Namespace, device: torch.device, compile_model: bool) -> Backend:
    return build_backend(
        ModelConfig(name=args.model, channels_last=args.channels_last, compile=compile_model),
        OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05),
        TrainSection(precision=args.precision),
        BackendConfig(),
        device=device,
        batch=args.batch,
    )


def main(argv: list[str] | None = None) -> None:
    """Command line; see the module docstring.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    parser.add_argument("--shards", type=Path, default=None, help="shard set (default: temp one)")
    parser.add_argument("--samples", type=int, default=8192, help="size of the temp shard set")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    print(
        "command: python "
        + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    )
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(0) if use_cuda else "CPU"
    with tempfile.TemporaryDirectory() as tmp:
        root = args.shards or write_synthetic_shards(Path(tmp) / "shards", args.samples, args.size)
        rows = []
        for compiled in (False, True) if not args.no_compile else (False,):
            b = _args_backend(args, device, compiled)
            steps = {"batch": args.batch, "steps": args.steps, "warmup": args.warmup}
            synth = measure(b, synthetic_batches(device, args.batch, args.size), **steps)
            e2e = measure(b, shard_batches(root, device, args.batch, args.workers), **steps)
            rows.append((compiled, synth.per_s, e2e.per_s))
            del b
            if use_cuda:
                torch.cuda.empty_cache()
    print(f"\n{name}: {args.model} {args.size}px batch {args.batch} {args.precision} "
          f"channels_last={args.channels_last} workers={args.workers}")  # fmt: skip
    print("  compile   synthetic img/s   end-to-end img/s   e2e / synthetic")
    for compiled, synth, e2e in rows:
        print(f"  {compiled!s:7s}   {synth:15.1f}   {e2e:16.1f}   {100 * e2e / synth:13.1f} %")


if __name__ == "__main__":
    main()
