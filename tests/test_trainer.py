"""The training engine end to end: real shard sets, real processes, real gloo and DeepSpeed.

Runs are tiny (resnet10t, 32 px, a few steps) and single-threaded so the file stays within a
few minutes on two shared cores.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import make_shard_set

from srmri.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug.yaml"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _cli(
    *args: str, nproc: int = 1, check: bool = True, timeout: int = 300
) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "trainer", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            "-m",
            "trainer",
            *args,
        ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards") / "toy"
    # Uneven shards everywhere: 64 train samples, 13 validation samples over 2 shards.
    make_shard_set(root, {"train": [24, 20, 20], "val": [7, 6], "test": [5, 4]}, size=32)
    return root


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run the CLI in this process (cheap: no interpreter start); returns (status, stderr)."""
    from trainer.__main__ import main

    status = main(list(args))
    return status, capsys.readouterr().err


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it (torchrun puts workers in new sessions)."""
    import psutil

    try:
        victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        victims = []
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    proc.wait()


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    return torch.load(ckpts[-1] / "module.pt", weights_only=True)


# ----------------------------------------------------------------------------- fast unit checks


def test_config_errors_and_defaults(tmp_path: Path) -> None:
    from srmri.config import ConfigError
    from trainer.config import load_train_config

    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'.*did you mean 'lr'"):
        load_train_config(DEBUG, ["optim.lrr=0.1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  root: x\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*data.batch_sise.*did you mean 'batch_size'"):
        load_train_config(bad)
    with pytest.raises(ConfigError, match=r"backend.zero_stage"):
        load_train_config(DEBUG, ["backend.zero_stage=2"])  # ZeRO without deepspeed
    with pytest.raises(ConfigError, match=r"data.sr_root"):
        load_train_config(DEBUG, ["data.inputs=sr"])
    cfg = load_train_config(ROOT / "configs" / "classify.yaml")
    assert cfg.model.name == "resnet50" and cfg.train.precision == "bf16"


def test_schedules_warm_up_then_decay() -> None:
    from trainer.config import SchedConfig
    from trainer.factories import create_scheduler

    for name in ("cosine", "step", "onecycle", "plateau", "constant"):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
        cfg = SchedConfig(name=name, warmup_epochs=1, warmup_lr=0.001, step_epochs=2)
        sched = create_scheduler(opt, cfg, lr=0.1, epochs=4, steps_per_epoch=10)
        lrs = [sched.lr()]
        for _ in range(40):
            opt.step()
            sched.step()
            lrs.append(sched.lr())
        assert lrs[0] < 0.02, (name, lrs[:3])  # starts near warmup_lr
        assert max(lrs) == pytest.approx(0.1, rel=0.05), name  # reaches the peak
        if name in ("cosine", "onecycle", "step"):
            assert lrs[-1] < 0.05, (name, lrs[-1])  # decays
        state = sched.state_dict()
        sched.load_state_dict(state)


@pytest.mark.parametrize("name", ["cosine", "step", "onecycle", "plateau", "constant"])
@pytest.mark.parametrize("stop", [3, 25])  # in the warmup, after it
def test_rescaled_schedule_follows_the_new_peak(name: str, stop: int) -> None:
    # A resumed run whose optim.lr changed (PBT) must continue on the new peak's schedule.
    from trainer.config import SchedConfig
    from trainer.factories import create_scheduler

    def build(lr: float) -> tuple[torch.optim.Optimizer, object]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        cfg = SchedConfig(name=name, warmup_epochs=1, warmup_lr=0.001, step_epochs=2)
        sched = create_scheduler(opt, cfg, lr=lr, epochs=4, steps_per_epoch=10)
        return opt, sched

    old_opt, old = build(0.1)
    for _ in range(stop):
        old_opt.step()
        old.step()
    new_opt, new = build(0.3)  # what a resume builds, then loads the old state into
    new_opt.load_state_dict(old_opt.state_dict())
    new.load_state_dict(old.state_dict())
    new.rescale(3.0)
    ref_opt, ref = build(0.3)  # the run that had the new peak all along
    for _ in range(stop):
        ref_opt.step()
        ref.step()
    for step in range(stop, 40):
        # The rest of the old schedule, three times higher...
        assert new.lr() == pytest.approx(3.0 * old.lr(), rel=1e-5), (name, step)
        # ...which after the warmup (from the absolute warmup_lr) is the new peak's schedule.
        if step >= 10 and name != "onecycle":  # onecycle anchors its floor at warmup_lr
            assert new.lr() == pytest.approx(ref.lr(), rel=1e-5), (name, step)
        for opt, sched in ((old_opt, old), (new_opt, new), (ref_opt, ref)):
            opt.step()
            sched.step()


@pytest.mark.parametrize("warmup_epochs", [0.0, 0.2, 0.34])
@pytest.mark.parametrize("steps_per_epoch", [1, 2, 3])
def test_onecycle_survives_short_warmups_and_runs(warmup_epochs, steps_per_epoch) -> None:
    # OneCycleLR divides by its phase lengths: a warmup of <= 1 step used to divide by zero.
    from trainer.config import SchedConfig
    from trainer.factories import create_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    cfg = SchedConfig(name="onecycle", warmup_epochs=warmup_epochs)
    sched = create_scheduler(opt, cfg, lr=0.1, epochs=2, steps_per_epoch=steps_per_epoch)
    for _ in range(2 * steps_per_epoch):
        opt.step()
        sched.step()
    assert 0 < sched.lr() <= 0.1


def test_inputs_lr_is_fixed_in_eval_and_varies_in_train() -> None:
    from shards.degrade import DegradeConfig
    from trainer.inputs import InputTransform

    img = torch.rand(1, 32, 32)
    cfg = DegradeConfig(scale=2, noise_sigma=0.02)

    def sample(epoch: int) -> dict:
        image = img.clone()
        return {"key": "k1", "digest": "d1", "image": image, "epoch": epoch, "aligned": [img * 0.5]}

    ev = InputTransform("lr", cfg, "bicubic", 0, train=False)
    a, b = ev(sample(0))["image"], ev(sample(3))["image"]
    assert a.shape == img.shape and torch.equal(a, b) and not torch.equal(a, img)
    tr = InputTransform("lr", cfg, "bicubic", 0, train=True)
    assert not torch.equal(tr(sample(0))["image"], tr(sample(1))["image"])
    assert torch.equal(tr(sample(1))["image"], tr(sample(1))["image"])
    both = InputTransform("lr+sr", cfg, "bicubic", 0, train=True)(sample(0))
    assert torch.equal(both["image2"], img * 0.5) and "aligned" not in both
    sr_eval = InputTransform("lr+sr", cfg, "bicubic", 0, train=False)(sample(0))
    assert torch.equal(sr_eval["image"], img * 0.5) and "image2" not in sr_eval


# ------------------------------------------------------------------------ real training runs


FIT_ARGS = (
    "train.epochs=3",
    "train.max_steps_per_epoch=8",
    "sched.name=constant",
    "sched.warmup_epochs=0",
)


@pytest.fixture(scope="module")
def trained(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 3-epoch single-process run (``out_dir/one``), shared by the tests below."""
    out = tmp_path_factory.mktemp("fit") / "runs"
    proc = _cli(
        "fit",
        "--config",
        str(DEBUG),
        f"data.root={shards}",
        f"out_dir={out}",
        "name=one",
        *FIT_ARGS,
    )
    (out.parent / "stderr.log").write_text(proc.stderr)  # a pipe, as in a log file
    return out / "one"


