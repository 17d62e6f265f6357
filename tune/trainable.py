"""One Ray Tune trial: a trainer run built from the base config plus the sampled overrides.

The trial's run folder is ``EXPERIMENT/<trial_id>/run``. ``trainer.loop.fit`` calls back after every
epoch's validation and epoch-end checkpoint; the callback hands the row and that checkpoint to
Ray Tune (``tune.report``), so ASHA can stop a weak trial, PBT can copy a strong one, and a crashed
or interrupted trial restarts from its last epoch: the restored Tune checkpoint is copied back into
the run's ``checkpoints/`` folder, where ``fit`` resumes from it by itself. With the base config's
``logging.mlflow_uri`` set, each trial is one MLflow run named by its trial id, under an MLflow
experiment named like the search's experiment (a retried trial continues its run).

A trial with one worker trains in the trial's own process. A trial with several workers starts a
Ray Train ``TorchTrainer``; Ray Train sets the torchrun-style variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and initialises the process group before the
worker function runs, and the trainer's ``init_distributed`` joins that group as it is. Rank 0
passes each epoch's row and checkpoint path through a Ray queue to the trial process, which
reports them to Tune.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import tune

if TYPE_CHECKING:
    from trainer.config import TrainConfig

__all__ = ["TrialSetup", "restore_checkpoint", "run_trial", "trial_dirname"]

_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares (picklable; passed with ``tune.with_parameters``).

    Attributes:
        base: The base trainer config as a plain mapping.
        experiment_dir: The experiment folder (trial folders are ``<it>/<trial_id>``).
        workers: Training processes per trial.
        cpus: CPUs per worker.
        gpus: GPUs per worker (fractions allowed).
    """

    base: dict[str, Any]
    experiment_dir: str
    workers: int = 1
    cpus: float = 1.0
    gpus: float = 0.0


def trial_dirname(trial: Any) -> str:
    """Ray Tune's trial folder name: the trial id, so results and run folders are easy to find."""
    return str(trial.trial_id)


def restore_checkpoint(source: Path, checkpoints: Path) -> Path:
    """Make ``source`` (a trainer checkpoint's files) the newest checkpoint under ``checkpoints``.

    Other checkpoints there are removed first: after a PBT exploit the donor's checkpoint may be
    older than this trial's own, and ``fit`` resumes from the newest one.

    Args:
        source: A folder with a trainer checkpoint's files (``complete.json`` among them).
        checkpoints: The run's ``checkpoints/`` folder.

    Returns:
        The restored checkpoint directory.

    Raises:
        FileNotFoundError: If ``source`` is not a complete trainer checkpoint.
    """
    marker = source / "complete.json"
    if not marker.is_file():
        raise FileNotFoundError(f"{source}: the Tune checkpoint holds no trainer checkpoint")
    step = int(json.loads(marker.read_text())["step"])
    target = checkpoints / f"step-{step:08d}"
    if target.resolve() == source.resolve():
        return target
    if checkpoints.is_dir():
        for old in checkpoints.glob("step-*"):
            shutil.rmtree(old)
    checkpoints.mkdir(parents=True, exist_ok=True)
    tmp = checkpoints / f".restore-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    tmp.rename(target)
    return target


class _TuneReporter:
    """``on_epoch_end`` for a trial process: report the row and the epoch's checkpoint to Tune."""

    def __call__(self, row: dict[str, Any], checkpoint: Path) -> None:
        metrics = {k: v for k, v in row.items() if isinstance(v, int | float)}
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint)))


class _QueueReporter:
    """``on_epoch_end`` for Ray Train workers: rank 0 sends the row and path to the trial."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def __call__(self, row: dict[str, Any], checkpoint: Path) -> None:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            self.queue.put((dict(row), str(checkpoint)))


def _train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: the process group already exists; ``fit`` joins it."""
    from srmri.config import config_from_dict
    from trainer.config import TrainConfig
    from trainer.loop import fit

    cfg = config_from_dict(TrainConfig, loop_config["cfg"])
    fit(cfg, on_epoch_end=_QueueReporter(loop_config["queue"]))


def _fit_here(cfg: Any) -> None:
    """Train in this process with a private one-member process group."""
    from srmri.distributed import cleanup
    from trainer.loop import fit

    saved = {k: os.environ.pop(k, None) for k in _DIST_ENV}  # a fresh group on a free port
    try:
        fit(cfg, on_epoch_end=_TuneReporter())
    finally:
        cleanup()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fit_workers(cfg: Any, setup: TrialSetup, trial_dir: Path) -> None:
    """Train on ``setup.workers`` Ray Train workers; report rank 0's epochs from this thread."""
    from queue import Empty

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from srmri.config import config_to_dict

    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    per_worker = {"CPU": setup.cpus, **({"GPU": setup.gpus} if setup.gpus else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"cfg": config_to_dict(cfg), "queue": queue},
        torch_config=TorchConfig(backend="nccl" if setup.gpus else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=setup.workers, use_gpu=setup.gpus > 0, resources_per_worker=per_worker
        ),
        # Retries happen at the Tune level (from the Tune checkpoint), so Train does not retry.
        run_config=RunConfig(
            name=f"train-{uuid.uuid4().hex[:8]}",
            storage_path=str(trial_dir),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    errors: list[BaseException] = []

    def target() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # re-raised in the trial's thread below
            errors.append(exc)

    thread = threading.Thread(target=target, name="torch-trainer", daemon=True)
    thread.start()
    report = _TuneReporter()
    while True:
        alive = thread.is_alive()
        try:
            row, path = queue.get(timeout=0.5)
        except Empty:
            if not alive:
                break
            continue
        report(row, Path(path))
    thread.join()
    if errors:
        raise errors[0]


def _tracked(cfg: TrainConfig, experiment_dir: str, trial_id: str) -> TrainConfig:
    """The trial's config logging under the search's experiment, its MLflow run named by trial."""
    if not cfg.logging.mlflow_uri:
        return cfg
    log = replace(
        cfg.logging, mlflow_experiment=Path(experiment_dir).name, mlflow_run_name=trial_id
    )
    return replace(cfg, logging=log)


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The function trainable: build the trial's config, restore its checkpoint, train.

    Args:
        config: Sampled values, dotted trainer key -> value.
        setup: The search's shared settings.
    """
    from trainer.checkpoint import read_info
    from trainer.config import run_dir_of
    from trainer.resume import finishes_run
    from tune.space import trial_config

    trial_id = tune.get_context().get_trial_id()
    trial_dir = Path(setup.experiment_dir) / trial_id
    cfg = _tracked(trial_config(setup.base, config, str(trial_dir)), setup.experiment_dir, trial_id)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            if finishes_run(read_info(Path(folder)), cfg):
                # A PBT exploit after the last epoch (or a retry after it): nothing is left to
                # train, and a finished run resumed under mutated values would be refused. The
                # run directory keeps what the trial's own epochs wrote.
                return
            restore_checkpoint(Path(folder), run_dir_of(cfg) / "checkpoints")
    if setup.workers == 1:
        _fit_here(cfg)
    else:
        _fit_workers(cfg, setup, trial_dir)
