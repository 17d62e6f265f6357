"""Task-driven SR (input kind ``tsr``): the SR run's network fine-tuned with the classifier.

Real tiny runs on a real shard set: an SR run trains a few steps, a tsr run starts from it,
trains both parts, and ``trainer evaluate`` scores it over the whole test split. Plus the
refusals (missing or unfitting SR run, predict/export) and the pipeline's stage graph.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from helpers import TINY_SGD_RUN, make_shard_set

from srmri.config import ConfigError
from trainer.checkpoint import resolve_checkpoint
from trainer.config import load_train_config
from trainer.experiment.pipeline import load_pipeline_config, plan_pipeline
from trainer.input_kind import input_channels, needs_sr, needs_sr_stage, path_safe, trains_sr
from trainer.loop import evaluate, fit
from trainer.rundir import eval_dir_of, predictions_path
from trainer.task import create_task
from trainer.tsr_task import TSRModel, TSRTask, TSRTransform, sr_init_weights
from trainer.weights import load_fp32_weights

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = {"train": [10, 6], "val": [5, 4], "test": [3, 2, 4]}
TEST_SAMPLES = 9


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tsr") / "data"
    make_shard_set(root, LAYOUT, size=32)
    return root


@pytest.fixture(scope="module")
def sr_run(shard_root: Path) -> Path:
    """A tiny trained SR run (x2 tiny EDSR, 3 steps) to start tsr runs from."""
    cfg = load_train_config(
        ROOT / "configs" / "sr-debug.yaml",
        [
            f"data.root={shard_root}",
            f"out_dir={shard_root.parent / 'runs'}",
            "name=sr",
            "train.epochs=1",
            "train.max_steps_per_epoch=3",
        ],
    )
    return Path(fit(cfg)["run_dir"])


def _tsr_config(data: Path, out: Path, sr_init: Path, *extra: str):
    return load_train_config(
        ROOT / "configs" / "debug.yaml",
        [
            *TINY_SGD_RUN,
            f"data.root={data}",
            "data.inputs=tsr",
            "data.degrade.method=kspace",  # sr-debug.yaml's degradation (its scale: sr.scale)
            f"model.sr_init={sr_init}",
            "sr.arch=edsr",
            "sr.preset=tiny",
            "sr.scale=2",
            f"out_dir={out}",
            "name=tsr",
            *extra,
        ],
    )


def test_the_kind_reads_the_sr_run_not_the_enhanced_set() -> None:
    assert trains_sr("tsr") and needs_sr_stage("tsr") and not needs_sr("tsr")
    assert input_channels("tsr") == ("lr",) and path_safe("tsr") == "tsr"
    assert not any(trains_sr(k) for k in ("hr", "lr", "sr", "lr+sr", "lr|sr"))
    assert needs_sr_stage("sr") and not needs_sr_stage("lr")


def test_the_transform_gives_the_small_lr_image_and_its_hr_target() -> None:
    from shards.degrade import DegradeConfig
    from trainer.inputs import InputTransform

    cfg = DegradeConfig(scale=2, noise_sigma=0.02)
    hr = torch.rand(1, 33, 32)  # an odd side: the target is cut to a multiple of the scale

    def sample(epoch: int) -> dict:
        return {"key": "k", "digest": "d", "image": hr.clone(), "epoch": epoch}

    out = TSRTransform(cfg, 0, train=False)(sample(3))
    assert out["image"].shape == (1, 16, 16) and out["target"].shape == (1, 32, 32)
    assert torch.equal(out["target"], hr[..., :32, :32])
    again = TSRTransform(cfg, 0, train=False)(sample(7))
    assert torch.equal(out["image"], again["image"])  # evaluation: the same LR image per key
    train = TSRTransform(cfg, 0, train=True)
    assert not torch.equal(train(sample(0))["image"], train(sample(1))["image"])
    with pytest.raises(ValueError, match="TSRTransform"):
        InputTransform("tsr", cfg, "bicubic", 0, train=False)


def test_a_tsr_run_trains_both_parts_from_the_sr_run_and_evaluates(
    shard_root: Path, sr_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _tsr_config(shard_root, tmp_path, sr_run)
    built: dict[str, dict[str, torch.Tensor]] = {}
    original = TSRTask.build_model

    def spy(self: TSRTask, pretrained: bool = True) -> torch.nn.Module:
        model = original(self, pretrained)
        built["init"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return model

    monkeypatch.setattr(TSRTask, "build_model", spy)
    summary = fit(cfg)
    init = built["init"]
    # The SR part starts from the SR run's (best) weights, exactly.
    sr_weights = load_fp32_weights(resolve_checkpoint(sr_run))
    assert set(sr_weights) == {k.removeprefix("sr.") for k in init if k.startswith("sr.")}
    assert all(torch.equal(init[f"sr.{k}"], v) for k, v in sr_weights.items())
    # Both parts trained.
    run = Path(summary["run_dir"])
    trained = load_fp32_weights(resolve_checkpoint(run))
    assert set(trained) == set(init)
    for part in ("sr.", "classifier."):
        moved = [k for k in init if k.startswith(part) and not torch.equal(init[k], trained[k])]
        assert moved, f"no {part} weight changed"
    assert summary["steps"] == 2 and "sr_l1" in summary["final"]
    # trainer evaluate rebuilds it from the saved config alone: the SR run may be gone.
    monkeypatch.setattr(TSRTask, "build_model", original)
    results = evaluate(run, "test", overrides=("model.sr_init=/nonexistent/sr-run",))
    assert 0.0 <= results["balanced_accuracy"] <= 1.0 and results["sr_l1"] > 0
    rows = pq.read_table(predictions_path(eval_dir_of(run, "test"), "test")).num_rows
    assert rows == TEST_SAMPLES
    # The report's Grad-CAM figure skips it (its model has no top-level layer4), not fails.
    from trainer.experiment.gradcam import gradcam_png

    assert gradcam_png(run, shard_root, tmp_path / "cam.png") is None


def _one_step(cfg, batch: dict) -> dict[str, torch.Tensor]:
    """The SR part's weights after one plain SGD step on ``batch`` from a fixed start."""
    task = create_task(cfg, ["a", "b"], [5, 5])
    torch.manual_seed(0)
    model = task.build_model()
    backend = SimpleNamespace(model=model, to_input=lambda x: x, device=torch.device("cpu"))
    loss, n = task.train_loss(backend, batch)  # type: ignore[arg-type]
    assert n == batch["label"].shape[0]
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    return {k: v.detach().clone() for k, v in model.sr.state_dict().items()}


