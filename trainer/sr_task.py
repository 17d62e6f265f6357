"""The super-resolution task: the same loop and backends as the classifier, another Task.

Training pairs come from the shards: the HR slice is degraded on the fly by the data plane's
transform (k-space truncation by default) in loader workers, and aligned LR/HR patches are cut
from it. Validation super-resolves whole held-out slices and scores SR, bicubic and zero-filled
reconstructions of the same LR images with the same masked PSNR/SSIM code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure

from shards.degrade import (
    EVAL_EPOCH,
    DegradeConfig,
    bicubic_up,
    degrade,
    kspace_zero_fill,
    sample_generator,
)
from shards.sample import Sample
from srmri.distributed import all_gather_objects
from trainer.backend import Backend
from trainer.batch import Prepare, TaskBatch, TaskSample
from trainer.config import TrainConfig
from trainer.metrics import SRMetrics, brain_mask
from trainer.srnet import create_sr_model

__all__ = ["SRPairTransform", "SRTask", "baselines", "flatten_sr_results", "load_sr_checkpoint"]

METHODS = ("sr", "bicubic", "zero_fill")


class SRPairTransform:
    """Picklable per-sample transform: HR slice -> (LR input, HR target), patches when training.

    Args:
        degrade_cfg: The degradation at the SR factor (:meth:`TrainConfig.sr_degradation`).
        scale: The SR factor.
        patch_size: HR patch side for training.
        seed: Run seed; training draws from (seed, epoch, key), evaluation from
            (seed, EVAL_EPOCH, key) exactly as the classifier's ``lr`` input and ``enhance``.
        train: Training (random patches) or evaluation (whole slices).
    """

    def __init__(
        self, degrade_cfg: DegradeConfig, scale: int, patch_size: int, seed: int, train: bool
    ) -> None:
        self.degrade_cfg = degrade_cfg
        self.scale = scale
        self.patch = patch_size // scale
        self.seed = seed
        self.train = train

    def __call__(self, loaded: Sample) -> TaskSample:
        """Replace ``image`` by the LR input and add the HR ``target`` (in place).

        Args:
            loaded: The loader's sample.

        Returns:
            The same record as a :class:`trainer.batch.TaskSample`.
        """
        sample = cast(TaskSample, loaded)
        hr = sample["image"]
        epoch = sample["epoch"] if self.train else EVAL_EPOCH
        gen = sample_generator(self.seed, epoch, sample["digest"])  # content, not the key
        lr, s = degrade(hr, self.degrade_cfg, gen)
        h, w = lr.shape[-2:]
        if self.train:
            p = min(self.patch, h, w)
            # Prefer a patch with some head in it; empty background teaches nothing.
            for _ in range(4):
                y = int(torch.randint(0, h - p + 1, (1,), generator=gen))
                x = int(torch.randint(0, w - p + 1, (1,), generator=gen))
                if float(hr[..., y * s : (y + p) * s, x * s : (x + p) * s].mean()) > 0.05:
                    break
            lr = lr[..., y : y + p, x : x + p]
            hr = hr[..., y * s : (y + p) * s, x * s : (x + p) * s]
        else:
            hr = hr[..., : h * s, : w * s]
        sample["image"] = lr.contiguous()
        sample["target"] = hr.contiguous()
        return sample


def baselines(lr: torch.Tensor, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Bicubic and zero-filled (k-space zero padding) upsampling of LR images, clamped."""
    return {
        "bicubic": bicubic_up(lr, size).clamp(0, 1),
        "zero_fill": kspace_zero_fill(lr, size).clamp(0, 1),
    }


def flatten_sr_results(nested: dict[str, dict[str, float]], scale: int) -> dict[str, Any]:
    """``{"sr": {"psnr": ..}, ..}`` -> ``{"sr_psnr": .., "bicubic_psnr": .., ...}`` + gains."""
    out: dict[str, Any] = {"scale": scale}
    for method, values in nested.items():
        for name, value in values.items():
            out[f"{method}_{name}"] = value
    best_base = max(
        out.get("bicubic_psnr", float("-inf")), out.get("zero_fill_psnr", float("-inf"))
    )
    best_ssim = max(
        out.get("bicubic_ssim", float("-inf")), out.get("zero_fill_ssim", float("-inf"))
    )
    out["psnr_gain_db"] = out.get("sr_psnr", float("nan")) - best_base
    out["ssim_gain"] = out.get("sr_ssim", float("nan")) - best_ssim
    return out


