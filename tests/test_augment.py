"""trainer.augment: determinism from the generator alone, identity when off, each effect's kind."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from srmri.config import ConfigError, load_config
from trainer.augment import AugmentConfig, create_augmentation

NAMES = ("rotation", "hflip", "vflip", "zoom", "shift", "noise", "bias_field", "gibbs", "rician")


def only(name: str | None, **strength: object) -> AugmentConfig:
    """A config with exactly one augmentation on, always applied (p=1), with given strengths."""
    cfg = AugmentConfig()
    for n in NAMES:
        sub = getattr(cfg, n)
        sub.enabled = n == name
        sub.p = 1.0
    if name is not None:
        setattr(cfg, name, dataclasses.replace(getattr(cfg, name), **strength))
    return cfg


def all_on() -> AugmentConfig:
    cfg = AugmentConfig()
    for n in NAMES:
        getattr(cfg, n).enabled = True
        getattr(cfg, n).p = 1.0
    return cfg


def phantom(size: int = 64) -> torch.Tensor:
    """An asymmetric head-like image: bright off-centre ellipse on a black background."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    head = ((yy - size * 0.45) / (size * 0.35)) ** 2 + ((xx - size * 0.55) / (size * 0.3)) ** 2
    img = torch.where(head <= 1, 0.5 + 0.3 * torch.sin(xx / 3.0) * torch.cos(yy / 5.0), 0.0)
    img[6:12, 8:30] = 0.9  # a marker in the top-left so flips are visible
    return img[None].float()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_output_different_seed_differs() -> None:
    aug = create_augmentation(all_on())
    x = phantom()
    a = aug(x, gen(7))
    b = aug(x, gen(7))
    c = aug(x, gen(8))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_global_rng_state_neither_used_nor_changed() -> None:
    aug = create_augmentation(all_on())
    x = phantom()
    torch.manual_seed(1)
    np.random.seed(1)
    a = aug(x, gen(3))
    torch_after, np_after = torch.rand(1), np.random.rand()
    torch.manual_seed(999)
    np.random.seed(999)
    b = aug(x, gen(3))
    assert torch.equal(a, b)  # global seeds differ, output does not
    torch.manual_seed(1)
    np.random.seed(1)
    assert torch.equal(torch.rand(1), torch_after) and np.random.rand() == np_after


def test_survives_pickling_for_dataloader_workers() -> None:
    aug = create_augmentation(all_on())
    clone = pickle.loads(pickle.dumps(aug))
    assert torch.equal(aug(phantom(), gen(5)), clone(phantom(), gen(5)))


def test_identity_when_off() -> None:
    x = phantom()
    for cfg in (only(None), dataclasses.replace(all_on(), enabled=False)):
        assert torch.equal(create_augmentation(cfg)(x, gen(0)), x)
    # p=0 for everything is also the identity.
    cfg = all_on()
    for n in NAMES:
        getattr(cfg, n).p = 0.0
    assert torch.equal(create_augmentation(cfg)(x, gen(0)), x)


def test_toggling_one_augmentation_keeps_the_others_draws() -> None:
    x = phantom()
    cfg = only("rotation", degrees=30.0)
    cfg.hflip.enabled = True
    flipped_then_rotated = create_augmentation(cfg)(x, gen(11))
    # The rotation angle drawn for this generator state does not depend on hflip being on.
    rotated_only = create_augmentation(only("rotation", degrees=30.0))(x.flip(-1), gen(11))
    assert torch.equal(flipped_then_rotated, rotated_only)
    assert not torch.equal(rotated_only, x.flip(-1))


def test_flips_mirror_exactly() -> None:
    x = phantom()
    assert torch.equal(create_augmentation(only("hflip"))(x, gen(0)), x.flip(-1))
    assert torch.equal(create_augmentation(only("vflip"))(x, gen(0)), x.flip(-2))


def test_geometric_ones_move_pixels_but_keep_size_and_mass() -> None:
    x = phantom()
    for name, strength in (
        ("rotation", {"degrees": 30.0}),
        ("zoom", {"range": (1.2, 1.3)}),
        ("shift", {"fraction": 0.1}),
    ):
        y = create_augmentation(only(name, **strength))(x, gen(2))
        assert y.shape == x.shape
        assert float((y - x).abs().mean()) > 0.01, name
        if name != "zoom":  # rotation and a small shift keep the head inside the frame
            assert abs(float(y.sum()) / float(x.sum()) - 1) < 0.05, name
    zoomed = create_augmentation(only("zoom", range=(1.25, 1.25)))(x, gen(0))
    # Zooming in by 1.25 grows the head's area by about 1.25^2.
    assert float((zoomed > 0.1).sum()) / float((x > 0.1).sum()) == pytest.approx(1.5625, rel=0.08)


