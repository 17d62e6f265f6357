"""SR throughput: training patches/s and enhance slices/s, tiny and full presets.

Side by side in one run, per preset:
  train        patches/s of L1 training steps (forward, backward, Adam) on 64 px HR patches
  model only   slices/s of the SR model alone on in-memory LR slices (the upper bound)
  enhance      slices/s of `shards enhance` end to end: read shards, degrade, SR, write shards

Runs on the CPU by default (``--device auto`` takes CUDA when there is one). The pieces
(:func:`train_rate`, :func:`model_rate`, :func:`enhance_rate`) are public:
``benchmarks/device_check.py`` times the paper's SR stage with them in bf16 on a GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from shards.degrade import DegradeConfig, degrade
from shards.enhance import EnhanceSpec, enhance
from shards.ingest import ingest
from shards.ingest_config import IngestConfig
from srmri.config import load_config
from trainer.backend import create_backend
from trainer.config import BackendConfig, OptimConfig, TrainSection
from trainer.factories import create_optimizer
from trainer.precision import Precision, autocast
from trainer.srnet import SRConfig, count_parameters, create_sr_model

__all__ = ["enhance_rate", "main", "model_rate", "train_rate"]

CPU = torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(
    net: torch.nn.Module,
    scale: int,
    patch: int,
    batch: int,
    steps: int,
    *,
    device: torch.device = CPU,
    precision: Precision = "fp32",
    optim: OptimConfig | None = None,
    warmup: int = 1,
    max_seconds: float = math.inf,
) -> float:
    """Patches/s of L1 training steps through the trainer's backend (``SRTask.train_loss``).

    The model, its optimizer and the precision handling are the trainer's
    (:func:`trainer.backend.create_backend`); the patches are random tensors on ``device``.

    Args:
        net: The SR network (moved to ``device``; it is trained).
        scale: Its upsampling factor.
        patch: HR patch side (a multiple of ``scale``).
        batch: Patches per step.
        steps: Timed steps at most.
        device: Where to train.
        precision: fp32, bf16 or fp16 (autocast, and a grad scaler for fp16).
        optim: The ``optim`` section (default: Adam, lr 1e-4, no weight decay).
        warmup: Untimed steps first (one-off allocation, cuDNN autotuning).
        max_seconds: Time budget of the timed steps (checked after each step).

    Returns:
        Patches per second over the timed steps.
    """
    optim = optim or OptimConfig(name="adam", lr=1e-4, weight_decay=0.0)
    b = create_backend(
        BackendConfig(),
        TrainSection(precision=precision),
        model=net,
        optimizer=create_optimizer(net, optim),
        device=device,
        micro_batch=batch,
    )
    b.train()
    hr = torch.rand(batch, 1, patch, patch, device=device)
    lr = torch.rand(batch, 1, patch // scale, patch // scale, device=device)

    def step() -> None:
        with b.micro_step():
            b.backward(F.l1_loss(b.model(b.to_input(lr)).float(), hr))
        b.step()

    for _ in range(warmup):
        step()
    _sync(device)
    done, t = 0, time.perf_counter()
    while done < steps and time.perf_counter() - t < max_seconds:
        step()
        done += 1
    _sync(device)
    return batch * done / (time.perf_counter() - t)


@torch.no_grad()
def model_rate(
    net: torch.nn.Module,
    lr: torch.Tensor,
    batch: int,
    *,
    device: torch.device = CPU,
    precision: Precision = "fp32",
    min_seconds: float = 0.0,
) -> float:
    """Slices/s of the SR model alone on in-memory LR slices (the ceiling of ``enhance``).

    Args:
        net: The SR network, in eval mode, on ``device``.
        lr: LR slices ``[N, 1, h, w]`` (moved to ``device`` first, outside the timing).
        batch: Slices per forward.
        device: Where the model runs.
        precision: Autocast precision (``enhance`` uses bf16 on CUDA).
        min_seconds: Repeat whole passes over ``lr`` until at least this long has been timed
            (a GPU goes through a few hundred slices in milliseconds).

    Returns:
        Slices per second.
    """
    lr = lr.to(device)
    done = 0
    with autocast(device, precision):
        net(lr[:batch])  # warm-up: allocation and cuDNN autotuning stay out of the timing
        _sync(device)
        t = time.perf_counter()
        while done == 0 or time.perf_counter() - t < min_seconds:
            for i in range(0, lr.shape[0], batch):
                net(lr[i : i + batch])
            done += lr.shape[0]
            _sync(device)
    return done / (time.perf_counter() - t)


def enhance_rate(
    data: Path, out: Path, net: torch.nn.Module, spec: EnhanceSpec, device: torch.device
) -> float:
    """Slices/s of ``shards.enhance.enhance`` over the whole shard set ``data``.

    Args:
        data: The source shard set.
        out: Output folder of the SR set.
        net: The SR network, in eval mode, on ``device``.
        spec: Degradation, seed, model id and batch size.
        device: Where the model runs (``enhance`` autocasts to bf16 on CUDA).

    Returns:
        Slices per second, end to end (read, degrade, SR, write).
    """
    from shards.format import read_index

    n = sum(s.count for s in read_index(data).shards)
    t = time.perf_counter()
    enhance(data, out, net, spec, device=device)
    _sync(device)
    return n / (time.perf_counter() - t)


def main() -> None:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=64, help="slices in the enhance benchmark")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda", 0) if use_cuda else CPU
    work = Path(tempfile.mkdtemp(prefix="srmri-bench-sr-"))
    os.environ.setdefault("SRMRI_SECRET_FILE", str(work / "secret.key"))
    rows = []
    try:
        data = work / "data"
        overrides = ["source=synth", f"out={data}", f"synth.n={args.n}",
                     f"preprocess.size={args.size}", "workers=1"]  # fmt: skip
        ingest(load_config(IngestConfig, None, overrides), log=lambda _: None)
        cfg = DegradeConfig(scale=args.scale)
        lr = torch.stack([degrade(torch.rand(1, args.size, args.size), cfg, None)[0]] * args.n)
        for preset in ("tiny", "full"):
            net = create_sr_model(SRConfig(arch="edsr", scale=args.scale, preset=preset))
            kw = {"device": device, "precision": args.precision}
            train = train_rate(net, args.scale, 64, args.batch, args.steps, **kw)
            net.eval()
            only = model_rate(net, lr, args.batch, **kw)
            spec = EnhanceSpec(cfg, 0, preset, args.batch)
            end_to_end = enhance_rate(data, work / f"sr-{preset}", net, spec, device)
            rows.append((preset, count_parameters(net), train, only, end_to_end))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    where = torch.cuda.get_device_name(device) if use_cuda else "CPU"
    print(
        f"\nEDSR x{args.scale} {args.precision} on {where} ({torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores)"
    )
    print(f"{'preset':8s}{'params':>10s}{'train patches/s':>18s}{'model slices/s':>16s}"
          f"{'enhance slices/s':>18s}{'enhance/model':>15s}")  # fmt: skip
    for preset, params, train, only, e2e in rows:
        print(
            f"{preset:8s}{params:>10,d}{train:>18.1f}{only:>16.1f}{e2e:>18.1f}{e2e / only:>15.2f}"
        )
    print(f"\ncommand: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