def test_the_reconstruction_weight_changes_the_sr_update(
    shard_root: Path, sr_run: Path, tmp_path: Path
) -> None:
    gen = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.rand(4, 1, 16, 16, generator=gen),
        "target": torch.rand(4, 1, 32, 32, generator=gen),
        "label": torch.tensor([0, 1, 0, 1]),
    }
    off = _one_step(_tsr_config(shard_root, tmp_path, sr_run, "train.recon_weight=0"), batch)
    on = _one_step(_tsr_config(shard_root, tmp_path, sr_run, "train.recon_weight=0.1"), batch)
    assert any(not torch.equal(off[k], on[k]) for k in off)
    # The loss is exactly CE + weight x L1 of the SR output against the HR target.
    cfg = _tsr_config(shard_root, tmp_path, sr_run, "train.recon_weight=0.5")
    task = create_task(cfg, ["a", "b"], [5, 5])
    model = task.build_model().eval()
    backend = SimpleNamespace(model=model, to_input=lambda x: x, device=torch.device("cpu"))
    loss, _ = task.train_loss(backend, batch)  # type: ignore[arg-type]
    logits, sr = model(batch["image"], return_sr=True)
    ce = torch.nn.functional.cross_entropy(logits, batch["label"])
    l1 = torch.nn.functional.l1_loss(sr, batch["target"])
    assert torch.allclose(loss, ce + 0.5 * l1)


def test_the_config_keys_are_checked(shard_root: Path, sr_run: Path, tmp_path: Path) -> None:
    assert _tsr_config(shard_root, tmp_path, sr_run).train.recon_weight == 0.1  # the default
    with pytest.raises(ConfigError, match=r"model\.sr_init"):
        _tsr_config(shard_root, tmp_path, sr_run, "model.sr_init=")
    with pytest.raises(ConfigError, match=r"model\.sr_init"):
        _tsr_config(shard_root, tmp_path, sr_run, "data.inputs=lr")
    for bad in ("-0.1", "nan", "inf"):
        with pytest.raises(ConfigError, match=r"train\.recon_weight"):
            _tsr_config(shard_root, tmp_path, sr_run, f"train.recon_weight={bad}")