class SRTask:
    """L1 (optionally + SSIM) super-resolution of one-channel slices.

    Args:
        cfg: The run config (``sr`` section: network and patches; ``data.degrade``).
        classes: Unused (SR needs no labels); kept for the Task protocol.
    """

    best_metric = "sr_psnr"
    best_mode: Literal["max", "min"] = "max"

    def __init__(self, cfg: TrainConfig, classes: list[str]) -> None:
        self.cfg = cfg
        self.classes = classes
        self.metrics = SRMetrics(METHODS)
        self.examples: list[dict[str, np.ndarray]] = []
        self._loss = torch.zeros(2, dtype=torch.float64)

    def build_model(self, pretrained: bool = True) -> nn.Module:
        return create_sr_model(self.cfg.sr)  # always random: SR training starts from scratch

    def transform(self, train: bool) -> SRPairTransform:
        s = self.cfg.sr
        return SRPairTransform(
            self.cfg.sr_degradation(), s.scale, s.patch_size, self.cfg.train.seed, train
        )

    def aligned_roots(self) -> list[str]:
        return []

    def _loss_of(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.l1_loss(pred, target)
        if self.cfg.sr.ssim_weight > 0:
            ssim = structural_similarity_index_measure(pred.clamp(0, 1), target, data_range=1.0)
            loss = loss + self.cfg.sr.ssim_weight * (1.0 - ssim)
        return loss

    def train_loss(self, backend: Backend, batch: TaskBatch) -> tuple[torch.Tensor, int]:
        pred = backend.model(backend.to_input(batch["image"])).float()
        target = batch["target"].to(backend.device, non_blocking=True)
        return self._loss_of(pred, target), int(target.shape[0])

    def eval_reset(self, device: torch.device) -> None:
        self.metrics.to(device)
        self.metrics.reset()
        self.examples = []
        self._loss = torch.zeros(2, dtype=torch.float64, device=device)

    def eval_update(self, model: nn.Module, batch: TaskBatch, prepare: Prepare) -> None:
        lr = prepare(batch["image"])
        hr = batch["target"].to(lr.device).float()
        valid = batch["valid"].to(lr.device).bool()
        outputs = {"sr": model(lr).float().clamp(0, 1), **baselines(lr.float(), hr.shape[-2:])}
        self.metrics.update(outputs=outputs, target=hr, mask=brain_mask(hr), valid=valid)
        err = (outputs["sr"] - hr).abs().flatten(1).mean(1)[valid]
        self._loss[0] += err.sum().double()
        self._loss[1] += err.numel()
        for i in range(len(batch["key"])):
            if len(self.examples) >= self.cfg.sr.examples or not bool(valid[i]):
                continue
            row = {"key": batch["key"][i], "lr": lr[i, 0].float().cpu().numpy()}
            row.update({k: v[i, 0].cpu().numpy() for k, v in outputs.items()})
            row["hr"] = hr[i, 0].cpu().numpy()
            self.examples.append(row)

    def eval_compute(self) -> dict[str, Any]:
        results = flatten_sr_results(self.metrics.compute(), self.cfg.sr.scale)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(self._loss)
        total, count = self._loss.tolist()
        results["loss"] = total / count if count else float("nan")
        gathered = [row for rows in all_gather_objects(self.examples) for row in rows]
        self.examples = gathered[: self.cfg.sr.examples]
        return results

    def write_reports(self, run_dir: Path, split: str, results: dict[str, Any]) -> None:
        from trainer.plots import plot_sr_examples

        if not self.examples:
            return
        rows = []
        for ex in self.examples:
            # The whole slice when it is small; else a central crop (where the anatomy is) of
            # half the side and never under 64 px, so that the difference can be seen.
            h, w = ex["hr"].shape
            c = min(h, w) if min(h, w) <= 128 else max(64, min(h, w) // 2)
            y0, x0 = (h - c) // 2, (w - c) // 2
            s = self.cfg.sr.scale
            row = {k: v[y0 : y0 + c, x0 : x0 + c] for k, v in ex.items() if k in ("hr", *METHODS)}
            row["lr"] = ex["lr"][y0 // s : (y0 + c) // s, x0 // s : (x0 + c) // s]
            rows.append(row)
        plot_sr_examples(rows, run_dir / f"sr_examples_{split}.png")


def load_sr_checkpoint(
    checkpoint: str | Path, device: torch.device
) -> tuple[nn.Module, TrainConfig, str]:
    """Load a trained SR model (any backend's checkpoint) in eval mode on ``device``.

    Args:
        checkpoint: Checkpoint directory, ``checkpoints/`` folder or run directory.
        device: Where to put the model.

    Returns:
        The model, the run's config, and an id naming the checkpoint (path and step).

    Raises:
        ValueError: If the checkpoint is not from an SR run.
    """
    from trainer.checkpoint import resolve_checkpoint
    from trainer.weights import checkpoint_config, load_fp32_weights

    ckpt = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt)
    if cfg.task != "sr":
        raise ValueError(f"{ckpt.path}: a {cfg.task!r} checkpoint, not an SR one (task: sr)")
    model = SRTask(cfg, ckpt.classes).build_model()
    model.load_state_dict(load_fp32_weights(ckpt))
    return model.to(device).eval(), cfg, f"{ckpt.path} (step {ckpt.step})"
