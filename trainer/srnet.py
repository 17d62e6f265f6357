"""Super-resolution networks, one channel in/out: EDSR and SRResNet here, RCAN from spandrel.

Each maps a low-resolution image on the small grid ``[B, 1, H/s, W/s]`` to ``[B, 1, H, W]``
with pixel-shuffle upsampling, and adds a bicubic upsampling of the input to the output, so the
network learns only the missing detail (a global residual; it trains much faster from random
weights, which is all we have here).

``edsr`` (the default) and ``srresnet`` are defined below. ``rcan`` (residual groups of
residual channel-attention blocks, Zhang et al. 2018) is spandrel's definition of the published
network (:class:`spandrel.architectures.RCAN.RCAN`), built with one colour channel and no
DIV2K mean shift, randomly initialised, inside :class:`LibrarySRNet`, which adds the same
global residual. spandrel is imported only when such a network is built (it registers every
architecture it knows on import, which costs seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from srmri.config import require

__all__ = [
    "PRESETS",
    "RCAN_PRESETS",
    "LibrarySRNet",
    "SRConfig",
    "count_parameters",
    "create_sr_model",
    "rcan_sizes",
]


@dataclass
class SRConfig:
    """The SR task: network architecture and training pairs (config section ``sr``).

    Attributes:
        arch: ``edsr`` (residual blocks without batch norm), ``srresnet`` (with BN, PReLU) or
            ``rcan`` (spandrel's RCAN: residual groups of channel-attention blocks).
        preset: ``tiny`` (tests), ``full`` (EDSR-baseline size; for ``rcan`` the RCAN paper's
            10 groups x 20 blocks x 64 features) or ``custom`` (use the size fields below).
        blocks: Residual blocks (custom preset); for ``rcan`` the blocks in each group.
        features: Feature channels (custom preset).
        groups: ``rcan`` only: residual groups, each ``blocks`` blocks and a conv under a skip
            (custom preset).
        reduction: ``rcan`` only: channel attention squeezes ``features`` channels to
            ``features // reduction`` (16 in the paper; at most ``features``; every preset).
        res_scale: Residual scaling inside EDSR blocks (EDSR uses 0.1 for wide nets); ``rcan``
            takes none (spandrel's blocks ignore it), so it must stay 1 there.
        scale: Upsampling factor: 2, 3 or 4.
        global_residual: Add the bicubic upsampled input to the output.
        patch_size: Side of the HR training patches (a multiple of ``scale``).
        ssim_weight: Weight of a (1 - SSIM) term added to the L1 loss.
        examples: Held-out slices shown in the per-run figure.
    """

    arch: Literal["edsr", "srresnet", "rcan"] = "edsr"
    preset: Literal["tiny", "full", "custom"] = "full"
    blocks: int = 16
    features: int = 64
    groups: int = 10
    reduction: int = 16
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
        require(self.groups >= 1, "sr.groups", "must be at least 1")
        require(self.reduction >= 1, "sr.reduction", "must be at least 1")
        require(0 < self.res_scale <= 1, "sr.res_scale", "must be in (0, 1]")
        if self.arch == "rcan":
            _, _, features = rcan_sizes(self)
            # features // reduction channels carry the attention: 0 would build a conv with no
            # output channels, which torch only rejects at the first forward pass.
            require(
                self.reduction <= features,
                "sr.reduction",
                f"must be at most the {features} RCAN features, got {self.reduction}",
            )
            # spandrel's RCAB has the scaling commented out: a value here would change nothing.
            require(
                self.res_scale == 1.0,
                "sr.res_scale",
                f"RCAN's blocks take no residual scaling; leave it at 1, got {self.res_scale:g}",
            )


PRESETS: dict[str, tuple[int, int]] = {"tiny": (2, 16), "full": (16, 64)}
"""``preset -> (blocks, features)`` of ``edsr`` and ``srresnet``."""

RCAN_PRESETS: dict[str, tuple[int, int, int]] = {"tiny": (1, 2, 16), "full": (10, 20, 64)}
"""``preset -> (groups, blocks per group, features)`` of ``rcan``; ``full`` is the paper's."""


def rcan_sizes(cfg: SRConfig) -> tuple[int, int, int]:
    """The ``(groups, blocks per group, features)`` an ``rcan`` config builds.

    Args:
        cfg: The ``sr`` section; ``tiny`` and ``full`` fix the sizes, ``custom`` takes
            ``groups``, ``blocks`` and ``features``.

    Returns:
        The three sizes.
    """
    return RCAN_PRESETS.get(cfg.preset, (cfg.groups, cfg.blocks, cfg.features))


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


class LibrarySRNet(nn.Module):
    """A library's SR network with this module's global residual, never writing to its input.

    Args:
        net: ``[B, 1, h, w] -> [B, 1, h * scale, w * scale]`` (e.g. spandrel's RCAN).
        scale: Its upsampling factor.
        global_residual: Add the bicubic upsampled input to its output, as :class:`SRNet`.

    The state dict holds the library network's own parameter names under ``net.``.
    """

    def __init__(self, net: nn.Module, scale: int, global_residual: bool) -> None:
        super().__init__()
        self.net = net
        self.scale = scale
        self.global_residual = global_residual

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        # spandrel's RCAN.forward scales its input in place (``x *= rgb_range``, 1 here): a
        # copy keeps the caller's batch untouched (autograd, inference tensors, ONNX tracing).
        x = self.net(lr.clone())
        if self.global_residual:
            x = x + F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return x


def _rcan(cfg: SRConfig) -> nn.Module:
    """spandrel's RCAN for one-channel images at ``cfg.scale``, randomly initialised."""
    from spandrel.architectures.RCAN import RCAN  # here: importing spandrel takes seconds

    groups, blocks, features = rcan_sizes(cfg)
    net = RCAN(
        scale=cfg.scale,
        n_resgroups=groups,
        n_resblocks=blocks,
        n_feats=features,
        n_colors=1,
        # norm=False: no MeanShift, whose fixed DIV2K RGB mean is a 3-channel conv; with it
        # off spandrel also sets rgb_range to 1, so images stay in [0, 1] as everywhere here.
        norm=False,
        reduction=cfg.reduction,
    )
    return LibrarySRNet(net, cfg.scale, cfg.global_residual)


def create_sr_model(cfg: SRConfig) -> nn.Module:
    """Build an SR network with random initial weights.

    Args:
        cfg: The ``sr`` section: ``arch`` (edsr, srresnet or rcan), ``scale`` (2, 3 or 4),
            ``preset`` (``tiny`` and ``full`` fix the sizes, ``custom`` uses ``blocks`` and
            ``features``, and ``groups`` for rcan), ``res_scale`` (inside EDSR blocks),
            ``reduction`` (RCAN's channel attention) and ``global_residual`` (add the bicubic
            upsampled input to the output).

    Returns:
        The network: ``[B, 1, h, w] -> [B, 1, h * scale, w * scale]``.
    """
    if cfg.arch == "rcan":
        return _rcan(cfg)
    blocks, features = PRESETS.get(cfg.preset, (cfg.blocks, cfg.features))
    return SRNet(cfg.arch, cfg.scale, blocks, features, cfg.res_scale, cfg.global_residual)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
