"""Guards of a training run against inputs and events that used to pass silently.

Each test drives a real part (config loading, a tiny real ``fit`` on 32 px slices with timm's
``test_resnet``, the CLI's ``main``, two real processes) into one failure and checks what it
leaves behind:

* nan/inf and out-of-range hyperparameters are refused at load (``optim.lr=inf`` trained on at
  loss nan and exited 0);
* a run name that is a path (``name=..`` wrote into the parent of ``out_dir``), and an
  ``out_dir`` that is a file;
* a run directory in use by another process (two fits interleaved their checkpoints);
* a training loss that turns nan: ``stop`` (error, non-zero exit) and ``skip`` (on every rank).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TINY_SGD_RUN, make_shard_set, run_distributed

from srmri.config import ALLOW_NONFINITE, ConfigError, config_from_dict, load_config
from trainer.config import load_train_config
from trainer.loop import NonFiniteLoss, fit
from trainer.rundir import LOCK_FILE, RunDirInUse, RunLock

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug.yaml"

BASE = TINY_SGD_RUN


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("guards") / "toy"
    make_shard_set(root, {"train": [24, 20], "val": [7, 6], "test": [5, 4]}, size=32)
    return root


@pytest.fixture(scope="module", autouse=True)
def _one_thread_no_figures() -> Iterator[None]:
    import trainer.plots

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: extra threads only contend on 2 cores
    with pytest.MonkeyPatch.context() as mp:
        for name in ("plot_curves", "plot_confusion"):
            mp.setattr(trainer.plots, name, lambda *args, **kwargs: None, raising=False)
        yield
    torch.set_num_threads(threads)


def _overrides(data: Path, out: Path, name: str, *more: str) -> list[str]:
    return [f"data.root={data}", f"out_dir={out}", f"name={name}", *BASE, *more]


def _fit(data: Path, out: Path, name: str, *more: str) -> dict[str, Any]:
    return fit(load_train_config(DEBUG, _overrides(data, out, name, *more)))


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``folder``: modification time and content hash."""
    return {
        str(p.relative_to(folder)): (
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------ hyperparameters


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("optim.lr=-.inf", "optim.lr"),
        ("train.clip_grad=inf", "train.clip_grad"),
        ("optim.betas=[0.9, .nan]", "optim.betas[1]"),
        ("train.ema_decay=nan", "train.ema_decay"),  # float | None
        ("sched.warmup_epochs=inf", "sched.warmup_epochs"),
    ],
)
def test_nonfinite_hyperparameters_are_refused_at_load(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_train_config(None, ["data.root=x", override])
    assert str(caught.value).startswith(f"{key}: must be a finite number, got ")


def test_nonfinite_floats_need_an_explicit_allowance(tmp_path: Path) -> None:
    @dataclass
    class Section:
        limit: float = 1.0
        bound: float = field(default=math.inf, metadata={ALLOW_NONFINITE: True})

    assert config_from_dict(Section, {"bound": "-inf"}).bound == -math.inf
    with pytest.raises(ConfigError, match="limit: must be a finite number"):
        config_from_dict(Section, {"limit": float("nan")})
    path = tmp_path / "c.yaml"
    path.write_text("limit: .inf\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: limit: must be a finite number"):
        load_config(Section, path)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["optim.lr=1e-3", "sched.min_lr=1e-2"], "sched.min_lr"),
        (["optim.lr=1e-3", "sched.warmup_epochs=1", "sched.warmup_lr=1e-2"], "sched.warmup_lr"),
        (["backend.name=deepspeed", "train.nonfinite_loss=skip"], "train.nonfinite_loss"),
    ],
)
def test_inconsistent_schedule_settings_are_refused(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_train_config(None, ["data.root=x", *overrides])


def test_consistent_schedule_settings_load() -> None:
    cfg = load_train_config(
        None, ["data.root=x", "optim.lr=1e-3", "sched.min_lr=1e-3", "sched.warmup_lr=1e-3"]
    )
    assert cfg.sched.min_lr == cfg.optim.lr
    # No warmup: its start LR plays no part, whatever it is.
    load_train_config(None, ["data.root=x", "optim.lr=1e-7", "sched.warmup_epochs=0"])


# ------------------------------------------------------------------------- run directories


# Values as an override reads them (YAML): quoted blanks, and a NUL by YAML's escape.
@pytest.mark.parametrize("name", [".", "..", "../escape", "a/b", "a\\b", "/abs", "'  '", '"a\\0b"'])
def test_run_names_that_are_paths_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=r"^name: must be a plain folder name"):
        load_train_config(None, ["data.root=x", f"name={name}"])


def test_plain_run_names_load() -> None:
    for name in ("run-1", "a.b", "..x", "lr_3e-4"):
        assert load_train_config(None, ["data.root=x", f"name={name}"]).name == name


def test_out_dir_that_is_a_file_is_a_clear_error(shards: Path, tmp_path: Path) -> None:
    from trainer.__main__ import main

    out = tmp_path / "results.txt"
    out.write_text("not a folder\n")
    with pytest.raises(ConfigError, match=f"^out_dir: {out} is a file, not a folder"):
        _fit(shards, out, "run")
    assert out.read_text() == "not a folder\n"
    # The run directory itself a file: the name is what to change.
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match=r"^name: .*taken is a file"):
        _fit(shards, tmp_path, "taken")
    # The CLI: a one-line error and the configuration-error status, no traceback.
    assert main(["fit", "--config", str(DEBUG), *_overrides(shards, out, "run")]) == 2


