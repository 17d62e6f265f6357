"""Trainer throughput (images/s): synthetic on-device data vs end to end from shards.

Synthetic: one fixed batch already on the device (the upper bound: model + optimizer only).
End to end: the real ``shards.loader`` reading a shard set (one is written to a temp folder when
``--shards`` is not given) with pinned memory and worker processes, feeding the same trainer step.
Both with and without ``torch.compile``. Defaults are the issue's setting (ResNet50, 224 px,
bf16, channels_last, one GPU); tiny flags run it on a CPU:

    python benchmarks/gpu_throughput.py                       # GPU, ResNet50 224 bf16
    python benchmarks/gpu_throughput.py --device cpu --model resnet10t --size 32 --batch 8 \\
        --steps 4 --warmup 1 --workers 0 --precision fp32 --no-compile
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from shards.format import DatasetIndex, ShardInfo, encode_sample, shard_name, to_uint16, write_index
from shards.loader import create_loader
from trainer.backend import Backend, create_backend
from trainer.config import BackendConfig, ModelConfig, OptimConfig, TrainSection
from trainer.factories import create_model, create_optimizer

__all__ = ["main", "write_synthetic_shards"]

CLASSES = 4


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


def _backend(args: argparse.Namespace, device: torch.device, compile_model: bool) -> Backend:
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=args.model), CLASSES)
    opt = create_optimizer(model, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05))
    return create_backend(
        BackendConfig(),
        TrainSection(precision=args.precision),
        model=model,
        optimizer=opt,
        device=device,
        micro_batch=args.batch,
        model_cfg=ModelConfig(channels_last=args.channels_last, compile=compile_model),
    )


def _step(b: Backend, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with b.micro_step():
        loss = F.cross_entropy(b.model(b.to_input(x)).float(), y.to(b.device, non_blocking=True))
        b.backward(loss)
    b.step()
    return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(
    b: Backend, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], args: argparse.Namespace
) -> float:
    """Images/s over ``args.steps`` steps after ``args.warmup`` untimed ones."""
    b.train()
    for _ in range(args.warmup):
        _step(b, *next(batches))
    _sync(b.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        _step(b, *next(batches))
    _sync(b.device)
    return args.steps * args.batch / (time.perf_counter() - t0)


def _synthetic(
    device: torch.device, args: argparse.Namespace
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.rand(args.batch, 1, args.size, args.size, device=device)
    y = torch.randint(0, CLASSES, (args.batch,), device=device)
    while True:
        yield x, y


def _from_shards(
    root: Path, device: torch.device, args: argparse.Namespace
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    loader = create_loader(root, "train", args.batch, mode="train", num_workers=args.workers,
                           pin_memory=device.type == "cuda", rank=0, world_size=1)  # fmt: skip
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch["image"], batch["label"]
        epoch += 1


def main(argv: list[str] | None = None) -> None:
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
            b = _backend(args, device, compiled)
            synth = _measure(b, _synthetic(device, args), args)
            e2e = _measure(b, _from_shards(root, device, args), args)
            rows.append((compiled, synth, e2e))
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
