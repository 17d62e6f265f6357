"""One test per training switch that no other test exercises, each against a real run.

Every switch is checked through something a run leaves behind (``metrics.json``,
``metrics.csv``, ``checkpoints/``, ``best.json``, exported weights, ``evaluate``'s results) or a
public torch hook, and every test compares with a run that differs only in that switch, so a
switch the engine ignored would fail its test:

* early stopping, ``checkpoint.keep_best`` / ``best.json``, SGD (momentum, Nesterov), the
  plateau schedule;
* DeepSpeed ZeRO stage 0 (against ZeRO 1 and DDP) and the ``zero_to_fp32`` export of a ZeRO-2
  bf16 run;
* a ResNet50 initialised from a local 3-channel weights file;
* ``data.inputs=lr|sr`` (LR and SR stacked as two channels) against ``lr`` and ``sr``;
* ``sr.arch=rcan`` (spandrel's RCAN) against the default EDSR of an SR run;
* DDP with bf16 autocast on 2 gloo processes, fp16 with a grad scaler, channels-last and
  ``torch.compile``.

Runs use timm's ``test_resnet`` (or ResNet50 where it is the point) on 32 px slices for a few
steps, single-threaded, in this process where possible, so the file stays within a few minutes
on two shared cores. The compile test uses dynamo's ``eager`` backend unless
``SRMRI_TEST_COMPILE_BACKEND`` names another (inductor takes minutes on such a machine).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TINY_SGD_RUN, make_shard_set, run_distributed

from trainer.config import load_train_config
from trainer.input_kind import path_safe
from trainer.loop import evaluate, fit

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug.yaml"

# The reference run every comparison starts from: plain SGD with a constant LR, fp32, DDP
# backend in one process. Each test changes only its switch.
BASE = (*TINY_SGD_RUN, "train.resume=never", "optim.momentum=0.9", "optim.nesterov=true")
# A validation "metric" that never changes (the val sample count): it improves once, at epoch 0,
# and never again, which makes early stopping and the plateau schedule exactly predictable.
CONSTANT_METRIC = ("train.early_stop.metric=n", "train.early_stop.mode=max")


# ----------------------------------------------------------------------------------- helpers


TOY_LAYOUT = {"train": [24, 20, 20], "val": [7, 6], "test": [5, 4]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("switches") / "toy"
    make_shard_set(root, TOY_LAYOUT, size=32)
    return root


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: extra threads only contend on 2 cores
    yield
    torch.set_num_threads(threads)


def _no_figures() -> None:
    """Skip drawing the PNGs (most of a tiny epoch's time); no switch here is about them."""
    import trainer.plots

    for name in ("plot_curves", "plot_confusion"):
        if hasattr(trainer.plots, name):
            setattr(trainer.plots, name, lambda *args, **kwargs: None)


@pytest.fixture(scope="module", autouse=True)
def _without_figures() -> Iterator[None]:
    import trainer.plots

    with pytest.MonkeyPatch.context() as mp:
        for name in ("plot_curves", "plot_confusion"):
            mp.setattr(trainer.plots, name, lambda *args, **kwargs: None, raising=False)
        yield


def _config(data: Path, out: Path, *overrides: str):
    return load_train_config(DEBUG, [f"data.root={data}", f"out_dir={out}", *BASE, *overrides])


def _fit(data: Path, out: Path, name: str, *overrides: str) -> tuple[dict[str, Any], Path]:
    summary = fit(_config(data, out, f"name={name}", *overrides))
    run = Path(summary["run_dir"])
    assert run == out / name
    return summary, run


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _checkpoints(run: Path) -> list[Path]:
    """The run's complete checkpoint directories, oldest first."""
    return sorted(p.parent for p in (run / "checkpoints").glob("step-*/complete.json"))


def _export(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    """What ``python -m trainer export --no-ema`` writes, read back.

    Called as a function: the CLI's ``main`` also leaves the process group, and a new group
    per export would only cost time.
    """
    from safetensors.torch import load_file

    from trainer.export import export_checkpoint

    return load_file(str(export_checkpoint(checkpoint, out, use_ema=False) / "model.safetensors"))


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return _export(_checkpoints(run)[-1], run.parent / f"{run.name}.safetensors")


def _params(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trainable tensors only (no BatchNorm statistics)."""
    return {
        k: v for k, v in state.items() if "running_" not in k and "num_batches_tracked" not in k
    }


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in _params(a))


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=1e-4), (
            k,
            float((a[k].float() - b[k].float()).abs().max()),
        )


def _find(obj: Any, pred: Callable[[dict], bool]) -> dict | None:
    """The first dict inside ``obj`` (nested dicts/lists) that ``pred`` accepts."""
    if isinstance(obj, dict):
        if pred(obj):
            return obj
        children: Any = obj.values()
    elif isinstance(obj, list | tuple):
        children = obj
    else:
        return None
    for child in children:
        found = _find(child, pred)
        if found is not None:
            return found
    return None


def _saved(checkpoint: Path, pred: Callable[[dict], bool]) -> dict | None:
    """Search every torch file of a (DDP) checkpoint for a dict ``pred`` accepts.

    The file layout is the engine's business; what it saved is what this looks at.
    """
    for path in sorted(checkpoint.rglob("*.pt")):
        found = _find(torch.load(path, map_location="cpu", weights_only=True), pred)
        if found is not None:
            return found
    return None


def _is_optimizer_state(d: dict) -> bool:
    return "param_groups" in d and "state" in d


def _is_scaler_state(d: dict) -> bool:
    return "scale" in d and "growth_factor" in d


@pytest.fixture(scope="module")
def baseline(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("baseline")
    summary, run = _fit(shards, out, "base")
    return {"summary": summary, "run": run, "weights": _final_weights(run)}


# ------------------------------------------------------------------- early stopping, keep_best


def test_early_stop_stops_after_patience_epochs_without_improvement(
    shards: Path, tmp_path: Path
) -> None:
    steps = ("train.epochs=3", "train.max_steps_per_epoch=1")
    # The metric improves at epoch 0 only: patience 1 stops after epoch 1, i.e. 2 epochs run.
    summary, run = _fit(
        shards, tmp_path, "stop", *steps, *CONSTANT_METRIC, "train.early_stop.patience=1"
    )
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["epochs_run"] == summary["epochs_run"] == 2
    assert saved["steps"] == 2 and saved["metric"] == "n" and saved["best_epoch"] == 0
    assert [int(r["epoch"]) for r in _history(run)] == [0, 1]
    # Off (patience 0): the same never-improving metric and every epoch runs.
    _, full = _fit(shards, tmp_path, "full", *steps, *CONSTANT_METRIC)
    assert json.loads((full / "metrics.json").read_text())["epochs_run"] == 3
    assert [int(r["epoch"]) for r in _history(full)] == [0, 1, 2]


def test_early_stop_unknown_metric_is_an_error(shards: Path, tmp_path: Path) -> None:
    # A typo used to read as nan, which never improves: the run stopped after `patience`
    # epochs, ranked every checkpoint by nan and never drove the plateau schedule.
    typo = ("train.early_stop.metric=balanced_acuracy", "train.early_stop.patience=1")
    with pytest.raises(ValueError, match="balanced_acuracy") as caught:
        _fit(shards, tmp_path, "typo", "train.epochs=2", "train.max_steps_per_epoch=1", *typo)
    message = str(caught.value)
    assert "train.early_stop.metric" in message and "'balanced_accuracy'" in message
    # It fails at the first validation: no epoch is recorded, no checkpoint written.
    assert not (tmp_path / "typo" / "metrics.csv").exists()
    assert not _checkpoints(tmp_path / "typo")


def test_keep_best_keeps_the_best_checkpoint_past_pruning(shards: Path, tmp_path: Path) -> None:
    # Rank by validation loss (lowest best): in these few-step epochs it rises after epoch 0,
    # so the best checkpoint is not the newest and keep_last=1 alone would prune it.
    ranked = (
        "train.epochs=2",
        "train.max_steps_per_epoch=2",
        "train.early_stop.metric=loss",
        "train.early_stop.mode=min",
        "checkpoint.keep_last=1",
    )
    _, run = _fit(shards, tmp_path, "best", *ranked, "checkpoint.keep_best=1")
    rows = _history(run)
    losses = [float(r["val_loss"]) for r in rows]
    # The newest of the lowest values wins ties, as in pruning.
    best_epoch = min(range(len(rows)), key=lambda i: (losses[i], -i))
    assert best_epoch != len(rows) - 1, f"precondition: the best epoch is not the last {losses}"
    best_name = f"step-{int(rows[best_epoch]['step']):08d}"
    last_name = f"step-{int(rows[-1]['step']):08d}"
    assert [p.name for p in _checkpoints(run)] == sorted([best_name, last_name])
    record = json.loads((run / "checkpoints" / "best.json").read_text())["best"]
    assert len(record) == 1 and record[0]["name"] == best_name
    assert record[0]["epoch"] == best_epoch
    assert record[0]["metric"] == pytest.approx(losses[best_epoch], rel=1e-6)
    # A run directory resolves to its best checkpoint: evaluate reads that one.
    results = evaluate(run, "test", out_dir=tmp_path / "eval")
    assert results["n"] == 9
    written = json.loads((tmp_path / "eval" / "metrics_test.json").read_text())
    assert Path(written["checkpoint"]).name == best_name

    # keep_best=0: only the newest survives and no best is recorded.
    _, none = _fit(shards, tmp_path, "nobest", *ranked, "checkpoint.keep_best=0")
    assert [p.name for p in _checkpoints(none)] == [last_name]
    assert not (none / "checkpoints" / "best.json").exists()


# ----------------------------------------------------------------------- optimizer, schedule


def test_sgd_momentum_and_nesterov_are_the_optimizer(
    shards: Path, tmp_path: Path, baseline: dict[str, Any]
) -> None:
    _, adamw = _fit(shards, tmp_path, "adamw", "optim.name=adamw", "optim.lr=0.003")
    _, plain = _fit(shards, tmp_path, "plain", "optim.momentum=0.5", "optim.nesterov=false")

    nesterov = _saved(_checkpoints(baseline["run"])[-1], _is_optimizer_state)
    heavy = _saved(_checkpoints(plain)[-1], _is_optimizer_state)
    adam = _saved(_checkpoints(adamw)[-1], _is_optimizer_state)
    assert nesterov and heavy and adam, "no optimizer state in the checkpoints"
    for state, momentum, nest in ((nesterov, 0.9, True), (heavy, 0.5, False)):
        for group in state["param_groups"]:
            assert group["momentum"] == momentum and group["nesterov"] is nest, group
            assert "betas" not in group
        assert state["state"] and all("momentum_buffer" in s for s in state["state"].values())
    assert all("exp_avg" in s and "momentum_buffer" not in s for s in adam["state"].values())

    # Same seed, same data: each optimizer leaves other weights.
    w_nesterov, w_heavy, w_adamw = baseline["weights"], _final_weights(plain), _final_weights(adamw)
    assert _max_diff(w_nesterov, w_heavy) > 1e-4
    assert _max_diff(w_nesterov, w_adamw) > 1e-4


def _plateau_oracle(values: list[float], mode: str, lr: float, patience: int, factor: float):
    """ReduceLROnPlateau's rule by hand (relative threshold 1e-4, no cooldown)."""
    best, bad, out = None, 0, []
    for v in values:
        better = best is None or (v > best * (1 + 1e-4) if mode == "max" else v < best * (1 - 1e-4))
        best, bad = (v, 0) if better else (best, bad + 1)
        if bad > patience:
            lr, bad = lr * factor, 0
        out.append(lr)
    return out


def test_plateau_lowers_the_lr_by_factor_after_patience(shards: Path, tmp_path: Path) -> None:
    steps = (
        "train.epochs=3",
        "train.max_steps_per_epoch=1",
        "sched.name=plateau",
        "sched.factor=0.5",
    )
    # Never improves after epoch 0: with patience 1 the LR halves after 2 epochs without
    # improvement (torch's ReduceLROnPlateau counts "more than patience").
    _, run = _fit(shards, tmp_path, "flat", *steps, *CONSTANT_METRIC, "sched.patience=1")
    lrs = [float(r["lr"]) for r in _history(run)]
    assert lrs == pytest.approx([0.05, 0.05, 0.025], rel=1e-9), lrs

    # A real metric that improves, patience 0: the LR stays while it improves and halves at
    # each epoch it does not. (Validation loss rises over these 1-step epochs, so "max" is
    # the improving direction here; the hand-written rule is the oracle either way.)
    _, real = _fit(
        shards,
        tmp_path,
        "loss",
        *steps,
        "train.early_stop.metric=loss",
        "train.early_stop.mode=max",
        "sched.patience=0",
    )
    rows = _history(real)
    losses = [float(r["val_loss"]) for r in rows]
    want = _plateau_oracle(losses, "max", 0.05, 0, 0.5)
    assert [float(r["lr"]) for r in rows] == pytest.approx(want, rel=1e-9), (losses, want)
    assert want[1] == 0.05, f"precondition: the metric improved at epoch 1 {losses}"


# ------------------------------------------------------------------------------- DeepSpeed


def _needs_deepspeed() -> None:
    """Skip unless DeepSpeed is installed; a one-process run needs nothing else from a test."""
    pytest.importorskip("deepspeed")


def _predictions(run: Path) -> dict[str, list[float]]:
    import pyarrow.parquet as pq

    table = pq.read_table(run / "predictions.parquet").to_pydict()
    probs = sorted(k for k in table if k.startswith("prob_"))
    return {key: [table[p][i] for p in probs] for i, key in enumerate(table["key"])}


def _assert_same_run(a: Path, b: Path, rel: float = 1e-4) -> None:
    """Same training (losses) and same final model (every validation probability)."""
    for ra, rb in zip(_history(a), _history(b), strict=True):
        for key in ("train_loss", "val_loss"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=rel), (a, b, key)
    pa, pb = _predictions(a), _predictions(b)
    assert pa.keys() == pb.keys() and len(pa) == 13
    for key in pa:
        assert pa[key] == pytest.approx(pb[key], abs=1e-5), key


@pytest.fixture(scope="module")
def zero0(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zero0")
    _needs_deepspeed()
    _, run = _fit(shards, out, "zero0", "backend.name=deepspeed", "backend.zero_stage=0")
    return run


def test_deepspeed_runs_without_a_launcher(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # deepspeed.initialize asserts LOCAL_RANK is set; a plain one-process run has no launcher
    # to set it (and a Ray Tune trial removes it).
    _needs_deepspeed()
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    summary, _ = _fit(
        shards, tmp_path, "nolauncher", "backend.name=deepspeed", "train.max_steps_per_epoch=1"
    )
    assert summary["steps"] == 1


def test_deepspeed_fits_twice_in_one_process(shards: Path, tmp_path: Path) -> None:
    # DeepSpeed caches a clone of the world group; after cleanup() destroyed the group the
    # second fit failed with "Group ... is not registered".
    from srmri.distributed import cleanup

    _needs_deepspeed()
    once = ("backend.name=deepspeed", "train.max_steps_per_epoch=1")
    _fit(shards, tmp_path, "first", *once)
    cleanup()  # what the CLI and a Ray Tune trial do when a run ends
    summary, _ = _fit(shards, tmp_path, "second", *once)
    assert summary["steps"] == 1
    cleanup()
    summary, _ = _fit(shards, tmp_path, "third", *once, "backend.zero_stage=1")
    assert summary["steps"] == 1


def test_deepspeed_zero_stage_0_trains_like_zero_1_and_ddp(
    shards: Path, tmp_path: Path, baseline: dict[str, Any], zero0: Path
) -> None:
    _needs_deepspeed()
    _, zero1 = _fit(shards, tmp_path, "zero1", "backend.name=deepspeed", "backend.zero_stage=1")
    c0, c1 = _checkpoints(zero0)[-1], _checkpoints(zero1)[-1]
    # Stage 0 keeps the client optimizer whole (no ZeRO partitions); stage 1 partitions it.
    assert list(c0.rglob("*model_states.pt")) and not list(c0.rglob("*optim_states.pt"))
    assert list(c1.rglob("*optim_states.pt"))
    assert json.loads((zero0 / "metrics.json").read_text())["steps"] == 3
    # fp32 all three: the same losses and the same final model.
    _assert_same_run(zero0, zero1)
    _assert_same_run(zero0, baseline["run"])
    _assert_close(_final_weights(zero1), baseline["weights"], atol=1e-5)


def test_deepspeed_zero_stage_0_checkpoint_exports_and_evaluates(
    zero0: Path, tmp_path: Path, baseline: dict[str, Any]
) -> None:
    # zero_to_fp32 cannot read a stage-0 checkpoint (no param_shapes): module.pt is read.
    results = evaluate(zero0, "test", out_dir=tmp_path / "eval")
    assert results["n"] == 9 and (tmp_path / "eval" / "metrics_test.json").is_file()
    _assert_close(_final_weights(zero0), baseline["weights"], atol=1e-5)


def test_deepspeed_zero2_bf16_export_is_the_fp32_masters(
    shards: Path, tmp_path: Path, baseline: dict[str, Any]
) -> None:
    _needs_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    _, run = _fit(
        shards,
        tmp_path,
        "zero2",
        "backend.name=deepspeed",
        "backend.zero_stage=2",
        "train.precision=bf16",
    )
    ckpt = _checkpoints(run)[-1]
    exported = _export(ckpt, tmp_path / "zero2.safetensors")
    tag_dir = next(ckpt.rglob("*model_states.pt")).parent
    with contextlib.redirect_stdout(io.StringIO()):
        masters = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    params = {k for k, v in masters.items() if v.is_floating_point() and k in _params(masters)}
    assert len(params) > 10 and params <= exported.keys()
    for k in exported:
        assert exported[k].dtype == torch.float32, k
    for k in params:
        assert torch.equal(exported[k], masters[k].float()), k
    # A bf16 rounding of the weights would be exactly representable in bf16; the masters are not.
    biggest = max(params, key=lambda k: masters[k].numel())
    w = exported[biggest]
    off_grid = float((w.bfloat16().float() != w).float().mean())
    assert off_grid > 0.5, (biggest, off_grid)
    assert all(torch.isfinite(exported[k]).all() for k in params)
    # bf16 autocast was on: the run ends elsewhere than fp32 (ZeRO 0/1 in fp32 match DDP).
    assert _max_diff(exported, baseline["weights"]) > 1e-4


# ---------------------------------------------------------------------------- pretrained file


def test_pretrained_resnet50_from_a_local_3_channel_file(shards: Path, tmp_path: Path) -> None:
    import timm

    torch.manual_seed(123)
    imagenet = timm.create_model("resnet50", num_classes=1000).state_dict()  # 3-channel, 1000
    weights = tmp_path / "resnet50.pth"
    torch.save({"state_dict": imagenet}, weights)
    # One step at a negligible LR: what the run saved is what it started from.
    _, run = _fit(
        shards,
        tmp_path,
        "pre",
        "model.name=resnet50",
        f"model.pretrained_path={weights}",
        "train.max_steps_per_epoch=1",
        "optim.lr=1e-12",
        "optim.momentum=0",
        "optim.nesterov=false",
    )
    got = _params(_final_weights(run))
    assert imagenet["conv1.weight"].shape[1] == 3 and got["conv1.weight"].shape[1] == 1
    # timm's adapt_input_conv: one channel is the sum over the RGB filters.
    want = imagenet["conv1.weight"].sum(dim=1, keepdim=True)
    assert torch.allclose(got["conv1.weight"], want, atol=1e-6)
    # The 1000-class head does not fit 4 classes: dropped, a fresh 4-class head instead.
    assert got["fc.weight"].shape == (4, 2048) and got["fc.bias"].shape == (4,)
    rest = [k for k in got if k not in ("conv1.weight", "fc.weight", "fc.bias")]
    assert len(rest) > 100
    for k in rest:
        assert torch.allclose(got[k], imagenet[k], atol=1e-6), k


# ------------------------------------------------------------------------------ input kinds


def test_inputs_lr_sr_feeds_lr_and_sr_as_two_channels(shards: Path, tmp_path: Path) -> None:
    """``lr|sr`` is neither ``lr`` nor ``sr``: its first training step's stem input is the lr
    run's input stacked on the sr run's, and its first convolution takes two channels."""
    sr_set = tmp_path / "sr-set"
    make_shard_set(sr_set, TOY_LAYOUT, size=32, seed=1)  # same keys, other pixels: a stand-in
    first: dict[str, torch.Tensor] = {}
    kind = ""

    def record(module: torch.nn.Module, args: tuple) -> None:
        # The first convolution a run calls in training is the stem, on its first batch (the
        # batch order depends on the seed and the main set only: the same for every kind).
        if isinstance(module, torch.nn.Conv2d) and module.training and kind not in first:
            first[kind] = args[0].detach().clone()

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    runs = {}
    try:
        for kind in ("lr", "sr", "lr|sr"):
            extra = (f"data.inputs={kind}", f"data.sr_root={sr_set}", "train.max_steps_per_epoch=1")
            runs[kind] = _fit(shards, tmp_path, path_safe(kind), *extra)[1]
    finally:
        handle.remove()
    assert first["lr"].shape[1] == first["sr"].shape[1] == 1 and first["lr|sr"].shape[1] == 2
    assert not torch.equal(first["lr"], first["sr"])
    assert torch.equal(first["lr|sr"][:, :1], first["lr"])
    assert torch.equal(first["lr|sr"][:, 1:], first["sr"])
    # Read from the checkpoint: exporting needs a real SR set (its model is bundled), and
    # tests/test_model_folder.py exports an lr|sr model made behind one.
    from trainer.checkpoint import resolve_checkpoint
    from trainer.weights import load_fp32_weights

    stems = {k: load_fp32_weights(resolve_checkpoint(r))["conv1.0.weight"] for k, r in runs.items()}
    assert stems["lr"].shape[1] == stems["sr"].shape[1] == 1 and stems["lr|sr"].shape[1] == 2
    assert stems["lr|sr"].shape[0] == stems["lr"].shape[0]


# ----------------------------------------------------------------------------- SR architecture


def test_sr_arch_rcan_trains_spandrels_rcan_not_edsr(shards: Path, tmp_path: Path) -> None:
    """Two SR runs differing only in ``sr.arch``: the rcan run's checkpoint holds other
    parameters (channel attention, residual groups) than the edsr run's, and spandrel's own
    loader recognises them as its RCAN at the run's scale with one channel."""
    from spandrel import ModelLoader

    from trainer.checkpoint import resolve_checkpoint
    from trainer.srnet import SRConfig, count_parameters, create_sr_model
    from trainer.weights import load_fp32_weights

    states = {}
    for arch in ("edsr", "rcan"):
        cfg = load_train_config(
            ROOT / "configs" / "sr-debug.yaml",
            [
                f"data.root={shards}",
                f"out_dir={tmp_path}",
                f"name={arch}",
                "train.epochs=1",
                "train.max_steps_per_epoch=2",
                "sr.examples=0",
                "sr.preset=tiny",
                f"sr.arch={arch}",
            ],
        )
        summary = fit(cfg)
        assert summary["final"]["sr_n"] > 0
        states[arch] = load_fp32_weights(resolve_checkpoint(tmp_path / arch))
    edsr, rcan = states["edsr"], states["rcan"]
    assert not edsr.keys() & rcan.keys()
    assert any("conv_du" in k for k in rcan) and not any("conv_du" in k for k in edsr)
    sizes = {arch: sum(v.numel() for v in state.values()) for arch, state in states.items()}
    assert sizes == {"edsr": 21_185, "rcan": 23_603}  # the tiny presets at x2
    # The checkpoint is the network the factory builds (nothing but parameters in either).
    assert sizes["rcan"] == count_parameters(create_sr_model(SRConfig(arch="rcan", preset="tiny")))
    found = ModelLoader().load_from_state_dict({k.removeprefix("net."): v for k, v in rcan.items()})
    assert (found.architecture.id, found.scale, found.input_channels) == ("RCAN", 2, 1)


# --------------------------------------------------------------------------- precision, format


def _fit_ddp_fp32_and_bf16(rank: int, world: int, data: str, out: str) -> None:
    torch.set_num_threads(1)
    _no_figures()
    for precision in ("fp32", "bf16"):
        summary = fit(
            _config(Path(data), Path(out), f"name=ddp-{precision}", f"train.precision={precision}")
        )
        assert summary["final"]["n"] == 13  # every validation sample once over both ranks


def test_ddp_bf16_autocast_on_two_processes(shards: Path, tmp_path: Path) -> None:
    run_distributed(_fit_ddp_fp32_and_bf16, 2, str(shards), str(tmp_path))
    fp32, bf16 = tmp_path / "ddp-fp32", tmp_path / "ddp-bf16"
    w32, w16 = _final_weights(fp32), _final_weights(bf16)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in w16.values())
    # bf16 autocast rounds activations: the same run ends elsewhere (only ~1e-7 apart in fp32).
    assert _max_diff(w32, w16) > 1e-4
    loss32, loss16 = (float(_history(r)[0]["train_loss"]) for r in (fp32, bf16))
    assert math.isfinite(loss16) and loss16 != loss32
    assert loss16 == pytest.approx(loss32, rel=0.05)  # ...but it is the same training


def test_fp16_uses_a_grad_scaler(shards: Path, tmp_path: Path, baseline: dict[str, Any]) -> None:
    with torch.autocast("cpu", dtype=torch.float16):
        probe = torch.nn.functional.conv2d(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 3, 3))
    if probe.dtype != torch.float16:
        pytest.skip("fp16 autocast is not supported for convolutions by this CPU torch")
    _, run = _fit(shards, tmp_path, "fp16", "train.precision=fp16")
    scaler = _saved(_checkpoints(run)[-1], _is_scaler_state)
    assert scaler is not None, "the fp16 checkpoint holds no grad-scaler state"
    assert scaler["scale"] > 1.0  # a real loss scale (65536 at start, halved on overflow)
    assert _saved(_checkpoints(baseline["run"])[-1], _is_scaler_state) is None  # fp32: none
    w16 = _final_weights(run)
    assert all(torch.isfinite(w).all() for w in w16.values())
    assert _max_diff(w16, baseline["weights"]) > 1e-4  # autocast was on


def test_channels_last_trains_in_channels_last(
    shards: Path, tmp_path: Path, baseline: dict[str, Any]
) -> None:
    seen: list[tuple[str, tuple[int, ...], bool, bool]] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, torch.nn.Conv2d) and module.training:
            for what, t in (("weight", module.weight), ("input", args[0])):
                cl = t.is_contiguous(memory_format=torch.channels_last)
                seen.append((what, tuple(t.shape), cl, t.is_contiguous()))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        _, run = _fit(shards, tmp_path, "cl", "model.channels_last=true")
    finally:
        handle.remove()
    # Every conv weight and input is channels-last (tensors with one channel or 1x1 pixels are
    # both formats at once), and most are only channels-last.
    assert all(cl for _, _, cl, _ in seen), [s for s in seen if not s[2]][:4]
    only = [s for s in seen if not s[3]]
    assert len(only) > len(seen) / 2, seen[:6]
    assert {"weight", "input"} <= {s[0] for s in only}
    _assert_close(_final_weights(run), baseline["weights"], atol=1e-4)


def test_compile_compiles_the_training_model(
    shards: Path, tmp_path: Path, baseline: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._dynamo
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    backend = os.environ.get("SRMRI_TEST_COMPILE_BACKEND", "eager")
    compiled: list[Any] = []
    real_compile = torch.compile

    @functools.wraps(real_compile)
    def spy(model: Any = None, **kwargs: Any) -> Any:
        kwargs.setdefault("backend", backend)
        result = real_compile(model, **kwargs)
        compiled.append(result)
        return result

    monkeypatch.setattr(torch, "compile", spy)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    try:
        _, run = _fit(shards, tmp_path, "compiled", "model.compile=true")
    finally:
        torch._dynamo.reset()
    assert compiled and isinstance(compiled[0], OptimizedModule), compiled
    assert counters["stats"]["unique_graphs"] > before, dict(counters["stats"])
    _assert_close(_final_weights(run), baseline["weights"], atol=1e-4)