def test_fit_writes_the_run_directory_and_learns(trained: Path) -> None:
    run = trained
    for name in (
        "config.yaml",
        "metrics.json",
        "metrics.csv",
        "predictions.parquet",
        "curves.png",
        "confusion_val.png",
    ):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    losses = [float(r["train_loss"]) for r in _history(run)]
    assert len(losses) == 3 and losses[-1] < 0.6 * losses[0], losses
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["final"]["n"] == 13 and metrics["steps"] == 24
    log = (run.parent.parent / "stderr.log").read_text()
    assert "\r" not in log  # no progress-bar frames in a file: one line per interval
    for e in range(3):  # a line per log interval (log_every: 1), the last at 8/8
        done = [
            int(x.split(": ")[1].split("/")[0])
            for x in log.splitlines()
            if f"epoch {e}: " in x and "/8 (" in x
        ]
        assert done == sorted(done) and len(done) >= 8 and done[-1] == 8, (e, done)


def test_export_reproduces_the_validation_probabilities_in_bare_timm(
    trained: Path, shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import timm
    from safetensors.torch import load_file

    from shards.loader import create_loader

    run = trained
    exported = tmp_path / "model"
    assert _main(capsys, "export", "--checkpoint", str(run), "--out", str(exported))[0] == 0
    side = json.loads((exported / "model.json").read_text())
    model = timm.create_model(side["model"], in_chans=1, num_classes=side["num_classes"])
    model.load_state_dict(load_file(str(exported / "model.safetensors")))
    model.eval()
    table = pq.read_table(run / "predictions.parquet").to_pydict()
    want = {k: [table[f"prob_{c}"][i] for c in side["classes"]] for i, k in enumerate(table["key"])}
    seen = 0
    with torch.no_grad():
        for batch in create_loader(shards, "val", 8, mode="eval"):
            probs = model(batch["image"]).softmax(1)
            for key, p in zip(batch["key"], probs):
                assert torch.allclose(p, torch.tensor(want[key]), atol=1e-5), key
                seen += 1
    assert seen == 13


def test_evaluate_on_the_test_split(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ev_out = tmp_path / "eval"
    assert (
        _main(
            capsys,
            "evaluate",
            "--checkpoint",
            str(trained),
            "--split",
            "test",
            "--out",
            str(ev_out),
        )[0]
        == 0
    )
    test_metrics = json.loads((ev_out / "metrics_test.json").read_text())
    assert test_metrics["n"] == 9
    assert pq.read_table(ev_out / "predictions_test.parquet").num_rows == 9


def test_resume_with_another_lr_and_weight_decay_takes_effect(
    trained: Path, shards: Path, tmp_path: Path
) -> None:
    # What a PBT exploit does. On a copy: the other tests read the 3-epoch run.
    out = tmp_path / "runs"
    run = out / "one"
    shutil.copytree(trained, run)
    lr0 = float(_history(run)[-1]["lr"])
    again = _cli(
        "fit",
        "--config",
        str(DEBUG),
        f"data.root={shards}",
        f"out_dir={out}",
        "name=one",
        "train.epochs=4",
        "train.max_steps_per_epoch=8",
        "sched.name=constant",
        "sched.warmup_epochs=0",
        f"optim.lr={2 * lr0}",
        "optim.weight_decay=0.2",
    )
    assert "the LR schedule is rescaled" in again.stdout and "0.2)" in again.stdout, again.stdout
    rows = _history(run)
    assert len(rows) == 4 and float(rows[-1]["lr"]) == pytest.approx(2 * lr0), rows[-1]


def test_saved_config_is_accepted_by_fit(trained: Path, tmp_path: Path) -> None:
    _cli(
        "fit",
        "--config",
        str(trained / "config.yaml"),
        f"out_dir={tmp_path / 'again'}",
        "train.epochs=1",
        "train.max_steps_per_epoch=1",
    )
    assert (tmp_path / "again" / "one" / "metrics.json").is_file()


def test_predict_an_image_file(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An image file through the ingest preprocessing, probabilities per class.
    import numpy as np
    from helpers import toy_image
    from PIL import Image

    latest = sorted((trained / "checkpoints").glob("step-*"))[-1]
    classes = json.loads((latest / "complete.json").read_text())["classes"]  # = export's sidecar
    jpeg = tmp_path / "slice.jpg"
    Image.fromarray((toy_image(1, 32, np.random.default_rng(1)) * 255).astype("uint8")).save(jpeg)
    csv_out = tmp_path / "preds.csv"
    assert (
        _main(capsys, "predict", "--checkpoint", str(trained), "--out", str(csv_out), str(jpeg))[0]
        == 0
    )
    with open(csv_out) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["predicted"] in classes, rows
    assert sum(float(rows[0][f"prob_{c}"]) for c in classes) == pytest.approx(1, abs=1e-4)


def test_missing_and_corrupt_checkpoints_give_clear_errors(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = _main(capsys, "export", "--checkpoint", str(tmp_path / "nope"), "--out", "x.st")
    assert status == 2 and "nope" in err and "does not exist" in err
    bad = tmp_path / "bad" / "step-00000024"
    shutil.copytree(sorted((trained / "checkpoints").glob("step-*"))[-1], bad)
    (bad / "module.pt").write_bytes(b"not a checkpoint")
    status, err = _main(
        capsys, "export", "--checkpoint", str(bad), "--out", str(tmp_path / "y.st"), "--no-ema"
    )
    assert status == 2 and "module.pt" in err and "corrupt" in err, err
    (bad / "complete.json").unlink()
    status, err = _main(capsys, "export", "--checkpoint", str(bad), "--out", "z.st")
    assert status == 2 and "not a complete checkpoint" in err, err


RESUME_ARGS = (
    "train.epochs=2",
    "train.max_steps_per_epoch=8",
    "data.batch_size=4",
    "train.deterministic=true",
    "checkpoint.save_every_steps=3",
    "checkpoint.keep_last=20",
    "augment.enabled=true",
    "model.drop_rate=0.2",
    "train.ema_decay=0.9",
    "sched.name=cosine",
    "sched.warmup_epochs=0.5",
)


def test_ddp_sigkill_mid_epoch_then_resume_is_bitwise_identical(
    shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "runs"
    common = ("fit", "--config", str(DEBUG), f"data.root={shards}", f"out_dir={out}", *RESUME_ARGS)
    _cli(*common, "name=reference", nproc=2)
    reference = out / "reference"

    # Each validation key counted once across 2 ranks with uneven shards and padding.
    keys = pq.read_table(reference / "predictions.parquet").column("key").to_pylist()
    assert len(keys) == 13 and len(set(keys)) == 13
    assert json.loads((reference / "metrics.json").read_text())["final"]["n"] == 13

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "trainer",
        *common,
        "name=killed",
    ]
    killed = out / "killed"
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = list((killed / "checkpoints").glob("step-*/complete.json"))
            if any(json.loads(p.read_text())["epoch_end"] is False for p in done):
                break
            time.sleep(0.05)
    finally:
        _kill_tree(proc)
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    steps = sorted(int(p.name[5:]) for p in (killed / "checkpoints").glob("step-*"))
    assert steps and steps[-1] < 16
    time.sleep(1.0)  # nothing may still be running and writing
    assert sorted(int(p.name[5:]) for p in (killed / "checkpoints").glob("step-*")) == steps

    resumed = _cli(*common, "name=killed", nproc=2)  # resume: auto
    assert f"resumed from {killed / 'checkpoints' / f'step-{steps[-1]:08d}'}" in resumed.stdout
    ref_w, res_w = _final_weights(reference), _final_weights(killed)
    assert ref_w.keys() == res_w.keys()
    for k in ref_w:
        assert torch.equal(ref_w[k], res_w[k]), k
    ref_t = torch.load(
        sorted((reference / "checkpoints").glob("step-*"))[-1] / "trainer.pt", weights_only=True
    )
    res_t = torch.load(
        sorted((killed / "checkpoints").glob("step-*"))[-1] / "trainer.pt", weights_only=True
    )
    for k in ref_t["ema"]:
        assert torch.equal(ref_t["ema"][k], res_t["ema"][k]), k
    for ra, rb in zip(ref_t["state"]["history"], res_t["state"]["history"]):
        assert ra == rb, {k: (ra[k], rb.get(k)) for k in ra if ra[k] != rb.get(k)}


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_bf16_two_processes(
    shards: Path, tmp_path: Path, stage: int, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    _cli(
        "fit",
        "--config",
        str(DEBUG),
        f"data.root={shards}",
        f"out_dir={out}",
        "name=ds",
        "backend.name=deepspeed",
        f"backend.zero_stage={stage}",
        "train.precision=bf16",
        "data.batch_size=4",
        "train.epochs=2",
        "train.max_steps_per_epoch=4",
        "train.clip_grad=1.0",
        "train.grad_accum=2",
        nproc=2,
    )
    run = out / "ds"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["final"]["n"] == 13
    losses = [float(r["train_loss"]) for r in _history(run)]
    assert all(map(lambda v: v == v, losses))  # finite, not nan
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert len(list((ckpt / "deepspeed").glob("*optim_states.pt"))) == 2  # one shard per rank
    if stage == 2:
        import timm
        from safetensors.torch import load_file

        exported = tmp_path / "ds"
        assert _main(capsys, "export", "--checkpoint", str(run), "--out", str(exported))[0] == 0
        model = timm.create_model("resnet10t", in_chans=1, num_classes=4)
        model.load_state_dict(load_file(str(exported / "model.safetensors")))
        module = torch.load(ckpt / "module.pt", weights_only=True)
        for k, v in load_file(str(exported / "model.safetensors")).items():
            assert torch.equal(v, module[k]), k  # fp32 masters == module weights under autocast
