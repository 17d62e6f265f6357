"""Low-resolution degradation: the LR images the SR model learns from and the baselines beat.

MRI loses resolution in k-space, so the default degradation keeps only the central block of the
centred 2-D spectrum (optionally tapered by a Tukey or Hamming window), transforms back and takes
the magnitude, optionally followed by Rician noise. Bicubic downsampling is the alternative used
in the natural-image literature. The bicubic and zero-filled (k-space zero padding) baselines go
back up to the full grid with :func:`upsample_to`.

Conventions, shared by every function here:

* Images are real tensors shaped ``[..., H, W]`` (``[1, H, W]`` single, ``[B, 1, H, W]`` batch),
  in [0, 1], on any device. Half precision is computed in float32 and cast back.
* A scale ``s`` maps ``H x W`` to ``H // s x W // s`` (floor), for every method.
* The centre of k-space is the one :func:`torch.fft.fftshift` uses: for a length ``n`` the DC term
  sits at index ``n // 2`` of the shifted spectrum. Keeping ``h`` of ``H`` rows therefore keeps
  the frequencies ``-(h // 2) .. h - h // 2 - 1``, which are exactly the frequencies of an
  ``h``-point FFT; odd sizes keep one more positive than negative frequency, as fftshift does.
* FFTs use ``norm="forward"`` (the forward transform divides by the number of pixels), so a
  coefficient is a mean, the spectrum of the LR image *is* the kept block of the HR spectrum,
  and a constant image stays the same constant at any size.
* Sampling grid: LR pixel ``m`` sits at the centre of the HR block it covers, HR position
  ``m * s + (s - 1) / 2``, the convention of ``torch.nn.functional.interpolate``
  (``align_corners=False``), area downsampling and pixel-shuffle upsampling. The k-space
  methods apply the matching linear phase (a sub-pixel shift) so the bicubic baseline and the SR
  network see LR images on the same grid as the zero-filled baseline; without it every LR pixel
  would sit at the block's corner and bicubic upsampling would be off by (s - 1) / 2 pixels,
  an unfair baseline (measured: about 5 dB PSNR at x2 on the synthetic set).
* Outputs are not clamped to [0, 1]: truncation ringing (Gibbs) and bicubic overshoot are part of
  the degradation and the model must see them.

Determinism: every random draw comes from a :class:`torch.Generator` seeded by
:func:`sample_seed` from (seed, epoch, the sample's payload digest), so a resumed run needs no
RNG state. Evaluation uses ``epoch=EVAL_EPOCH`` (-1), giving the same LR image for a sample in
every epoch. The digest, not the key, names the sample here: a real source's key is a keyed
hash of the local ingest secret, and draws seeded from it would differ between machines.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Final, Literal

import torch
import torch.nn.functional as F

from srmri.config import require

__all__ = [
    "EVAL_EPOCH",
    "SAMPLE_DRAWS",
    "DegradeConfig",
    "bicubic_down",
    "bicubic_up",
    "degrade",
    "kspace_truncate",
    "kspace_truncate_complex",
    "kspace_zero_fill",
    "rician_noise",
    "sample_generator",
    "sample_seed",
    "upsample_to",
]

EVAL_EPOCH: Final = -1
"""The epoch passed to :func:`sample_seed` for evaluation, so its degradation never changes."""

SAMPLE_DRAWS = "payload-digest-v1"
"""What names a sample to :func:`sample_seed`: its payload digest. Recorded by every artefact
whose numbers depend on the per-sample draws (checkpoints, SR sets, pipeline stages), so that
one made when draws were seeded from keys (recorded as "") is not continued or reused."""

Window = Literal["none", "tukey", "hamming"]


@dataclass
class DegradeConfig:
    """How an HR image becomes its LR counterpart.

    Attributes:
        method: ``kspace`` (central k-space block, the MRI-faithful default) or ``bicubic``.
        scale: Downsampling factor s (output is ``H // s x W // s``); 1 is the identity grid.
        window: Taper of the kept k-space block (``kspace`` only): none, tukey or hamming.
        tukey_alpha: Tukey taper fraction: 0 is no taper, 1 is a Hann window.
        noise_sigma: Rician noise sigma on the LR image (intensities are in [0, 1]); 0 is none.
        random_scale: Training only: an inclusive ``(low, high)`` range the scale is drawn from
            for each sample (replaces ``scale``). Evaluation configs leave it unset.
    """

    method: Literal["kspace", "bicubic"] = "kspace"
    scale: int = 2
    window: Window = "none"
    tukey_alpha: float = 0.5
    noise_sigma: float = 0.0
    random_scale: tuple[int, int] | None = None

    def check(self) -> None:
        require(self.method in ("kspace", "bicubic"), "degrade.method", "must be kspace or bicubic")
        require(self.scale >= 1, "degrade.scale", f"must be at least 1, got {self.scale}")
        require(
            self.window in ("none", "tukey", "hamming"),
            "degrade.window",
            f"must be none, tukey or hamming, got {self.window!r}",
        )
        require(
            self.method == "kspace" or self.window == "none",
            "degrade.window",
            f"a k-space window has no effect with method={self.method}; set it to none",
        )
        require(0.0 <= self.tukey_alpha <= 1.0, "degrade.tukey_alpha", "must be in [0, 1]")
        require(
            math.isfinite(self.noise_sigma) and self.noise_sigma >= 0.0,
            "degrade.noise_sigma",
            f"must be a finite number >= 0, got {self.noise_sigma}",
        )
        if self.random_scale is not None:
            low, high = self.random_scale
            require(
                1 <= low <= high,
                "degrade.random_scale",
                f"must be (low, high) with 1 <= low <= high, got {self.random_scale}",
            )


def _check_image(img: torch.Tensor, where: str, scale: int = 1) -> None:
    """Raise ValueError, naming ``where``, unless ``img`` is a real [..., H, W] image >= scale."""
    if not isinstance(img, torch.Tensor):
        raise ValueError(f"{where}: expected a torch.Tensor, got {type(img).__name__}")
    if img.ndim < 2:
        raise ValueError(f"{where}: expected an image shaped [..., H, W], got {tuple(img.shape)}")
    if not img.is_floating_point():
        raise ValueError(f"{where}: expected a real floating-point image, got {img.dtype}")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"{where}: scale must be an integer >= 1, got {scale!r}")
    h, w = img.shape[-2:]
    if h < scale or w < scale:
        raise ValueError(f"{where}: a {h}x{w} image is smaller than the scale {scale}")


def _work_dtype(img: torch.Tensor) -> torch.Tensor:
    """FFTs and antialiased interpolation need float32 or float64; half goes through float32."""
    return img if img.dtype in (torch.float32, torch.float64) else img.float()


def _crop_freq(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """Keep the ``n`` lowest frequencies of an unshifted spectrum along ``dim``.

    Unshifted order is ``0, 1, .., -2, -1``; the kept ``-(n // 2) .. n - n // 2 - 1`` are the
    first ``n - n // 2`` entries and the last ``n // 2``: an n-point spectrum, no shift needed.
    """
    pos, neg = n - n // 2, n // 2
    size = x.shape[dim]
    return torch.cat([x.narrow(dim, 0, pos), x.narrow(dim, size - neg, neg)], dim=dim)


def _embed_freq(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad an unshifted spectrum along ``dim`` to ``size`` frequencies (inverse of crop)."""
    n = x.shape[dim]
    pos, neg = n - n // 2, n // 2
    shape = list(x.shape)
    shape[dim] = size - n
    zeros = x.new_zeros(shape)
    return torch.cat([x.narrow(dim, 0, pos), zeros, x.narrow(dim, pos, neg)], dim=dim)


def _shift_ramp(n: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """Phase ramp over the ``n`` kept frequencies of a length-``size`` axis (unshifted order).

    Multiplying the kept block by it samples the band-limited interpolant at block centres:
    LR pixel ``m`` at HR position ``m * s + (s - 1) / 2`` with ``s = size // n``.
    """
    k = torch.fft.fftfreq(n, d=1.0 / n, device=like.device, dtype=like.dtype)
    delta = (size // n - 1) / 2.0
    return torch.polar(torch.ones_like(k), 2.0 * math.pi * k * delta / size)


def _window_1d(n: int, window: Window, alpha: float, like: torch.Tensor) -> torch.Tensor:
    """A 1-D taper over the ``n`` kept frequencies in unshifted order, 1 at DC.

    The taper is a function of the normalised radius ``r = |k| / (n / 2)`` so it is symmetric
    about DC and exactly 1 there (the image mean is kept) for even and odd ``n``:
    hamming ``0.54 + 0.46 cos(pi r)``; tukey flat for ``r <= 1 - alpha`` then a raised cosine to
    0 at ``r = 1``.
    """
    k = torch.fft.fftfreq(n, d=1.0 / n, device=like.device, dtype=like.dtype)
    r = k.abs() / (n / 2.0)
    if window == "hamming":
        return 0.54 + 0.46 * torch.cos(math.pi * r)
    if alpha <= 0.0:
        return torch.ones_like(r)
    edge = 1.0 - alpha
    taper = 0.5 * (1.0 + torch.cos(math.pi * (r - edge) / alpha))
    return torch.where(r <= edge, torch.ones_like(r), taper)


def kspace_truncate_complex(
    img: torch.Tensor, scale: int, window: Window = "none", tukey_alpha: float = 0.5
) -> torch.Tensor:
    """The complex LR image before the magnitude step (see :func:`kspace_truncate`).

    Its ``fft2(..., norm="forward")`` equals the central ``(H // s, W // s)`` block of the HR
    image's ``fft2(..., norm="forward")``, times the window and the block-centre phase ramp
    (see the module's sampling-grid convention).

    Args:
        img: Real image(s) shaped ``[..., H, W]``.
        scale: Integer factor s >= 1.
        window: Taper of the kept block: none, tukey or hamming.
        tukey_alpha: Tukey taper fraction in [0, 1].

    Returns:
        Complex tensor shaped ``[..., H // s, W // s]``.

    Raises:
        ValueError: On a non-tensor, a non-float or under-2-D input, a bad scale or window, or an
            image smaller than the scale.
    """
    _check_image(img, "kspace_truncate", scale)
    if window not in ("none", "tukey", "hamming"):
        raise ValueError(f"kspace_truncate: window must be none, tukey or hamming, got {window!r}")
    if not 0.0 <= tukey_alpha <= 1.0:
        raise ValueError(f"kspace_truncate: tukey_alpha must be in [0, 1], got {tukey_alpha}")
    x = _work_dtype(img)
    h, w = x.shape[-2] // scale, x.shape[-1] // scale
    # Separable: transform and crop one axis at a time so the second FFT runs on half the data.
    spec = _crop_freq(torch.fft.fft(x, dim=-1, norm="forward"), -1, w)
    spec = _crop_freq(torch.fft.fft(spec, dim=-2, norm="forward"), -2, h)
    ramp_y = _shift_ramp(h, x.shape[-2], x)
    ramp_x = _shift_ramp(w, x.shape[-1], x)
    spec = spec * (ramp_y[:, None] * ramp_x[None, :])
    if window != "none":
        wy = _window_1d(h, window, tukey_alpha, x)
        wx = _window_1d(w, window, tukey_alpha, x)
        spec = spec * (wy[:, None] * wx[None, :])
    return torch.fft.ifft2(spec, norm="forward")


def kspace_truncate(
    img: torch.Tensor, scale: int, window: Window = "none", tukey_alpha: float = 0.5
) -> torch.Tensor:
    """Downsample by keeping the central k-space block, as an MRI scanner at lower resolution.

    Centred FFT, keep the central ``(H // s, W // s)`` frequencies (optionally windowed), inverse
    FFT, magnitude. Intensity is preserved: a constant image gives the same constant. The result
    is real and non-negative but not clamped (ringing may exceed 1).

    Args:
        img: Real image(s) shaped ``[..., H, W]``, float32 (float64 and half also accepted).
        scale: Integer factor s >= 1 (1 keeps the whole spectrum: ``|img|``, with the window).
        window: Taper of the kept block: none, tukey or hamming.
        tukey_alpha: Tukey taper fraction in [0, 1].

    Returns:
        Tensor shaped ``[..., H // s, W // s]`` with the dtype of ``img``.

    Raises:
        ValueError: As :func:`kspace_truncate_complex`.
    """
    return kspace_truncate_complex(img, scale, window, tukey_alpha).abs().to(img.dtype)


def _check_size(lr: torch.Tensor, size: tuple[int, int], where: str) -> tuple[int, int]:
    _check_image(lr, where)
    if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in size):
        raise ValueError(f"{where}: size must be (H, W) integers, got {size!r}")
    h, w = lr.shape[-2:]
    if size[0] < h or size[1] < w:
        raise ValueError(f"{where}: target size {tuple(size)} is smaller than the input {h}x{w}")
    return int(size[0]), int(size[1])


def kspace_zero_fill(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-filled baseline: zero-pad the LR image's k-space to ``size`` and transform back.

    The exact inverse grid of :func:`kspace_truncate` (same centre), so a band-limited image is
    recovered from its truncation. Intensity preserved, magnitude taken, not clamped.

    Args:
        lr: Real LR image(s) shaped ``[..., h, w]``.
        size: Target ``(H, W)``, each at least the input size.

    Returns:
        Tensor shaped ``[..., H, W]`` with the dtype of ``lr``.

    Raises:
        ValueError: On a bad image or a target smaller than the input.
    """
    height, width = _check_size(lr, size, "kspace_zero_fill")
    x = _work_dtype(lr)
    spec = torch.fft.fft2(x, norm="forward")
    h, w = x.shape[-2:]
    # Undo the block-centre shift of kspace_truncate before embedding in the larger grid.
    undo = _shift_ramp(h, height, x).conj()[:, None] * _shift_ramp(w, width, x).conj()[None, :]
    spec = _embed_freq(_embed_freq(spec * undo, -1, width), -2, height)
    return torch.fft.ifft2(spec, norm="forward").abs().to(lr.dtype)


def _interpolate(x: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    """Bicubic resize of ``[..., H, W]`` by folding leading dims into a batch of 1-channel maps."""
    lead = x.shape[:-2]
    flat = _work_dtype(x).reshape(-1, 1, *x.shape[-2:])
    out = F.interpolate(flat, size=size, mode="bicubic", align_corners=False, antialias=antialias)
    return out.reshape(*lead, *size).to(x.dtype)


def bicubic_down(img: torch.Tensor, scale: int) -> torch.Tensor:
    """Antialiased bicubic downsampling to ``(H // s, W // s)`` (not clamped: bicubic overshoots).

    Args:
        img: Real image(s) shaped ``[..., H, W]``.
        scale: Integer factor s >= 1.

    Returns:
        Tensor shaped ``[..., H // s, W // s]`` with the dtype of ``img``.

    Raises:
        ValueError: On a bad image or scale.
    """
    _check_image(img, "bicubic_down", scale)
    return _interpolate(img, (img.shape[-2] // scale, img.shape[-1] // scale), antialias=True)


def bicubic_up(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic upsampling to ``size`` (the bicubic baseline; not clamped).

    Args:
        lr: Real image(s) shaped ``[..., h, w]``.
        size: Target ``(H, W)``, each at least the input size.

    Returns:
        Tensor shaped ``[..., H, W]`` with the dtype of ``lr``.

    Raises:
        ValueError: On a bad image or a target smaller than the input.
    """
    return _interpolate(lr, _check_size(lr, size, "bicubic_up"), antialias=False)


def rician_noise(img: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Add Rician noise: ``sqrt((x + n1)^2 + n2^2)`` with ``n1, n2 ~ N(0, sigma^2)``.

    The magnitude of a complex signal with Gaussian noise on both channels, as in MRI. The draws
    come from ``generator`` (on its own device, then moved to the image's), so a generator
    seeded the same way gives the same noise on CPU and CUDA.

    Args:
        img: Real image(s) shaped ``[..., H, W]``.
        sigma: Noise standard deviation per channel (image range [0, 1]); 0 returns a copy.
        generator: Source of the draws.

    Returns:
        Noisy tensor, same shape and dtype as ``img``.

    Raises:
        ValueError: On a bad image or a negative or non-finite sigma.
    """
    _check_image(img, "rician_noise")
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"rician_noise: sigma must be a finite number >= 0, got {sigma}")
    if sigma == 0:
        return img.clone()
    x = _work_dtype(img)
    noise = torch.randn(
        (2, *x.shape), generator=generator, device=generator.device, dtype=x.dtype
    ).to(x.device)
    noise = noise * sigma
    return torch.sqrt((x + noise[0]) ** 2 + noise[1] ** 2).to(img.dtype)


def degrade(
    img: torch.Tensor, cfg: DegradeConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, int]:
    """Make the LR image of ``img`` as ``cfg`` says.

    Draw order from ``generator`` (fixed, so a seed reproduces a sample): the scale (only with
    ``random_scale``), then the noise (only with ``noise_sigma > 0``). A batch shares one scale.

    Args:
        img: Real image(s) shaped ``[..., H, W]``.
        cfg: The degradation settings.
        generator: Source of the random draws, e.g. :func:`sample_generator`; may be None only
            when ``cfg`` draws nothing (fixed scale, no noise).

    Returns:
        The LR image on the small grid ``[..., H // s, W // s]`` and the scale s used.

    Raises:
        ValueError: On a bad image, or a config that draws without a generator.
        ConfigError: On an invalid config.
    """
    cfg.check()
    draws = cfg.random_scale is not None or cfg.noise_sigma > 0
    if draws and generator is None:
        raise ValueError("degrade: random_scale and noise_sigma need a generator, got None")
    scale = cfg.scale
    if cfg.random_scale is not None:
        assert generator is not None  # checked above; narrows the type
        low, high = cfg.random_scale
        pick = torch.randint(low, high + 1, (1,), generator=generator, device=generator.device)
        scale = int(pick.item())
    if cfg.method == "kspace":
        lr = kspace_truncate(img, scale, cfg.window, cfg.tukey_alpha)
    else:
        lr = bicubic_down(img, scale)
    if cfg.noise_sigma > 0:
        assert generator is not None
        lr = rician_noise(lr, cfg.noise_sigma, generator)
    return lr, scale


def upsample_to(
    lr: torch.Tensor, size: tuple[int, int], method: Literal["bicubic", "zero_fill"]
) -> torch.Tensor:
    """Bring an LR image back to the HR grid: the baselines and the classifier's ``lr`` input.

    Args:
        lr: Real image(s) shaped ``[..., h, w]``.
        size: Target ``(H, W)``.
        method: ``bicubic`` (:func:`bicubic_up`) or ``zero_fill`` (:func:`kspace_zero_fill`).

    Returns:
        Tensor shaped ``[..., H, W]``.

    Raises:
        ValueError: On an unknown method, a bad image or size.
    """
    if method == "bicubic":
        return bicubic_up(lr, size)
    if method == "zero_fill":
        return kspace_zero_fill(lr, size)
    raise ValueError(f"upsample_to: method must be bicubic or zero_fill, got {method!r}")


def sample_seed(seed: int, epoch: int, name: str) -> int:
    """A stable 63-bit seed for one sample in one epoch (sha256, not Python's salted hash()).

    Args:
        seed: The run's seed.
        epoch: The epoch, or :data:`EVAL_EPOCH` for evaluation.
        name: What names the sample: its payload digest (:attr:`shards.sample.Sample.digest`),
            optionally with a suffix that separates kinds of draws.

    Returns:
        An int in ``[0, 2**63)``, the same in every process and on every machine.

    Raises:
        ValueError: If seed or epoch is not an int or name is not a str.
    """
    for field, value in (("seed", seed), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"sample_seed: {field} must be an int, got {value!r}")
    if not isinstance(name, str):
        raise ValueError(f"sample_seed: name must be a str, got {type(name).__name__}")
    # JSON keeps the three fields apart whatever the name contains (no "1:2" + "3" collisions).
    digest = hashlib.sha256(json.dumps([seed, epoch, name]).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def sample_generator(
    seed: int, epoch: int, name: str, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A :class:`torch.Generator` on ``device`` seeded with :func:`sample_seed`.

    Args:
        seed: The run's seed.
        epoch: The epoch, or :data:`EVAL_EPOCH` for evaluation.
        name: What names the sample (see :func:`sample_seed`).
        device: Where the generator draws (``cpu`` works for any image device).

    Returns:
        The seeded generator.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(sample_seed(seed, epoch, name))
    return generator
