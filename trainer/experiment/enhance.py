"""The enhance stage's wiring: a trained SR checkpoint applied to a shard set.

:func:`shards.enhance.enhance` knows shards and takes any SR callable; the SR network and its
checkpoints belong to the trainer. This module joins the two, so that the data plane never
imports the trainer. ``python -m trainer.experiment enhance`` (and its older spelling,
``python -m shards enhance``) runs it; under torchrun every rank takes its share of the shards.

The SR model is named by what it computes, not where it lies: a hash of its loaded fp32 weights
plus the training step (:func:`weights_id`). The SR set records that id, so enhancing into the
same OUT with other weights rebuilds the set, and a copied or moved checkpoint does not.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from shards.enhance import EnhanceSpec, enhance
from shards.format import DatasetIndex
from srmri.config import ConfigError
from srmri.distributed import init_distributed
from srmri.exitcodes import CONFIG_ERROR
from trainer.sr_bundle import weights_id
from trainer.sr_task import load_sr_checkpoint

__all__ = ["enhance_with_checkpoint", "main"]


def enhance_with_checkpoint(
    checkpoint: str | Path, src: str | Path, out: str | Path, batch_size: int, device: str = "auto"
) -> tuple[DatasetIndex | None, str]:
    """Super-resolve shard set ``src`` into ``out`` with the SR model of ``checkpoint``.

    Args:
        checkpoint: SR run directory, its ``checkpoints/`` folder or one checkpoint.
        src: The shard set to enhance (path or URL).
        out: Output folder of the SR shard set.
        batch_size: Slices per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.

    Returns:
        The written index (None on ranks other than 0) and the id of the SR model used
        (:func:`weights_id`).
    """
    from trainer.checkpoint import resolve_checkpoint

    info = init_distributed(device)
    ckpt = resolve_checkpoint(checkpoint)  # once: the step and the weights are of one checkpoint
    model, cfg, _ = load_sr_checkpoint(ckpt.path, info.device)
    model_id = weights_id(model, ckpt.step)
    spec = EnhanceSpec(cfg.sr_degradation(), cfg.train.seed, model_id, batch_size)
    index = enhance(
        src, out, model, spec, device=info.device, rank=info.rank, world_size=info.world_size
    )
    return index, model_id


def main(argv: Sequence[str] | None = None) -> int:
    """``enhance --checkpoint RUN --out DIR INPUT``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="srmri enhance", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="SR run dir or checkpoint")
    parser.add_argument("--out", required=True, help="output folder of the SR shard set")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("input", help="the shard set to enhance (path or URL)")
    args = parser.parse_args(argv)
    try:
        index, model_id = enhance_with_checkpoint(
            args.checkpoint, args.input, args.out, args.batch_size, args.device
        )
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    if index is not None:
        print(f"SR shard set: {args.out} ({len(index.shards)} shards, from {model_id})")
    return 0
