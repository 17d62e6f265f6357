"""The ``lr|sr`` input kind: the LR image and its SR image as the two channels of one sample.

Checked at the transform (channel order, the same augmentation on both channels) and through a
real trainer run on a toy shard set with a stand-in SR set (another toy set of the same layout
and keys: what matters here is which stored image lands in which channel, not how it was made):
the network is built with two input channels, trains and evaluates, and the loader's batches
hold, for every key, the LR image of that key in channel 0 and that key's SR image in channel 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_SGD_RUN, make_shard_set

from shards.degrade import DegradeConfig, degrade, sample_generator, upsample_to
from shards.loader import create_loader
from trainer.augment import AugmentConfig, NoiseConfig, create_augmentation
from trainer.checkpoint import resolve_checkpoint
from trainer.config import load_train_config
from trainer.input_kind import INPUT_KINDS, input_channels, needs_sr, path_safe
from trainer.inputs import InputTransform
from trainer.loop import evaluate, fit
from trainer.rundir import eval_dir_of, eval_metrics_path
from trainer.task import ClassificationTask
from trainer.weights import load_fp32_weights

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug.yaml"
LAYOUT = {"train": [16], "val": [8], "test": [8]}
NOISE = DegradeConfig(scale=2, noise_sigma=0.02)  # the LR draw then depends on the epoch


def test_the_kind_is_listed_with_two_channels_and_its_own_path_name() -> None:
    assert "lr|sr" in INPUT_KINDS and needs_sr("lr|sr")
    assert input_channels("lr|sr") == ("lr", "sr")
    assert {k: len(input_channels(k)) for k in INPUT_KINDS if k != "lr|sr"} == {
        "hr": 1,
        "lr": 1,
        "sr": 1,
        "lr+sr": 1,
        "tsr": 1,  # the LR image; the model's own SR network upsamples it (test_tsr.py)
    }
    assert path_safe("lr|sr") == "lr-sr-2ch" and path_safe("lr+sr") == "lr-sr"
    assert len({path_safe(k) for k in INPUT_KINDS}) == len(INPUT_KINDS)  # no two runs collide
    with pytest.raises(ValueError, match=r"lr\|sr"):
        input_channels("sr|lr")


def _sample(hr: torch.Tensor, sr: torch.Tensor, epoch: int) -> dict:
    return {"key": "k", "digest": "d1", "image": hr.clone(), "epoch": epoch, "aligned": [sr]}


def test_channel_0_is_the_lr_input_and_channel_1_the_sr_image() -> None:
    hr, sr = torch.rand(1, 32, 32), torch.rand(1, 32, 32)
    for train in (False, True):
        both = InputTransform("lr|sr", NOISE, "bicubic", 0, train=train)(_sample(hr, sr, 3))
        lr = InputTransform("lr", NOISE, "bicubic", 0, train=train)(_sample(hr, sr, 3))
        assert both["image"].shape == (2, 32, 32) and "aligned" not in both
        assert "image2" not in both  # one sample per key, unlike lr+sr
        assert torch.equal(both["image"][:1], lr["image"])  # the lr arm's own LR draw
        assert torch.equal(both["image"][1:], sr)
    # Training draws a new LR image per epoch, as the lr arm does; the SR image is fixed.
    tr = InputTransform("lr|sr", NOISE, "bicubic", 0, train=True)
    a, b = tr(_sample(hr, sr, 0))["image"], tr(_sample(hr, sr, 1))["image"]
    assert not torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_both_channels_get_the_same_augmentation() -> None:
    """With the SR image equal to the LR one, any difference between the channels would be an
    augmentation applied differently: rotation, zoom, shift, flips and noise always apply."""
    cfg = AugmentConfig(noise=NoiseConfig(p=1.0))
    for part in (cfg.rotation, cfg.hflip, cfg.vflip, cfg.zoom, cfg.shift):
        part.p = 1.0
    augment = create_augmentation(cfg)
    hr = torch.rand(1, 32, 32)
    for epoch in (2, 5):
        lr = InputTransform("lr", NOISE, "bicubic", 0, train=True)(_sample(hr, hr, epoch))
        lr_aug = InputTransform("lr", NOISE, "bicubic", 0, train=True, augmentation=augment)
        want = lr_aug(_sample(hr, hr, epoch))["image"]
        stacked = InputTransform("lr|sr", NOISE, "bicubic", 0, train=True, augmentation=augment)
        got = stacked(_sample(hr, lr["image"], epoch))["image"]  # SR channel := the LR image
        assert not torch.equal(want, lr["image"])  # the augmentation did something
        assert torch.equal(got[0], got[1])  # one augmentation for both channels
        assert torch.equal(got[:1], want)  # ...the one the lr arm's image gets


# ----------------------------------------------------------------------- a real trainer run


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("two_channel")
    data, sr = root / "data", root / "sr"
    make_shard_set(data, LAYOUT, size=32, seed=0)
    make_shard_set(sr, LAYOUT, size=32, seed=1)  # the same keys, other pixels
    return data, sr


def _config(data: Path, sr: Path, out: Path, *extra: str):
    return load_train_config(
        DEBUG,
        [
            *TINY_SGD_RUN,
            f"data.root={data}",
            f"data.sr_root={sr}",
            "data.inputs=lr|sr",
            "data.degrade.noise_sigma=0.02",
            f"out_dir={out}",
            "name=two",
            *extra,
        ],
    )


def _stored(root: Path) -> dict[str, tuple[torch.Tensor, str]]:
    """Key -> (stored image, payload digest) of every train sample of a shard set."""
    loader = create_loader(root, "train", 4, mode="eval")
    return {
        key: (image, digest)
        for batch in loader
        for key, image, digest in zip(batch["key"], batch["image"], batch["digest"])
    }


def test_fit_builds_a_two_channel_model_trains_and_evaluates(
    sets: tuple[Path, Path], tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    data, sr = sets
    cfg = _config(data, sr, tmp_path)
    summary = fit(cfg)
    run = Path(summary["run_dir"])
    weights = load_fp32_weights(resolve_checkpoint(run))
    stem = next(v for v in weights.values() if v.ndim == 4)  # the first convolution
    assert stem.shape[1] == 2
    results = evaluate(run, "test")
    assert results["n"] == 8 and 0.0 <= results["accuracy"] <= 1.0
    scored = json.loads(eval_metrics_path(eval_dir_of(run, "test"), "test").read_text())
    assert scored["n"] == 8


# Flips always, every other augmentation off: each channel's expected pixels are then known.
FLIPS = (
    "augment.enabled=true",
    "augment.hflip.p=1.0",
    "augment.vflip.p=1.0",
    "augment.rotation.enabled=false",
    "augment.zoom.enabled=false",
    "augment.shift.enabled=false",
    "augment.noise.enabled=false",
)


@pytest.mark.parametrize("case", ["eval", "train", "train-flipped"])
def test_the_batch_holds_each_keys_lr_and_sr_images(
    sets: tuple[Path, Path], tmp_path: Path, case: str
) -> None:
    """The loader as the trainer builds it (task transform, aligned SR set), checked against
    the stored images: channel 0 is the key's HR image degraded (the epoch's draw in training,
    the fixed one in evaluation), channel 1 the key's image in the SR set, both flipped alike
    when the augmentation flips."""
    data, sr = sets
    train, flipped = case != "eval", case == "train-flipped"
    cfg = _config(data, sr, tmp_path, *(FLIPS if flipped else ()))
    task = ClassificationTask(cfg, ["glioma", "meningioma", "notumor", "pituitary"])
    assert task.aligned_roots() == [str(sr)]
    loader = create_loader(
        data,
        "train",
        4,
        mode="train" if train else "eval",
        seed=cfg.train.seed,
        transform=task.transform(train),
        aligned_roots=task.aligned_roots(),
    )
    epoch = 2 if train else -1
    if train:
        loader.set_epoch(epoch)
    hr, sr_images = _stored(data), _stored(sr)

    def seen_as(image: torch.Tensor) -> torch.Tensor:
        # An augmented image is clamped to [0, 1], as validation images are.
        return image.flip(-1).flip(-2).clamp(0, 1) if flipped else image

    seen = 0
    for batch in loader:
        assert batch["image"].shape[1:] == (2, 32, 32)
        for key, image in zip(batch["key"], batch["image"]):
            source, digest = hr[key]
            gen = sample_generator(cfg.train.seed, epoch, digest)
            small, _ = degrade(source, cfg.data.degrade, gen)
            want_lr = seen_as(upsample_to(small, (32, 32), cfg.data.upsample))
            torch.testing.assert_close(image[:1], want_lr, atol=1e-6, rtol=0)
            torch.testing.assert_close(image[1:], seen_as(sr_images[key][0]), atol=0, rtol=0)
            assert not torch.allclose(image[1:], seen_as(source))  # the SR set's pixels
            seen += 1
    assert seen == 16
