"""``sr.arch=rcan``: spandrel's RCAN trained, saved, reloaded, used by enhance and exported.

One tiny world, laid out as the pipeline lays it out (``OUT/data``, ``OUT/data-sr``,
``OUT/runs/sr``, ``OUT/runs/sr-seed0``): a toy shard set, a tiny RCAN SR run of two steps, the
set it enhances and a ``test_resnet`` classifier trained on that set for two steps and
evaluated on test. Each test follows the RCAN through one more place EDSR goes: the
checkpoint, enhance, the SR bundle and the exported model folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import TINY_SGD_RUN, make_shard_set

from shards.loader import create_loader
from shards.verify import verify
from srmri.config import ConfigError, config_from_dict
from trainer.checkpoint import resolve_checkpoint
from trainer.config import TrainConfig, load_train_config
from trainer.experiment.enhance import enhance_with_checkpoint
from trainer.inference import classifier_from_folder
from trainer.loop import evaluate, fit
from trainer.model_folder import read_model_folder
from trainer.sr_bundle import SRModel, enhance_batch, image_digests, weights_id
from trainer.sr_task import load_sr_checkpoint
from trainer.srnet import LibrarySRNet, SRConfig, count_parameters, create_sr_model

ROOT = Path(__file__).resolve().parent.parent
# The tiny RCAN (1 group x 2 blocks x 16 features) at the SR debug config's x2.
RCAN = ("sr.arch=rcan", "sr.preset=tiny")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(restore_threads: None) -> Iterator[None]:
    torch.set_num_threads(1)  # tiny convolutions: extra threads only contend on 2 cores
    yield


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``OUT`` with data, an RCAN SR run, its SR set and an evaluated ``sr`` classifier."""
    out = tmp_path_factory.mktemp("rcan") / "out"
    data, sr_data, runs = out / "data", out / "data-sr", out / "runs"
    make_shard_set(data, {"train": [16], "val": [8], "test": [8]}, size=32)
    sr_cfg = load_train_config(
        ROOT / "configs" / "sr-debug.yaml",
        [
            f"data.root={data}",
            f"out_dir={runs}",
            "name=sr",
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
            "sr.examples=0",
            *RCAN,
        ],
    )
    fit(sr_cfg)
    enhance_with_checkpoint(runs / "sr", data, sr_data, batch_size=8, device="cpu")
    cfg = load_train_config(
        ROOT / "configs" / "debug.yaml",
        [
            *TINY_SGD_RUN,
            "train.max_steps_per_epoch=2",
            f"data.root={data}",
            f"data.sr_root={sr_data}",
            "data.inputs=sr",
            f"out_dir={runs}",
            "name=sr-seed0",
        ],
    )
    fit(cfg)
    evaluate(runs / "sr-seed0", "test")
    return out


# ------------------------------------------------------------------ the network and its config


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_rcan_output_is_the_input_times_the_scale(scale: int) -> None:
    """Any LR size (odd ones too) comes out ``scale`` times larger, the input left unchanged."""
    net = create_sr_model(SRConfig(arch="rcan", preset="tiny", scale=scale)).eval()
    lr = torch.rand(2, 1, 7, 10)
    before = lr.clone()
    with torch.no_grad():
        sr = net(lr)
    assert sr.shape == (2, 1, 7 * scale, 10 * scale)
    assert torch.equal(lr, before)  # spandrel's forward scales its input in place
    assert isinstance(net, LibrarySRNet)
    # sizes: tiny is 1 group x 2 blocks x 16 features; full is the paper's (~15.4M at x2)
    assert count_parameters(net) < 40_000


def test_rcan_global_residual_adds_the_bicubic_input() -> None:
    torch.manual_seed(0)
    with_res = create_sr_model(SRConfig(arch="rcan", preset="tiny", scale=2)).eval()
    torch.manual_seed(0)
    plain = create_sr_model(SRConfig(arch="rcan", preset="tiny", scale=2, global_residual=False))
    lr = torch.rand(1, 1, 8, 8)
    bicubic = torch.nn.functional.interpolate(lr, scale_factor=2, mode="bicubic")
    with torch.no_grad():
        torch.testing.assert_close(with_res(lr), plain.eval()(lr) + bicubic)


def test_rcan_custom_sizes_are_the_config_fields() -> None:
    net = create_sr_model(
        SRConfig(arch="rcan", preset="custom", groups=3, blocks=2, features=24, reduction=8)
    )
    inner = net.net
    assert len(inner.body) == 3 + 1  # groups, then the body's closing conv
    assert len(inner.body[0].body) == 2 + 1  # blocks, then the group's closing conv
    assert inner.head[0].out_channels == 24 and inner.head[0].in_channels == 1
    assert inner.body[0].body[0].body[3].conv_du[0].out_channels == 24 // 8  # attention squeeze


