"""The device check's ``sr`` part: the paper's SR stage, training and ``enhance``.

``configs/sr-synth.yaml`` plus the paper's overrides (EDSR full preset, x2, 96 px patches,
bf16): training patches/s through the trainer's backend, then the model alone and
``shards.enhance.enhance`` end to end in slices/s.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from sr_throughput import enhance_rate, model_rate, train_rate

from device_parts.context import Context, stage_config
from device_parts.report import Figure

__all__ = ["part_sr"]


def part_sr(ctx: Context) -> None:
    """The paper's SR stage in its precision: training patches/s, model and enhance slices/s.

    Args:
        ctx: The run context (needs ``ctx.data`` and ``ctx.enhance_data``).
    """
    from trainer.srnet import count_parameters, create_sr_model

    budget_end = time.monotonic() + ctx.clock.share("sr")
    cfg = stage_config(ctx, "sr", ["task=sr"])
    torch.manual_seed(cfg.train.seed)
    net = create_sr_model(cfg.sr)
    _train_rows(ctx, cfg, net, count_parameters(net), budget_end)
    net.eval()
    _enhance_rows(ctx, cfg, net)


def _train_rows(
    ctx: Context, cfg: Any, net: torch.nn.Module, params: int, budget_end: float
) -> None:
    """Training patches/s at the paper's batch (and at 8x it on CUDA), one row each."""
    s, sr, prec = ctx.sizes, cfg.sr, cfg.train.precision
    patch = min(sr.patch_size, s.size - s.size % sr.scale)
    what = f"EDSR {sr.preset} x{sr.scale} {prec}"

    def seconds() -> float:  # each timed measurement's share of the part's budget
        return max(1.0, min(s.seconds, (budget_end - time.monotonic()) / 5))

    paper_batch = cfg.data.batch_size
    batches = [s.sr_batch or paper_batch] + ([paper_batch * 8] if ctx.cuda else [])
    for batch in batches:
        rate = train_rate(
            net,
            sr.scale,
            patch,
            batch,
            s.sr_steps,
            device=ctx.device,
            precision=prec,
            optim=cfg.optim,
            warmup=s.warmup,
            max_seconds=seconds(),
        )
        label = {paper_batch: "the paper's batch", 8 * paper_batch: "8x the paper's batch"}
        note = f"{what}, {params:,} parameters, {label.get(batch, 'tiny')}, trainer.backend"
        ctx.report.add(
            Figure(
                "sr", f"train, {patch} px HR patches, batch {batch}", rate, "patches/s", note=note
            )
        )


def _enhance_rows(ctx: Context, cfg: Any, net: torch.nn.Module) -> None:
    """The model alone on stored LR slices, then ``enhance`` end to end, in slices/s."""
    from shards.degrade import degrade
    from shards.enhance import EnhanceSpec

    degradation = cfg.sr_degradation()
    slices = _some_slices(ctx, ctx.sizes.sr_slices)
    lr = torch.stack([degrade(x, degradation, None)[0] for x in slices])
    batch = ctx.pipe.enhance_batch
    enhance_precision = "bf16" if ctx.cuda else "fp32"  # what enhance autocasts to
    # A GPU runs the slices in milliseconds: repeat passes for at least 2 s there.
    only = model_rate(
        net, lr, batch, device=ctx.device, precision=enhance_precision, min_seconds=2.0 * ctx.cuda
    )
    note = f"batch {batch}, {len(lr)} slices in device memory, "
    note += f"{'bf16' if ctx.cuda else 'fp32'} as enhance runs"
    ctx.report.add(
        Figure(
            "sr",
            f"model alone, {lr.shape[-2]}x{lr.shape[-1]} LR slices",
            only,
            "slices/s",
            note=note,
        )
    )
    spec = EnhanceSpec(degradation, cfg.train.seed, "device-check", batch)
    e2e = enhance_rate(ctx.enhance_data, ctx.work / "shards-sr", net, spec, ctx.device)
    note = f"{e2e / only:.0%} of the model alone; enhance degrades each slice on the CPU"
    ctx.report.add(
        Figure("sr", "enhance end to end: read, degrade, SR, write", e2e, "slices/s", note=note)
    )


def _some_slices(ctx: Context, n: int) -> list[torch.Tensor]:
    """Up to ``n`` stored slices of the enhance set as float32 ``[1, H, W]`` (model alone)."""
    from shards.format import decode_image, from_uint16, read_index
    from shards.loader import iter_shard

    root = ctx.enhance_data
    out: list[torch.Tensor] = []
    for info in read_index(root).shards:
        for _, parts in iter_shard(str(root / info.name), 0, frozenset({"npy"})):
            out.append(torch.from_numpy(from_uint16(decode_image(parts["npy"])))[None])
            if len(out) == n:
                return out
    return out