def test_shift_translates() -> None:
    x = phantom()
    y = create_augmentation(only("shift", fraction=0.1))(x, gen(4))
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")

    def centroid(img: torch.Tensor) -> tuple[float, float]:
        w = img[0]
        return float((w * yy).sum() / w.sum()), float((w * xx).sum() / w.sum())

    (y0, x0), (y1, x1) = centroid(x), centroid(y)
    assert 0.5 < max(abs(y1 - y0), abs(x1 - x0)) <= 6.5 + 0.5  # at most 10% of 64 px per axis


def test_gaussian_noise_has_the_configured_std() -> None:
    x = torch.full((1, 96, 96), 0.5)
    y = create_augmentation(only("noise", std=0.05))(x, gen(1))
    assert float((y - x).std()) == pytest.approx(0.05, rel=0.1)
    assert abs(float((y - x).mean())) < 0.005


def test_bias_field_is_multiplicative_and_smooth() -> None:
    x = phantom() * 0.6 + 0.1  # no zero pixels, headroom below 1 so nothing is clipped
    y = create_augmentation(only("bias_field", coeff_range=(-0.3, 0.3)))(x, gen(3))
    ratio = (y / x)[0].double().numpy()
    assert ratio.std() > 0.01  # it does change the image
    # Multiplicative and smooth: log(y / x) is a cubic polynomial in (row, column), even
    # across the marker edge and the head boundary where x itself jumps.
    coords = np.linspace(-1, 1, ratio.shape[0])
    rows, cols = np.meshgrid(coords, coords, indexing="ij")
    basis = np.polynomial.legendre.legvander2d(rows.ravel(), cols.ravel(), [3, 3])
    log_ratio = np.log(ratio).ravel()
    coef, *_ = np.linalg.lstsq(basis, log_ratio, rcond=None)
    assert np.abs(basis @ coef - log_ratio).max() < 1e-4
    assert float((x[0, :, 1:] - x[0, :, :-1]).abs().max()) > 0.2


def test_gibbs_ringing_oscillates_near_edges() -> None:
    x = torch.zeros(1, 64, 64)
    x[:, 16:48, 16:48] = 0.8
    y = create_augmentation(only("gibbs", alpha_range=(0.6, 0.6)))(x, gen(0))
    inside = y[0, 20:44, 20:44]
    # Truncating k-space leaves ripples inside the flat square and blurs its edges.
    assert float(inside.std()) > 0.005
    assert 0.0 < float(y[0, 32, 16]) < 0.8


def test_rician_noise_raises_the_dark_background() -> None:
    x = phantom()
    background = x[0] == 0
    y = create_augmentation(only("rician", sigma=0.05))(x, gen(6))
    # The magnitude of complex noise is positive: the dark background's mean rises to about
    # sigma * sqrt(pi / 2), unlike zero-mean Gaussian noise.
    mean_bg = float(y[0][background].mean())
    assert mean_bg == pytest.approx(0.05 * np.sqrt(np.pi / 2), rel=0.15)


def test_config_from_dotted_overrides_and_errors_name_the_key() -> None:
    cfg = load_config(
        AugmentConfig,
        overrides=["rotation.enabled=true", "rotation.degrees=15", "gibbs.alpha_range=[0.1,0.3]"],
    )
    assert cfg.rotation.degrees == 15.0 and cfg.gibbs.alpha_range == (0.1, 0.3)
    bad = {
        "hflip.p=1.5": "hflip.p",
        "zoom.range=[1.2,0.9]": "zoom.range",
        "zoom.range=[-0.5,1.0]": "zoom.range",
        "noise.std=-0.1": "noise.std",
        "rician.sigma=-1": "rician.sigma",
        "gibbs.alpha_range=[0.5,1.5]": "gibbs.alpha_range",
        "shift.fraction=0.9": "shift.fraction",
        "bias_field.coeff_range=[0.3,-0.3]": "bias_field.coeff_range",
    }
    for override, key in bad.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(AugmentConfig, overrides=[override])


def test_defaults_are_the_papers() -> None:
    cfg = AugmentConfig()
    on = {n for n in NAMES if getattr(cfg, n).enabled}
    assert on == {"rotation", "hflip", "vflip", "zoom", "shift", "noise"}
    cfg.check()