def test_unknown_arch_names_the_key_and_suggests_the_nearest() -> None:
    with pytest.raises(ConfigError, match=r"sr\.arch: 'rcn' is not one of .*did you mean 'rcan'"):
        load_train_config(None, ["data.root=x", "task=sr", "sr.arch=rcn"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sr.reduction=32"], r"sr\.reduction: must be at most the 16 RCAN features, got 32"),
        (["sr.res_scale=0.1"], r"sr\.res_scale: RCAN's blocks take no residual scaling"),
        (["sr.preset=custom", "sr.groups=0"], r"sr\.groups: must be at least 1"),
        (["sr.groups=two"], r"sr\.groups: expected an integer"),
    ],
)
def test_rcan_size_keys_are_checked(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, ["data.root=x", "task=sr", *RCAN, *overrides])


def test_edsr_ignores_the_rcan_keys_and_stays_the_default() -> None:
    cfg = load_train_config(None, ["data.root=x", "task=sr"])
    assert cfg.sr.arch == "edsr"
    a = create_sr_model(SRConfig(preset="tiny"))
    b = create_sr_model(SRConfig(preset="tiny", groups=3, reduction=4))
    assert a.state_dict().keys() == b.state_dict().keys()


# --------------------------------------------------------------- train, save, reload, enhance


def test_rcan_checkpoint_reloads_weights_only_with_the_same_outputs(world: Path) -> None:
    run = world / "runs" / "sr"
    ckpt = resolve_checkpoint(run)
    assert ckpt.step == 2
    for path in sorted(ckpt.path.rglob("*.pt")):  # tensors and primitives only
        torch.load(path, map_location="cpu", weights_only=True)
    model, cfg, _ = load_sr_checkpoint(run, torch.device("cpu"))
    assert cfg.sr.arch == "rcan" and isinstance(model, LibrarySRNet)
    # The saved config.yaml alone rebuilds the same network; the weights fit it exactly.
    saved = config_from_dict(TrainConfig, yaml.safe_load((ckpt.path / "config.yaml").read_text()))
    rebuilt = create_sr_model(saved.sr)
    state = torch.load(ckpt.path / "module.pt", map_location="cpu", weights_only=True)
    rebuilt.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    lr = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(lr), model(lr))
    # ...and they are the trained weights: evaluating the checkpoint gives fit's last scores.
    final = json.loads((run / "metrics.json").read_text())["final"]
    again = evaluate(run, "val", out_dir=world / "rcan-val")
    assert again["sr_n"] == final["sr_n"] == 8
    assert again["sr_psnr"] == pytest.approx(final["sr_psnr"], abs=1e-5)
    assert again["sr_psnr"] != pytest.approx(again["bicubic_psnr"], abs=1e-3)  # not bicubic


def test_enhance_with_rcan_writes_the_model_applied_to_each_lr_image(world: Path) -> None:
    sr_data = world / "data-sr"
    assert verify(sr_data) == []
    index = json.loads((sr_data / "index.json").read_text())
    model, cfg, _ = load_sr_checkpoint(world / "runs" / "sr", torch.device("cpu"))
    step = resolve_checkpoint(world / "runs" / "sr").step
    assert index["config"]["model"] == weights_id(model, step)
    sr = SRModel(model, cfg.sr, weights_id(model, step), cfg.sr_degradation(), cfg.train.seed)
    loader = create_loader(world / "data", "test", 8, mode="eval", aligned_roots=[sr_data])
    batch = next(iter(loader))
    want = enhance_batch(sr, batch["image"], image_digests(batch["image"]))
    torch.testing.assert_close(batch["aligned"][0], want, atol=1.0 / 65535, rtol=0)


def test_model_folder_bundles_and_rebuilds_the_rcan(world: Path) -> None:
    """The export finds the RCAN behind the SR set; the folder alone rebuilds and runs it."""
    from trainer.__main__ import main

    folder = world.parent / "exported"
    run = world / "runs" / "sr-seed0"
    assert main(["export", "--checkpoint", str(run), "--out", str(folder)]) == 0
    spec = read_model_folder(folder)
    assert spec["sr"]["arch"]["arch"] == "rcan" and spec["sr"]["arch"]["preset"] == "tiny"
    trained, cfg, _ = load_sr_checkpoint(world / "runs" / "sr", torch.device("cpu"))
    clf = classifier_from_folder(folder)
    assert clf.sr is not None and isinstance(clf.sr.model, LibrarySRNet)
    assert clf.sr.sr == cfg.sr
    want_state, got_state = trained.state_dict(), clf.sr.model.state_dict()
    assert want_state.keys() == got_state.keys()
    assert all(torch.equal(want_state[k], got_state[k]) for k in want_state)
    step = resolve_checkpoint(world / "runs" / "sr").step
    assert weights_id(clf.sr.model, step) == spec["sr"]["model_id"]
    # The folder's model input (RCAN included) reproduces the test evaluation's predictions.
    table = pq.read_table(run / "eval-test" / "predictions_test.parquet").to_pydict()
    want = {k: [table[f"prob_{c}"][i] for c in clf.classes] for i, k in enumerate(table["key"])}
    seen = 0
    with torch.no_grad():
        for batch in create_loader(world / "data", "test", 4, mode="eval"):
            probs = clf.model(clf.model_input(batch["image"])).softmax(1)
            for key, p, valid in zip(batch["key"], probs, batch["valid"]):
                if bool(valid):
                    np.testing.assert_allclose(p.numpy(), want[key], atol=1e-4, err_msg=key)
                    seen += 1
    assert seen == 8
