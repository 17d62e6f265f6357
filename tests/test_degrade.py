"""Tests for shards/degrade.py: k-space truncation, zero-fill, bicubic, Rician noise, seeding."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from shards.degrade import (
    EVAL_EPOCH,
    DegradeConfig,
    bicubic_down,
    bicubic_up,
    degrade,
    kspace_truncate,
    kspace_truncate_complex,
    kspace_zero_fill,
    rician_noise,
    sample_generator,
    sample_seed,
    upsample_to,
)
from srmri.config import ConfigError, config_from_dict

SIZES = [(64, 64), (63, 65), (37, 50)]


def band_limited(h: int, w: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A positive image made of a few low frequencies (all below 1/8 of the band)."""
    y = torch.arange(h, dtype=dtype)[:, None] / h
    x = torch.arange(w, dtype=dtype)[None, :] / w
    two_pi = 2 * torch.pi
    img = (
        0.5
        + 0.2 * torch.cos(two_pi * 3 * y)
        + 0.15 * torch.sin(two_pi * 2 * x)
        + 0.1 * torch.cos(two_pi * (2 * y + 3 * x) + 0.4)
    )
    return img.expand(1, h, w).clone()


def central_block(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The central (h, w) block of the centred spectrum, cut with fftshift (independent of
    the module's index arithmetic), returned in unshifted order, times the phase that moves
    LR samples to HR block centres (position m * s + (s - 1) / 2, written out here by hand)."""
    shifted = torch.fft.fftshift(torch.fft.fft2(img, norm="forward"), dim=(-2, -1))
    height, width = img.shape[-2:]
    top, left = height // 2 - h // 2, width // 2 - w // 2
    block = torch.fft.ifftshift(shifted[..., top : top + h, left : left + w], dim=(-2, -1))
    ky = torch.fft.fftfreq(h, d=1.0 / h, dtype=torch.float64)[:, None]
    kx = torch.fft.fftfreq(w, d=1.0 / w, dtype=torch.float64)[None, :]
    dy, dx = (height // h - 1) / 2, (width // w - 1) / 2
    phase = torch.exp(2j * torch.pi * (ky * dy / height + kx * dx / width))
    return block * phase


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_output_sizes(size: tuple[int, int], scale: int) -> None:
    img = torch.rand(1, *size)
    small = (size[0] // scale, size[1] // scale)
    for method in ("kspace", "bicubic"):
        lr, used = degrade(img, DegradeConfig(method=method, scale=scale), None)
        assert used == scale and lr.shape == (1, *small) and lr.dtype == torch.float32
        for up in ("bicubic", "zero_fill"):
            assert upsample_to(lr, size, up).shape == (1, *size)
    assert bicubic_down(img, scale).shape == (1, *small)
    assert bicubic_up(bicubic_down(img, scale), size).shape == (1, *size)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_truncation_keeps_low_frequencies_exactly(size: tuple[int, int], scale: int) -> None:
    img = torch.rand(2, 1, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h, w = size[0] // scale, size[1] // scale
    lr = kspace_truncate_complex(img, scale)
    torch.testing.assert_close(torch.fft.fft2(lr, norm="forward"), central_block(img, h, w))


@pytest.mark.parametrize("size", SIZES)
def test_magnitude_of_band_limited_image_keeps_its_spectrum(size: tuple[int, int]) -> None:
    # A smooth positive image: the truncated inverse is real and positive, so the magnitude
    # step changes nothing and the LR's own FFT is the central block of the HR FFT.
    img = band_limited(*size)
    lr = kspace_truncate(img, 2)
    assert not lr.is_complex() and lr.min() > 0
    block = central_block(img, size[0] // 2, size[1] // 2)
    torch.testing.assert_close(torch.fft.fft2(lr, norm="forward"), block, atol=1e-10, rtol=0)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("window", ["none", "tukey", "hamming"])
def test_constant_image_stays_constant(size: tuple[int, int], window: str) -> None:
    img = torch.full((1, *size), 0.37)
    for scale in (1, 2, 3, 4):
        lr = kspace_truncate(img, scale, window)  # type: ignore[arg-type]
        torch.testing.assert_close(lr, torch.full_like(lr, 0.37), atol=1e-6, rtol=0)
        up = kspace_zero_fill(lr, size)
        torch.testing.assert_close(up, torch.full_like(up, 0.37), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        bicubic_down(img, 3), torch.full((1, size[0] // 3, size[1] // 3), 0.37)
    )


def test_scale_one_is_identity_and_output_is_real_non_negative_unclamped() -> None:
    img = torch.rand(1, 40, 41, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(kspace_truncate(img, 1), img, atol=1e-6, rtol=0)
    step = torch.zeros(1, 64, 64)
    step[..., 16:48, 16:48] = 1.0  # a sharp edge: truncation rings past 1 and is not clamped
    lr = kspace_truncate(step, 4)
    assert lr.dtype == torch.float32 and not lr.is_complex()
    assert lr.min() >= 0 and lr.max() > 1.0


@pytest.mark.parametrize("size", [(64, 64), (63, 66)])
def test_window_attenuates_kspace_edges(size: tuple[int, int]) -> None:
    img = torch.rand(1, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    plain = torch.fft.fftshift(torch.fft.fft2(kspace_truncate_complex(img, 2), norm="forward"))
    h, w = size[0] // 2, size[1] // 2
    cy, cx = h // 2, w // 2
    for window, edge_max in (("tukey", 0.2), ("hamming", 0.2)):
        spec = torch.fft.fft2(kspace_truncate_complex(img, 2, window), norm="forward")  # type: ignore[arg-type]
        ratio = (torch.fft.fftshift(spec).abs() / plain.abs()).squeeze(0)
        assert ratio[cy, cx] == pytest.approx(1.0)  # DC untouched: the mean is kept
        frame = torch.cat([ratio[0], ratio[-1], ratio[:, 0], ratio[:, -1]])
        assert frame.max() < edge_max
        assert (ratio <= 1.0 + 1e-9).all()
    # Tukey(alpha=0.5) is flat over the inner half of the band.
    spec = torch.fft.fft2(kspace_truncate_complex(img, 2, "tukey", 0.5), norm="forward")
    ratio = (torch.fft.fftshift(spec).abs() / plain.abs()).squeeze(0)
    inner = ratio[cy - h // 5 : cy + h // 5, cx - w // 5 : cx + w // 5]
    torch.testing.assert_close(inner, torch.ones_like(inner))


@pytest.mark.parametrize("size", [(64, 64), (63, 66), (65, 64)])
@pytest.mark.parametrize("scale", [2, 4])
def test_zero_fill_reconstructs_band_limited_image(size: tuple[int, int], scale: int) -> None:
    hr = band_limited(*size)
    rec = kspace_zero_fill(kspace_truncate(hr, scale), size)
    torch.testing.assert_close(rec, hr, atol=1e-9, rtol=0)
    # The bicubic baseline of the same image is clearly worse: the test can tell them apart.
    bic = bicubic_up(bicubic_down(hr, scale), size)
    assert (bic - hr).abs().max() > 1e-3


@pytest.mark.parametrize("scale", [2, 4])
def test_kspace_grid_matches_bicubic_grid(scale: int) -> None:
    # LR pixels sit at HR block centres for both methods, so on a smooth image the k-space LR
    # matches area-style downsampling, and bicubic upsampling of it is a fair baseline: close
    # to zero-fill instead of several dB worse from a sub-pixel shift.
    hr = band_limited(64, 64)
    lr_k = kspace_truncate(hr, scale)
    lr_b = bicubic_down(hr, scale)
    assert (lr_k - lr_b).abs().max() < 0.04
    corner = hr[..., ::scale, ::scale]  # the old corner-sampling grid is measurably different
    assert (lr_k - corner).abs().max() > 2 * (lr_k - lr_b).abs().max()
    err_bic = (bicubic_up(lr_k, (64, 64)) - hr).pow(2).mean()
    err_zf = (kspace_zero_fill(lr_k, (64, 64)) - hr).pow(2).mean()
    assert err_zf < 1e-12 and err_bic < 3e-4


def test_bicubic_down_is_antialiased() -> None:
    # One bright column in every four: averaged it is 0.25; point-sampled it aliases away.
    stripes = torch.zeros(1, 32, 32)
    stripes[..., ::4] = 1.0
    inner = bicubic_down(stripes, 4)[..., 2:-2, 2:-2]
    torch.testing.assert_close(inner, torch.full_like(inner, 0.25), atol=0.01, rtol=0)


@pytest.mark.parametrize("level", [0.0, 0.3])
def test_rician_noise_matches_theory_and_is_reproducible(level: float) -> None:
    sigma = 0.05
    flat = torch.full((1, 256, 256), level)
    noisy = rician_noise(flat, sigma, torch.Generator().manual_seed(7))
    theory = stats.rice(level / sigma, scale=sigma)
    values = noisy.double().flatten().numpy()
    assert values.mean() == pytest.approx(theory.mean(), rel=0.02)
    assert values.var() == pytest.approx(theory.var(), rel=0.05)
    again = rician_noise(flat, sigma, torch.Generator().manual_seed(7))
    other = rician_noise(flat, sigma, torch.Generator().manual_seed(8))
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)
    torch.testing.assert_close(rician_noise(flat, 0.0, torch.Generator()), flat)


def reference_seed(seed: int, epoch: int, key: str) -> int:
    digest = hashlib.sha256(json.dumps([seed, epoch, key]).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def test_sample_seed_is_stable_and_distinct() -> None:
    cases = [(0, 0, "a"), (0, 1, "a"), (0, 0, "b"), (1, 0, "a"), (0, EVAL_EPOCH, "a")]
    seeds = [sample_seed(*c) for c in cases]
    assert seeds == [reference_seed(*c) for c in cases]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(0, 12, "3") != sample_seed(0, 1, "23")  # fields cannot run together
    # Another interpreter with another hash() salt gives the same value.
    code = "from shards.degrade import sample_seed; print(sample_seed(5, 3, 'brain/0001'))"
    env = {**os.environ, "PYTHONHASHSEED": "123", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert int(out.stdout) == reference_seed(5, 3, "brain/0001")
    draw = torch.rand(4, generator=sample_generator(5, 3, "k"))
    assert torch.equal(draw, torch.rand(4, generator=sample_generator(5, 3, "k")))


def test_degrade_random_scale_is_deterministic_per_generator() -> None:
    img = torch.rand(1, 48, 48, generator=torch.Generator().manual_seed(4))
    cfg = DegradeConfig(random_scale=(2, 4), noise_sigma=0.02)
    seen = set()
    for i in range(40):
        lr, scale = degrade(img, cfg, sample_generator(0, 0, f"k{i}"))
        assert 2 <= scale <= 4 and lr.shape == (1, 48 // scale, 48 // scale)
        again, scale2 = degrade(img, cfg, sample_generator(0, 0, f"k{i}"))
        assert scale2 == scale and torch.equal(lr, again)
        seen.add(scale)
    assert seen == {2, 3, 4}
    # Evaluation: one key, the same LR every time; training: a new draw each epoch.
    fixed = DegradeConfig(scale=2, noise_sigma=0.05)
    first, _ = degrade(img, fixed, sample_generator(0, EVAL_EPOCH, "x"))
    second, _ = degrade(img, fixed, sample_generator(0, EVAL_EPOCH, "x"))
    epoch1, _ = degrade(img, fixed, sample_generator(0, 1, "x"))
    assert torch.equal(first, second) and not torch.equal(first, epoch1)


def test_batched_and_single_agree() -> None:
    batch = torch.rand(3, 1, 33, 40, generator=torch.Generator().manual_seed(5))
    for fn in (
        lambda x: kspace_truncate(x, 3, "hamming"),
        lambda x: bicubic_down(x, 2),
        lambda x: kspace_zero_fill(x, (40, 41)),
        lambda x: bicubic_up(x, (50, 50)),
    ):
        out = fn(batch)
        for i in range(3):
            torch.testing.assert_close(fn(batch[i]), out[i])
            torch.testing.assert_close(fn(batch[i, 0]), out[i, 0])  # a bare [H, W] too
    lr, scale = degrade(batch, DegradeConfig(random_scale=(2, 3)), torch.Generator().manual_seed(0))
    assert lr.shape == (3, 1, 33 // scale, 40 // scale)


def test_bad_input_errors_are_clear() -> None:
    img = torch.rand(1, 16, 16)
    with pytest.raises(ValueError, match=r"kspace_truncate: expected an image shaped"):
        kspace_truncate(torch.rand(16), 2)
    with pytest.raises(ValueError, match=r"floating-point"):
        kspace_truncate(torch.ones(1, 16, 16, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match=r"torch.Tensor"):
        bicubic_down(np.zeros((16, 16), dtype=np.float32), 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"scale must be an integer >= 1, got 0"):
        kspace_truncate(img, 0)
    with pytest.raises(ValueError, match=r"3x3 image is smaller than the scale 4"):
        bicubic_down(torch.rand(1, 3, 3), 4)
    with pytest.raises(ValueError, match=r"window must be"):
        kspace_truncate(img, 2, "hann")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"target size \(8, 8\) is smaller than the input 16x16"):
        kspace_zero_fill(img, (8, 8))
    with pytest.raises(ValueError, match=r"method must be bicubic or zero_fill"):
        upsample_to(img, (32, 32), "nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"sigma must be"):
        rician_noise(img, -0.1, torch.Generator())
    with pytest.raises(ValueError, match=r"need a generator"):
        degrade(img, DegradeConfig(noise_sigma=0.1), None)
    with pytest.raises(ValueError, match=r"name must be a str"):
        sample_seed(0, 0, 3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"scale": 0}, "degrade.scale"),
        ({"random_scale": [3, 2]}, "degrade.random_scale"),
        ({"method": "bicubic", "window": "tukey"}, "degrade.window"),
        ({"tukey_alpha": 1.5}, "degrade.tukey_alpha"),
        ({"noise_sigma": -1}, "degrade.noise_sigma"),
        ({"method": "bicubc"}, "did you mean 'bicubic'"),
    ],
)
def test_config_check(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(DegradeConfig, data)
    cfg = config_from_dict(DegradeConfig, {"random_scale": [2, 4], "window": "hamming"})
    assert cfg.random_scale == (2, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    img = torch.rand(2, 1, 64, 63, generator=torch.Generator().manual_seed(6))
    cfg = DegradeConfig(scale=3, window="tukey", noise_sigma=0.03)
    cpu, _ = degrade(img, cfg, sample_generator(1, 2, "k"))
    gpu, _ = degrade(img.cuda(), cfg, sample_generator(1, 2, "k"))  # CPU generator, CUDA image
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)
    for method in ("bicubic", "zero_fill"):
        up = upsample_to(gpu, (64, 63), method)  # type: ignore[arg-type]
        torch.testing.assert_close(up.cpu(), upsample_to(cpu, (64, 63), method), atol=1e-5, rtol=0)  # type: ignore[arg-type]