_HOLD = textwrap.dedent(
    """
    import sys, time
    from trainer.rundir import RunLock
    lock = RunLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_a_run_dir_in_use_is_refused_and_left_untouched(shards: Path, tmp_path: Path) -> None:
    _fit(shards, tmp_path, "busy", "train.max_steps_per_epoch=1")
    run = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(run)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = _snapshot(run)
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid
        with pytest.raises(RunDirInUse) as caught:
            _fit(shards, tmp_path, "busy", "train.epochs=2", "train.max_steps_per_epoch=1")
        assert str(caught.value).startswith(
            f"{run} is in use by pid {holder.pid} on {socket.gethostname()} since "
        )
        assert str(caught.value).endswith("; wait for it or use another name=")
        assert _snapshot(run) == before  # not even config.yaml rewritten
    finally:
        # SIGKILL: no clean-up code runs, and the kernel still drops the flock.
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    summary = _fit(shards, tmp_path, "busy", "train.epochs=2", "train.max_steps_per_epoch=1")
    assert summary["epochs_run"] == 2 and summary["steps"] == 2  # it resumed the first run
    # The finished run released its lock, and left no holder named in the file.
    with RunLock(run):
        pass
    assert (run / LOCK_FILE).read_text() == ""


# ------------------------------------------------------------------------ non-finite losses


def test_a_diverging_run_stops_with_an_error(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainer.__main__ import main

    # SGD at 1e30: the first step makes the weights huge, the second forward gives nan.
    argv = [
        "fit",
        "--config",
        str(DEBUG),
        *_overrides(shards, tmp_path, "diverge", "optim.lr=1e30"),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the bar is closed before
    assert err.startswith("error: training loss is not finite at optimizer step 2 (epoch 0, ")
    assert "nan on rank 0" in err and "lower optim.lr (now 1e+30)" in err
    run = tmp_path / "diverge"
    assert not list(run.glob("checkpoints/*/complete.json")) and not (run / "metrics.json").exists()
    with RunLock(run):  # the failed run let go of its directory
        pass


def _nan_on_rank(real: Any, rank: int, call: int) -> Any:
    """``ClassificationTask.train_loss`` whose ``call``-th loss on rank ``rank`` is nan."""
    calls = 0

    def train_loss(task: Any, backend: Any, batch: Any) -> tuple[torch.Tensor, int]:
        nonlocal calls
        loss, n = real(task, backend, batch)
        calls += 1
        if calls == call and int(os.environ["RANK"]) == rank:
            loss = loss * float("nan")  # and so every gradient of its backward
        return loss, n

    return train_loss


def _nan_on_rank_1(rank: int, world: int, data: str, out: str) -> None:
    import trainer.plots
    from trainer.task import ClassificationTask

    torch.set_num_threads(1)
    for name in ("plot_curves", "plot_confusion"):
        setattr(trainer.plots, name, lambda *args, **kwargs: None)
    real = ClassificationTask.train_loss
    outcome: dict[str, Any] = {}
    ClassificationTask.train_loss = _nan_on_rank(real, rank=1, call=1)
    skip = _overrides(Path(data), Path(out), "skip", "train.nonfinite_loss=skip")
    summary = fit(load_train_config(DEBUG, skip))
    outcome["skip_steps"] = summary["steps"]
    ClassificationTask.train_loss = _nan_on_rank(real, rank=1, call=1)
    try:
        fit(load_train_config(DEBUG, _overrides(Path(data), Path(out), "stop")))
    except NonFiniteLoss as exc:
        outcome["stop"] = str(exc)
    Path(out, f"outcome-{rank}.json").write_text(json.dumps(outcome))


def test_a_nan_loss_on_one_rank_is_skipped_or_stops_on_every_rank(
    shards: Path, tmp_path: Path
) -> None:
    from trainer.checkpoint import resolve_checkpoint
    from trainer.weights import load_fp32_weights

    run_distributed(_nan_on_rank_1, 2, str(shards), str(tmp_path))
    outcomes = [json.loads((tmp_path / f"outcome-{r}.json").read_text()) for r in (0, 1)]
    # skip: both ranks dropped the first of their 2 steps, and rank 0, whose own loss was
    # finite, did not apply rank 1's nan gradients (which the all-reduce gave it) either.
    assert [o["skip_steps"] for o in outcomes] == [1, 1]
    weights = load_fp32_weights(resolve_checkpoint(tmp_path / "skip"), use_ema=False)
    assert all(torch.isfinite(w).all() for w in weights.values())
    metrics = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    assert math.isfinite(metrics["final"]["loss"]) and metrics["steps"] == 1
    history = (tmp_path / "skip" / "metrics.csv").read_text().splitlines()
    row = dict(zip(history[0].split(","), history[1].split(",")))
    assert math.isfinite(float(row["train_loss"]))  # the skipped step's nan is left out
    # stop: both ranks stopped at the same step, naming the rank whose loss was nan.
    for o in outcomes:
        assert o["stop"].startswith("training loss is not finite at optimizer step 1 (epoch 0, ")
        assert "nan on rank 1" in o["stop"] and "on rank 0" not in o["stop"]
    assert not list((tmp_path / "stop").glob("checkpoints/*/complete.json"))
