"""Training-time augmentation of one normalised slice, drawn entirely from a torch.Generator.

The paper's augmentations (rotation, flips, zoom/scale, shift, additive noise) come from
``torchvision.transforms.v2.functional`` with parameters drawn here; the MRI-specific ones
(bias field, Gibbs ringing, Rician noise) come from MONAI. Every random number is derived from
the generator passed in, never from torch's, numpy's or Python's global state, so the trainer can
seed the generator from (seed, epoch, sample key) and a resumed run sees the same augmentations.

Draw order is fixed whatever is switched on: one vector of uniforms and two integer seeds are
drawn first, then (only if applied) the Gaussian noise field. So switching one augmentation on
or off does not change the parameters the others draw for the same sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from srmri.config import require

__all__ = [
    "AugmentConfig",
    "BiasFieldConfig",
    "FlipConfig",
    "GibbsConfig",
    "NoiseConfig",
    "RicianConfig",
    "RotationConfig",
    "ShiftConfig",
    "ZoomConfig",
    "create_augmentation",
]

Augmentation = Callable[[Tensor, torch.Generator], Tensor]

# Positions in the vector of uniforms drawn per call (see the module docstring).
_U_HFLIP, _U_VFLIP, _U_ROT_P, _U_ROT, _U_ZOOM_P, _U_ZOOM = 0, 1, 2, 3, 4, 5
_U_SHIFT_P, _U_SHIFT_X, _U_SHIFT_Y, _U_NOISE_P = 6, 7, 8, 9
_U_BIAS_P, _U_GIBBS_P, _U_GIBBS, _U_RICIAN_P = 10, 11, 12, 13
_N_UNIFORMS = 16  # two spare, so a new augmentation can be added without shifting the others


@dataclass
class RotationConfig:
    """Rotation by an angle drawn uniformly from [-degrees, degrees]."""

    enabled: bool = True
    p: float = 0.5
    degrees: float = 10.0


@dataclass
class FlipConfig:
    """A mirror flip applied with probability ``p``."""

    enabled: bool = True
    p: float = 0.5


@dataclass
class ZoomConfig:
    """Isotropic scaling by a factor drawn uniformly from ``range`` (1 = unchanged)."""

    enabled: bool = True
    p: float = 0.5
    range: tuple[float, float] = (0.9, 1.1)


@dataclass
class ShiftConfig:
    """Translation by up to ``fraction`` of the image side, drawn per axis from [-f, f]."""

    enabled: bool = True
    p: float = 0.5
    fraction: float = 0.05


@dataclass
class NoiseConfig:
    """Additive Gaussian noise with standard deviation ``std`` (image units, [0, 1] scale)."""

    enabled: bool = True
    p: float = 0.3
    std: float = 0.02


@dataclass
class BiasFieldConfig:
    """MONAI bias field: the image times exp(a Legendre polynomial of ``degree``).

    Coefficients are drawn uniformly from ``coeff_range``; a symmetric range darkens some
    regions and brightens others, as a receive coil does.
    """

    enabled: bool = False
    p: float = 0.3
    degree: int = 3
    coeff_range: tuple[float, float] = (-0.1, 0.1)


@dataclass
class GibbsConfig:
    """MONAI Gibbs ringing: k-space truncation with ``alpha`` drawn from ``alpha_range``.

    alpha 0 leaves the image unchanged, 1 removes all of k-space.
    """

    enabled: bool = False
    p: float = 0.3
    alpha_range: tuple[float, float] = (0.0, 0.4)


@dataclass
class RicianConfig:
    """MONAI Rician noise: magnitude of the image plus complex Gaussian noise of ``sigma``."""

    enabled: bool = False
    p: float = 0.3
    sigma: float = 0.02


@dataclass
class AugmentConfig:
    """Which augmentations the training split gets, with strength and probability each.

    Override from the command line as, e.g., ``augment.rotation.degrees=15`` or
    ``augment.gibbs.enabled=true``; ``augment.enabled=false`` switches all of them off.
    """

    enabled: bool = True
    rotation: RotationConfig = field(default_factory=RotationConfig)
    hflip: FlipConfig = field(default_factory=FlipConfig)
    vflip: FlipConfig = field(default_factory=lambda: FlipConfig(p=0.1))
    zoom: ZoomConfig = field(default_factory=ZoomConfig)
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    bias_field: BiasFieldConfig = field(default_factory=BiasFieldConfig)
    gibbs: GibbsConfig = field(default_factory=GibbsConfig)
    rician: RicianConfig = field(default_factory=RicianConfig)

    def check(self) -> None:
        """Raise ConfigError naming the key of any out-of-range strength or probability."""
        for name in (
            "rotation",
            "hflip",
            "vflip",
            "zoom",
            "shift",
            "noise",
            "bias_field",
            "gibbs",
            "rician",
        ):
            p = getattr(self, name).p
            require(0.0 <= p <= 1.0, f"augment.{name}.p", f"must be in [0, 1], got {p}")
        deg = self.rotation.degrees
        require(0 <= deg <= 180, "augment.rotation.degrees", f"must be in [0, 180], got {deg}")
        lo, hi = self.zoom.range
        require(0 < lo <= hi, "augment.zoom.range", f"need 0 < low <= high, got [{lo}, {hi}]")
        frac = self.shift.fraction
        require(0 <= frac <= 0.5, "augment.shift.fraction", f"must be in [0, 0.5], got {frac}")
        std = self.noise.std
        require(std >= 0, "augment.noise.std", f"must be non-negative, got {std}")
        require(
            1 <= self.bias_field.degree <= 6,
            "augment.bias_field.degree",
            f"must be in 1..6, got {self.bias_field.degree}",
        )
        lo, hi = self.bias_field.coeff_range
        require(
            lo <= hi and max(abs(lo), abs(hi)) <= 2,
            "augment.bias_field.coeff_range",
            f"need low <= high within [-2, 2], got [{lo}, {hi}]",
        )
        lo, hi = self.gibbs.alpha_range
        require(
            0 <= lo <= hi <= 1,
            "augment.gibbs.alpha_range",
            f"need 0 <= low <= high <= 1, got [{lo}, {hi}]",
        )
        sigma = self.rician.sigma
        require(sigma >= 0, "augment.rician.sigma", f"must be non-negative, got {sigma}")


def _on(enabled: bool, p: float, u: Tensor, idx: int) -> bool:
    """Whether an augmentation applies: switched on and its uniform draw falls under p."""
    return enabled and p > 0 and float(u[idx]) < p


def _lerp(lo: float, hi: float, t: float) -> float:
    return lo + (hi - lo) * t


def _mri_artefacts(
    image: Tensor, cfg: AugmentConfig, u: Tensor, seeds: Tensor
) -> tuple[Tensor, bool]:
    """Bias field, Gibbs ringing and Rician noise (MONAI), as drawn in ``u`` and ``seeds``.

    Returns:
        The image with what applies, and whether anything did.
    """
    wanted = (
        _on(cfg.bias_field.enabled, cfg.bias_field.p, u, _U_BIAS_P),
        _on(cfg.gibbs.enabled, cfg.gibbs.p, u, _U_GIBBS_P),
        _on(cfg.rician.enabled, cfg.rician.p, u, _U_RICIAN_P) and cfg.rician.sigma > 0,
    )
    if not any(wanted):
        return image, False
    # Imported here: `import monai` costs ~7 s of CPU on this machine (it loads every submodule),
    # which every trainer process would otherwise pay whether or not it uses these three.
    from monai.transforms import GibbsNoise, RandBiasField, RandRicianNoise
    from monai.utils import convert_to_tensor

    out = image
    if wanted[0]:
        # A fresh MONAI transform per call, seeded from the generator: no RNG state is
        # shared between calls or threads. prob=1: whether it applies was decided above.
        bias = RandBiasField(
            degree=cfg.bias_field.degree, coeff_range=cfg.bias_field.coeff_range, prob=1.0
        )
        bias.set_random_state(seed=int(seeds[0]))
        out = convert_to_tensor(bias(out), track_meta=False, dtype=torch.float32)
    if wanted[1]:
        alpha = _lerp(*cfg.gibbs.alpha_range, float(u[_U_GIBBS]))
        out = convert_to_tensor(GibbsNoise(alpha)(out), track_meta=False, dtype=torch.float32)
    if wanted[2]:
        rician = RandRicianNoise(prob=1.0, std=cfg.rician.sigma, sample_std=False)
        rician.set_random_state(seed=int(seeds[1]))
        out = convert_to_tensor(rician(out), track_meta=False, dtype=torch.float32)
    return out, True


class _Augmenter:
    """The callable :func:`create_augmentation` returns (a class so it pickles to workers)."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    def __call__(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """Augment one image.

        Args:
            image: FloatTensor[1, H, W] in [0, 1].
            generator: The only source of randomness.

        Returns:
            FloatTensor[1, H, W] in [0, 1]; the input itself when nothing applies.
        """
        if image.ndim != 3 or image.shape[0] != 1:
            raise ValueError(f"augment expects a [1, H, W] image, got shape {tuple(image.shape)}")
        cfg = self.cfg
        if not cfg.enabled:
            return image
        u = torch.rand(_N_UNIFORMS, generator=generator, dtype=torch.float64)
        seeds = torch.randint(0, 2**31 - 1, (2,), generator=generator)
        out = image
        changed = False

        if _on(cfg.hflip.enabled, cfg.hflip.p, u, _U_HFLIP):
            out, changed = out.flip(-1), True
        if _on(cfg.vflip.enabled, cfg.vflip.p, u, _U_VFLIP):
            out, changed = out.flip(-2), True

        angle, scale, dx, dy = 0.0, 1.0, 0.0, 0.0
        if _on(cfg.rotation.enabled, cfg.rotation.p, u, _U_ROT_P):
            angle = _lerp(-cfg.rotation.degrees, cfg.rotation.degrees, float(u[_U_ROT]))
        if _on(cfg.zoom.enabled, cfg.zoom.p, u, _U_ZOOM_P):
            scale = _lerp(*cfg.zoom.range, float(u[_U_ZOOM]))
        if _on(cfg.shift.enabled, cfg.shift.p, u, _U_SHIFT_P):
            h, w = out.shape[-2:]
            f = cfg.shift.fraction
            dx = _lerp(-f, f, float(u[_U_SHIFT_X])) * w
            dy = _lerp(-f, f, float(u[_U_SHIFT_Y])) * h
        if angle != 0.0 or scale != 1.0 or dx != 0.0 or dy != 0.0:
            # One resampling for rotation, zoom and shift together: less blur than three.
            out = TF.affine(
                out,
                angle=angle,
                translate=[dx, dy],
                scale=scale,
                shear=[0.0, 0.0],
                interpolation=TF.InterpolationMode.BILINEAR,
                fill=[0.0],
            )
            changed = True

        out, mri_changed = _mri_artefacts(out, cfg, u, seeds)
        changed = changed or mri_changed
        if _on(cfg.noise.enabled, cfg.noise.p, u, _U_NOISE_P) and cfg.noise.std > 0:
            noise = torch.randn(out.shape, generator=generator, dtype=out.dtype)
            out = out + noise * cfg.noise.std
            changed = True

        if not changed:
            return image
        # The model sees [0, 1] images at validation; keep training inputs in the same range.
        return out.clamp_(0.0, 1.0)  # out is a new tensor here, never the caller's image


def create_augmentation(cfg: AugmentConfig) -> Augmentation:
    """Build the per-sample augmentation described by ``cfg``.

    Args:
        cfg: Which augmentations apply, with their strengths and probabilities.

    Returns:
        A picklable callable ``(image, generator) -> image`` taking and returning a
        FloatTensor[1, H, W] in [0, 1]. Its output depends only on the image and the generator's
        state (it advances the generator); with everything off it returns the input unchanged.
    """
    cfg.check()
    return _Augmenter(cfg)
