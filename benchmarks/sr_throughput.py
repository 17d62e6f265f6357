"""SR throughput on CPU: training patches/s and enhance slices/s, tiny and full presets.

Side by side in one run, per preset:
  train        patches/s of L1 training steps (forward, backward, Adam) on 64 px HR patches
  model only   slices/s of the SR model alone on in-memory LR slices (the upper bound)
  enhance      slices/s of `shards enhance` end to end: read shards, degrade, SR, write shards
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from shards.degrade import DegradeConfig, degrade
from shards.enhance import EnhanceSpec, enhance
from shards.ingest import ingest
from shards.ingest_config import IngestConfig
from srmri.config import load_config
from trainer.srnet import SRConfig, count_parameters, create_sr_model


def train_rate(net: torch.nn.Module, scale: int, patch: int, batch: int, steps: int) -> float:
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    hr = torch.rand(batch, 1, patch, patch)
    lr = torch.rand(batch, 1, patch // scale, patch // scale)
    for i in range(steps + 1):
        if i == 1:  # the first step pays one-off allocation costs
            t = time.perf_counter()
        opt.zero_grad()
        (net(lr) - hr).abs().mean().backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t)


@torch.no_grad()
def model_rate(net: torch.nn.Module, lr: torch.Tensor, batch: int) -> float:
    net(lr[:batch])
    t = time.perf_counter()
    for i in range(0, lr.shape[0], batch):
        net(lr[i : i + batch])
    return lr.shape[0] / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=64, help="slices in the enhance benchmark")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
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
            train = train_rate(net, args.scale, 64, args.batch, args.steps)
            net.eval()
            only = model_rate(net, lr, args.batch)
            spec = EnhanceSpec(cfg, 0, preset, args.batch)
            t = time.perf_counter()
            enhance(data, work / f"sr-{preset}", net, spec, device=torch.device("cpu"))
            end_to_end = args.n / (time.perf_counter() - t)
            rows.append((preset, count_parameters(net), train, only, end_to_end))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nEDSR x{args.scale} on CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"
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
