"""Ingest throughput: our `shards ingest` against a hand-rolled decode-resize-save loop.

Writes N Kaggle-size (512x512) JPEGs in the Kaggle layout, then times, in the same run:
  baseline  a plain loop: PIL open -> grayscale -> resize -> save 16-bit PNG (no QC, no dedup)
  ingest    `shards.ingest` with 1 and 2 workers (QC, crop, normalise, hashes, splits, shards)
Target (issue 2): at least 100 Kaggle-size JPEGs per second on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from shards.ingest import ingest
from shards.ingest_config import IngestConfig
from srmri.config import load_config

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def write_jpegs(root: Path, n: int, side: int, seed: int) -> list[Path]:
    """Kaggle layout with ``n`` brain-like JPEGs (ellipse head, blob, noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    paths = []
    for i in range(n):
        split = "Testing" if i % 5 == 0 else "Training"
        cls = CLASSES[i % 4]
        head = ((xx - 0.5) / 0.38) ** 2 + ((yy - 0.5) / 0.45) ** 2 < 1
        img = head * (90 + 60 * rng.random((side, side)))
        cy, cx = rng.uniform(0.3, 0.7, 2)
        img += 80 * (((xx - cx) ** 2 + (yy - cy) ** 2) < rng.uniform(0.002, 0.01))
        path = root / split / cls / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def baseline(paths: list[Path], out: Path, size: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(paths):
        img = Image.open(p).convert("L").resize((size, size), Image.Resampling.BICUBIC)
        arr = (np.asarray(img, dtype=np.uint16) * 257).astype(np.uint16)
        Image.fromarray(arr).save(out / f"{i:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--side", type=int, default=512, help="JPEG side (Kaggle: ~512)")
    parser.add_argument("--size", type=int, default=256, help="stored sample side")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="srmri-bench-ingest-"))
    os.environ.setdefault("SRMRI_SECRET_FILE", str(work / "secret.key"))
    try:
        paths = write_jpegs(work / "kaggle", args.n, args.side, seed=0)
        t = time.perf_counter()
        baseline(paths, work / "baseline", args.size)
        rates = {"baseline loop (1 process)": args.n / (time.perf_counter() - t)}
        for workers in (1, 2):
            cfg = load_config(
                IngestConfig,
                None,
                [
                    "source=kaggle",
                    f"input={work / 'kaggle'}",
                    f"out={work / f'out{workers}'}",
                    f"preprocess.size={args.size}",
                    f"workers={workers}",
                ],
            )
            t = time.perf_counter()
            ingest(cfg, log=lambda _: None)
            rates[f"shards ingest, {workers} worker(s)"] = args.n / (time.perf_counter() - t)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nIngest of {args.n} {args.side}x{args.side} JPEGs -> {args.size}x{args.size} samples, "
        f"{os.cpu_count()} cores"
    )
    base = rates["baseline loop (1 process)"]
    for name, rate in rates.items():
        print(f"  {name:32s} {rate:8.1f} images/s  ({rate / base:4.2f}x baseline)")
    print(f"\ncommand: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