def test_a_missing_or_unfitting_sr_run_is_refused(
    shard_root: Path, sr_run: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-run"
    with pytest.raises(FileNotFoundError, match=rf"model\.sr_init: {missing}"):
        sr_init_weights(_tsr_config(shard_root, tmp_path, missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"model\.sr_init: {empty}"):
        sr_init_weights(_tsr_config(shard_root, tmp_path, empty))
    # Another network, another degradation: each differing key is named, with the folder.
    for extra, key in (("sr.preset=full", "sr.preset"), ("data.degrade.method=bicubic", "data")):
        with pytest.raises(ValueError, match=rf"model\.sr_init: {sr_run}.*{key}"):
            sr_init_weights(_tsr_config(shard_root, tmp_path, sr_run, extra))
    # Only the fields that shape SR training may differ.
    sr_init_weights(_tsr_config(shard_root, tmp_path, sr_run, "sr.patch_size=64"))


def test_a_classifier_run_is_not_an_sr_run(shard_root: Path, sr_run: Path, tmp_path: Path) -> None:
    cls = load_train_config(
        ROOT / "configs" / "debug.yaml",
        [*TINY_SGD_RUN, f"data.root={shard_root}", f"out_dir={tmp_path}", "name=cls"],
    )
    run = Path(fit(cls)["run_dir"])
    with pytest.raises(ValueError, match=rf"model\.sr_init: {run}.*not an SR one"):
        sr_init_weights(_tsr_config(shard_root, tmp_path, run))


def test_predict_and_export_refuse_a_tsr_model(
    shard_root: Path, sr_run: Path, tmp_path: Path
) -> None:
    from trainer.export import export_checkpoint
    from trainer.inference import classifier_from_checkpoint

    cfg = _tsr_config(shard_root, tmp_path, sr_run, "train.max_steps_per_epoch=1")
    run = Path(fit(cfg)["run_dir"])
    with pytest.raises(ValueError, match=r"trainer predict does not take inputs=tsr"):
        classifier_from_checkpoint(run)
    with pytest.raises(ValueError, match=r"trainer export does not take inputs=tsr"):
        export_checkpoint(run, tmp_path / "folder")
    assert not (tmp_path / "folder").exists()


def test_the_model_outputs_logits_and_its_sr_images() -> None:
    from trainer.srnet import SRConfig, create_sr_model

    sr = create_sr_model(SRConfig(preset="tiny", scale=2))
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 3))
    model = TSRModel(sr, copy.deepcopy(classifier))
    x = torch.rand(2, 1, 16, 16)
    logits, up = model(x, return_sr=True)
    assert logits.shape == (2, 3) and up.shape == (2, 1, 32, 32)
    assert torch.equal(model(x), logits)


def test_the_plan_runs_tsr_after_the_sr_stage_without_enhance(tmp_path: Path) -> None:
    smoke = str(ROOT / "configs" / "pipeline-smoke.yaml")
    cfg = load_pipeline_config(smoke, [f"out_dir={tmp_path}", "arms=[lr,tsr]", "seeds=[0]"])
    stages = {s.name: s for s in plan_pipeline(cfg, "set-a").stages}
    assert "sr" in stages and "enhance" not in stages  # no arm reads the enhanced set
    tsr = stages["classify/tsr-seed0"]
    assert set(tsr.upstream) == {"data", "sr"}
    assert tsr.upstream["sr"] == stages["sr"].fingerprint
    assert "sr" not in stages["classify/lr-seed0"].upstream
    assert set(stages["evaluate/tsr-seed0"].upstream) == {"data", "sr", "classify/tsr-seed0"}
    # With an sr arm too, enhance comes back, and tsr still does not wait for it.
    both = load_pipeline_config(smoke, [f"out_dir={tmp_path}", "arms=[lr,sr,tsr]", "seeds=[0]"])
    planned = {s.name: s for s in plan_pipeline(both, "set-a").stages}
    assert "enhance" in planned["classify/sr-seed0"].upstream
    assert "enhance" not in planned["classify/tsr-seed0"].upstream
    assert planned["classify/tsr-seed0"].fingerprint == tsr.fingerprint
    # model.sr_init names the SR run inside out_dir: a moved pipeline keeps its tsr stage
    # (the SR run's content is in the fingerprint as the sr stage's).
    moved = load_pipeline_config(smoke, [f"out_dir={tmp_path / 'moved'}", "arms=[lr,tsr]"])
    elsewhere = {s.name: s for s in plan_pipeline(moved, "set-a").stages}
    assert elsewhere["classify/tsr-seed0"].fingerprint == tsr.fingerprint
    # The SR stage's settings are part of the tsr arm's fingerprint, not of the lr arm's.
    sr = dataclasses.replace(cfg.sr, overrides=[*cfg.sr.overrides, "optim.lr=0.01"])
    changed = {
        s.name: s.fingerprint
        for s in plan_pipeline(dataclasses.replace(cfg, sr=sr), "set-a").stages
    }
    assert changed["classify/tsr-seed0"] != tsr.fingerprint
    assert changed["classify/lr-seed0"] == stages["classify/lr-seed0"].fingerprint
    # Its trainer config starts from the SR stage's run, with that run's network and LR images
    # (what sr_init_weights checks before training).
    from trainer.config import run_dir_of
    from trainer.experiment.plan import _arm_config, _degrade_overrides, _sr_config, _tsr_overrides

    sr_cfg = _sr_config(cfg, tmp_path, None)
    assert sr_cfg is not None
    extra = [*_degrade_overrides(sr_cfg), *_tsr_overrides(sr_cfg)]
    run_cfg = _arm_config(cfg, tmp_path, "tsr", 0, extra, None)
    assert run_cfg.model.sr_init == str(run_dir_of(sr_cfg)) and run_cfg.sr == sr_cfg.sr
    assert run_cfg.sr_degradation() == sr_cfg.sr_degradation()
    with pytest.raises(ConfigError, match=r"sr\.config"):
        plan_pipeline(dataclasses.replace(cfg, sr=dataclasses.replace(cfg.sr, config="")), "")
