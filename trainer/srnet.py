"""Super-resolution networks: EDSR-style (no batch norm) and SRResNet-style, one channel in/out.

Both map a low-resolution image on the small grid ``[B, 1, H/s, W/s]`` to ``[B, 1, H, W]``
with pixel-shuffle upsampling, and add a bicubic upsampling of the input to the output, so the
network learns only the missing detail (a global residual; it trains much faster from random
weights, which is all we have here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from srmri.config import require

__all__ = ["PRESETS", "SRConfig", "count_parameters", "create_sr_model"]


@dataclass
class SRConfig:
    """The SR task: network architecture and training pairs (config section ``sr``).

    Attributes:
        arch: ``edsr`` (residual blocks without batch norm) or ``srresnet`` (with BN, PReLU).
        preset: ``tiny`` (tests), ``full`` (EDSR-baseline size) or ``custom`` (use the fields).
        blocks: Residual blocks (custom preset).
        features: Feature channels (custom preset).
        res_scale: Residual scaling inside blocks (EDSR uses 0.1 for wide nets).
        scale: Upsampling factor: 2, 3 or 4.
        global_residual: Add the bicubic upsampled input to the output.
        patch_size: Side of the HR training patches (a multiple of ``scale``).
        ssim_weight: Weight of a (1 - SSIM) term added to the L1 loss.
        examples: Held-out slices shown in the per-run figure.
    """

    arch: Literal["edsr", "srresnet"] = "edsr"
    preset: Literal["tiny", "full", "custom"] = "full"
    blocks: int = 16
    features: int = 64
    res_scale: float = 1.0
    scale: int = 2
    global_residual: bool = True
    patch_size: int = 96
    ssim_weight: float = 0.0
    examples: int = 4

    def check(self) -> None:
        require(
            self.patch_size >= 8 * self.scale and self.patch_size % self.scale == 0,
            "sr.patch_size",
            f"must be a multiple of sr.scale={self.scale} and at least {8 * self.scale}",
        )
        require(self.ssim_weight >= 0, "sr.ssim_weight", "must be >= 0")
        require(self.scale in (2, 3, 4), "sr.scale", f"must be 2, 3 or 4, got {self.scale}")
        require(self.blocks >= 1, "sr.blocks", "must be at least 1")
        require(self.features >= 4, "sr.features", "must be at least 4")
        require(0 < self.res_scale <= 1, "sr.res_scale", "must be in (0, 1]")


PRESETS: dict[str, tuple[int, int]] = {"tiny": (2, 16), "full": (16, 64)}


class _EDSRBlock(nn.Module):
    def __init__(self, features: int, res_scale: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(features, features, 3, padding=1),
        )
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale


class _SRResBlock(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1),
            nn.BatchNorm2d(features),
            nn.PReLU(features),
            nn.Conv2d(features, features, 3, padding=1),
            nn.BatchNorm2d(features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _upsampler(features: int, scale: int, act: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    steps = [2] * int(math.log2(scale)) if scale in (2, 4) else [scale]
    for factor in steps:
        layers += [nn.Conv2d(features, features * factor * factor, 3, padding=1)]
        layers += [nn.PixelShuffle(factor)]
        if act:
            layers += [nn.PReLU(features)]
    return nn.Sequential(*layers)


class SRNet(nn.Module):
    """Head conv, residual body with a long skip, pixel-shuffle tail, optional global residual."""

    def __init__(
        self,
        arch: Literal["edsr", "srresnet"],
        scale: int,
        blocks: int,
        features: int,
        res_scale: float,
        global_residual: bool,
    ) -> None:
        super().__init__()
        self.scale = scale
        self.global_residual = global_residual
        srresnet = arch == "srresnet"
        self.head = nn.Sequential(
            nn.Conv2d(1, features, 9 if srresnet else 3, padding=4 if srresnet else 1),
            *([nn.PReLU(features)] if srresnet else []),
        )
        body: list[nn.Module] = [
            _SRResBlock(features) if srresnet else _EDSRBlock(features, res_scale)
            for _ in range(blocks)
        ]
        body.append(nn.Conv2d(features, features, 3, padding=1))
        if srresnet:
            body.append(nn.BatchNorm2d(features))
        self.body = nn.Sequential(*body)
        self.upsample = _upsampler(features, scale, act=srresnet)
        self.tail = nn.Conv2d(features, 1, 9 if srresnet else 3, padding=4 if srresnet else 1)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        x = self.head(lr)
        x = self.tail(self.upsample(x + self.body(x)))
        if self.global_residual:
            x = x + F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return x


def create_sr_model(cfg: SRConfig) -> nn.Module:
    """Build an SR network with random initial weights.

    Args:
        cfg: The ``sr`` section: ``arch`` (edsr or srresnet), ``scale`` (2, 3 or 4), ``preset``
            (``tiny`` and ``full`` fix blocks and features, ``custom`` uses ``blocks`` and
            ``features``), ``res_scale`` (inside EDSR blocks) and ``global_residual`` (add the
            bicubic upsampled input to the output).

    Returns:
        The network: ``[B, 1, h, w] -> [B, 1, h * scale, w * scale]``.
    """
    blocks, features = PRESETS.get(cfg.preset, (cfg.blocks, cfg.features))
    return SRNet(cfg.arch, cfg.scale, blocks, features, cfg.res_scale, cfg.global_residual)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
