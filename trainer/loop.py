"""The one training loop: ``fit(cfg)`` for every task and backend.

``build_run`` assembles the pieces (process group, loaders, task, model, backend, schedule,
EMA, resume); ``fit`` is the loop itself: epochs of micro-steps (:func:`_train_epoch`), then
validation, bookkeeping, the epoch-end checkpoint and early stopping (:func:`_end_epoch`).
Everything task- or backend-specific lives behind ``Task`` and ``Backend``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn

from shards.degrade import SAMPLE_DRAWS
from shards.format import read_index
from shards.http_stream import HttpSettings
from shards.loader import ShardLoader, create_loader
from srmri.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
)
from srmri.distributed import (
    DistInfo,
    all_gather_floats,
    barrier,
    broadcast_buffers,
    init_distributed,
    print0,
)
from srmri.exitcodes import REQUEUE
from srmri.progress import Progress
from srmri.progress import progress as progress_report
from trainer.backend import Backend, create_backend
from trainer.batch import TaskBatch
from trainer.checkpoint import (
    CheckpointMarker,
    ProcessRNG,
    Stateful,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from trainer.config import TrainConfig, run_dir_of
from trainer.criterion import train_class_counts
from trainer.factories import LRSchedule, create_optimizer, create_scheduler
from trainer.precision import autocast as precision_autocast
from trainer.preempt import (
    Preemption,
    any_rank_requested,
    install_preemption_handler,
)
from trainer.resume import (
    ResumePoint,
    RunIdentity,
    apply_threads,
    check_classes,
    resume_point,
    run_identity,
)
from trainer.rundir import (
    RunDir,
    eval_dir_of,
    eval_metrics_path,
    locked_run_dir,
    scalars,
    write_json,
)
from trainer.state import OptimHParams, TrainState
from trainer.task import Prepare, Task, create_task
from trainer.weights import checkpoint_config, load_fp32_weights

__all__ = [
    "NonFiniteLoss",
    "Run",
    "TrainState",
    "build_run",
    "evaluate",
    "fit",
    "seed_everything",
    "validate",
]


class NonFiniteLoss(RuntimeError):
    """The training loss became nan or infinite (``train.nonfinite_loss: stop``)."""


@dataclass
class Run:
    """Everything ``fit`` works with."""

    cfg: TrainConfig
    info: DistInfo
    rundir: RunDir
    task: Task
    train_loader: ShardLoader
    val_loader: ShardLoader
    backend: Backend
    schedule: LRSchedule
    ema: ModelEmaV3 | None
    micro_per_epoch: int
    metric: str
    mode: str
    classes: list[str]
    hparams: OptimHParams
    state: TrainState = field(default_factory=TrainState)
    identity: RunIdentity | None = None  # what its checkpoints record about what made them

    def shared_components(self) -> dict[str, Stateful | None]:
        """What rank 0 checkpoints into ``trainer.pt`` (the same on every rank)."""
        return {
            "hparams": self.hparams,
            "state": self.state,
            "schedule": self.schedule,
            "ema": self.ema,
        }

    def rank_components(self) -> dict[str, Stateful]:
        """What every rank checkpoints for itself: its RNGs and its loader position."""
        return {"rng": ProcessRNG(), "loader": self.train_loader}


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch (all devices); optionally force deterministic algorithms."""
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _loader(cfg: TrainConfig, task: Task, split: str, train: bool, info: DistInfo) -> ShardLoader:
    d = cfg.data
    return create_loader(
        d.root,
        split,
        d.batch_size if train else d.eval_batch,
        mode="train" if train else "eval",
        seed=cfg.train.seed,
        num_workers=d.num_workers,
        rank=info.rank,
        world_size=info.world_size,
        transform=task.transform(train),
        shuffle_chunk=d.shuffle_chunk,
        aligned_roots=task.aligned_roots(),
        pin_memory=info.device.type == "cuda",
        http=HttpSettings(d.http_connect_timeout, d.http_read_timeout, d.http_retries),
        sampler=d.sampler if train else "shuffle",  # evaluation reads each sample once
    )


def _micro_per_epoch(cfg: TrainConfig, batches: int) -> int:
    """Micro-steps per epoch: the loader's batches, capped, in whole accumulation windows.

    Raises:
        ValueError: If not even one accumulation window fits in an epoch.
    """
    t = cfg.train
    micro = min(batches, t.max_steps_per_epoch or batches)
    micro -= micro % t.grad_accum  # whole accumulation windows only: both backends agree
    if micro == 0:
        raise ValueError(
            f"{cfg.data.root}: an epoch has {batches} batches, fewer than "
            f"train.grad_accum={t.grad_accum}; lower grad_accum or data.batch_size"
        )
    return micro


def build_run(cfg: TrainConfig) -> Run:
    """Set up a run (collective): group, loaders, task, model, backend, schedule, resume.

    Args:
        cfg: The run's configuration.

    Returns:
        The assembled run, resumed from a checkpoint when ``train.resume`` finds one.
    """
    info = init_distributed(cfg.train.device)
    cfg = apply_threads(cfg)  # before any computation; the saved config records the count
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    index = read_index(cfg.data.root)
    identity = run_identity(cfg, index)
    # Checked before the run directory is touched: a refused resume must leave it as it was.
    point = resume_point(cfg, run_dir_of(cfg) / "checkpoints", identity)
    classes = list(index.classes)
    task = create_task(cfg, classes, train_class_counts(cfg, index))  # may refuse the config
    rundir = RunDir(run_dir_of(cfg), info.is_main)
    print0(dump_config(cfg))
    print0(f"torch CPU threads: {cfg.train.threads}")
    rundir.save_config(cfg)
    train_loader = _loader(cfg, task, cfg.data.train_split, True, info)
    val_loader = _loader(cfg, task, cfg.data.val_split, False, info)
    t = cfg.train
    micro = _micro_per_epoch(cfg, len(train_loader))
    model = task.build_model()
    backend = create_backend(
        cfg.backend,
        t,
        model=model,
        optimizer=create_optimizer(model, cfg.optim),
        device=info.device,
        micro_batch=cfg.data.batch_size,
        model_cfg=cfg.model,
    )
    metric = t.early_stop.metric or task.best_metric
    mode = t.early_stop.mode if t.early_stop.metric else task.best_mode
    schedule = create_scheduler(
        backend.optimizer,
        cfg.sched,
        lr=cfg.optim.lr,
        epochs=t.epochs,
        steps_per_epoch=micro // t.grad_accum,
        mode=mode,
    )
    run = Run(
        cfg=cfg,
        info=info,
        rundir=rundir,
        task=task,
        train_loader=train_loader,
        val_loader=val_loader,
        backend=backend,
        schedule=schedule,
        ema=ModelEmaV3(backend.module, decay=t.ema_decay) if t.ema_decay else None,
        micro_per_epoch=micro,
        metric=metric,
        mode=mode,
        classes=classes,
        hparams=OptimHParams.of(cfg.optim),
        identity=identity,
    )
    _maybe_resume(run, point)
    rundir.start_tracking(cfg, identity, resumed=point is not None)
    return run


def _maybe_resume(run: Run, point: ResumePoint | None) -> None:
    """Restore the checkpoint ``train.resume`` picked (already checked to fit this run).

    ``train.resume=never`` starts over: the run directory's old checkpoints are moved aside, or
    the newest of them (a higher step) would outlive the new ones and be resumed later.
    """
    if run.cfg.train.resume == "never":
        _start_over(run)
    if point is None:
        return
    found = point.checkpoint
    same_world = found.world_size == run.info.world_size
    per_rank = run.rank_components()
    if found.epoch_end or not same_world:
        # The next epoch starts afresh; a loader position of another world size is meaningless.
        del per_rank["loader"]
    info, restored = load_checkpoint(
        found.path,
        run.backend,
        shared=run.shared_components(),
        per_rank=per_rank,
        rank=run.info.rank,
    )
    if not same_world:
        print0(
            f"warning: {found.path} was written by {info.world_size} ranks; resuming on "
            f"{run.info.world_size} restarts its epoch's data order"
        )
    rebuilt = point.lengthened(run.cfg) and run.cfg.sched.name != "plateau"
    if rebuilt:
        _lengthen_schedule(run, point.saved.train.epochs)
    _apply_changed_hparams(run, rescale=not rebuilt)
    st = run.state
    if info.epoch_end:
        st.epoch, st.micro = info.epoch + 1, 0
    elif not (restored and same_world):
        st.micro = 0  # no loader position for this rank: the epoch restarts
    if info.early_stopped:
        st.epoch = max(st.epoch, run.cfg.train.epochs)  # finished: another epoch would change it
    print0(f"resumed from {found.path} (epoch {st.epoch}, step {st.step})")


def _start_over(run: Run) -> None:
    """Move the run directory's checkpoints aside (rank 0), for ``train.resume=never``.

    Nothing is deleted: the old checkpoints go to ``checkpoints.replaced-N`` (the first free N),
    where neither pruning nor a later ``resume: auto`` looks.
    """
    old = latest_checkpoint(run.rundir.checkpoints)
    if old is not None and run.info.is_main:
        n = 1
        while (aside := run.rundir.path / f"checkpoints.replaced-{n}").exists():
            n += 1
        print0(f"train.resume=never: the old checkpoints of {run.rundir.path} moved to {aside}")
        run.rundir.checkpoints.rename(aside)
    barrier()


def _lengthen_schedule(run: Run, old_epochs: int) -> None:
    """Put a run given more epochs on the longer schedule, at the step it reached.

    The restored schedule would run on along the old length (a finished cosine climbs back
    from its floor); the rebuilt one continues from the longer schedule's LR at this step, with
    no second warmup.
    """
    t = run.cfg.train
    run.schedule = create_scheduler(
        run.backend.optimizer,
        run.cfg.sched,
        lr=run.cfg.optim.lr,
        epochs=t.epochs,
        steps_per_epoch=run.micro_per_epoch // t.grad_accum,
        mode=run.mode,
        at_step=run.state.step,
    )
    print0(
        f"train.epochs changed since the checkpoint ({old_epochs} -> {t.epochs}): the LR "
        f"schedule continues along the {t.epochs}-epoch one from step {run.state.step}"
    )


def _apply_changed_hparams(run: Run, rescale: bool = True) -> None:
    """Make ``optim.lr`` / ``optim.weight_decay`` of this run's config win over the checkpoint's.

    Resuming restores the optimizer's param groups and the schedule as they were saved; a PBT
    exploit (or a user's override on resume) that changed either value would otherwise do
    nothing. The LR schedule is rescaled by new/old peak (unless ``rescale`` is false: a
    schedule rebuilt for a longer run already has the new peak); weight decay is set on the
    groups :func:`trainer.factories.create_optimizer` marked as decaying (norms and biases keep
    none). Only an unfinished run gets here with changed values (:mod:`trainer.resume`).
    """
    saved = run.hparams.saved
    if not saved:
        return
    o = run.cfg.optim
    if o.lr != saved["lr"]:
        if rescale:
            run.schedule.rescale(o.lr / saved["lr"])
        print0(
            f"optim.lr changed since the checkpoint ({saved['lr']:g} -> {o.lr:g}): "
            "the LR schedule is rescaled"
        )
    if o.weight_decay != saved["weight_decay"]:
        for group in run.backend.optimizer.param_groups:
            if group.get("decay", True):
                group["weight_decay"] = o.weight_decay
        print0(
            "optim.weight_decay changed since the checkpoint "
            f"({saved['weight_decay']:g} -> {o.weight_decay:g})"
        )


def _save(run: Run, epoch_end: bool, metric: float | None) -> Path:
    st = run.state
    patience = run.cfg.train.early_stop.patience
    marker = CheckpointMarker(
        step=st.step,
        epoch=st.epoch,
        epoch_end=epoch_end,
        metric=metric,
        world_size=run.info.world_size,
        backend=run.cfg.backend.name,
        classes=run.classes,
        config_fingerprint=run.identity.config_fingerprint if run.identity else "",
        dataset_id=run.identity.dataset_id if run.identity else "",
        sr_dataset=run.identity.sr_dataset if run.identity else "",
        threads=run.cfg.train.threads,
        sample_draws=SAMPLE_DRAWS,
        early_stopped=epoch_end and 0 < patience <= st.bad_epochs,
    )
    path = save_checkpoint(
        run.rundir.checkpoints,
        run.backend,
        marker,
        shared=run.shared_components(),
        per_rank=run.rank_components(),
        config=run.cfg,
        rank=run.info.rank,
    )
    if run.info.is_main:
        c = run.cfg.checkpoint
        prune_checkpoints(run.rundir.checkpoints, c.keep_last, c.keep_best, run.mode)
    return path


def validate(
    task: Task,
    model: nn.Module,
    loader: ShardLoader,
    prepare: Prepare,
    autocast: Callable[[], contextlib.AbstractContextManager[None]],
    device: torch.device,
) -> dict[str, Any]:
    """One synchronised validation pass (collective).

    Args:
        task: Scores the batches.
        model: The model to evaluate (put in eval mode for the pass, then restored).
        loader: The validation loader.
        prepare: Moves an input batch to the model's device and format.
        autocast: Makes the autocast context of the forwards.
        device: Where the task's metric state lives.

    Returns:
        The task's results.
    """
    was_training = model.training
    model.eval()
    task.eval_reset(device)
    with torch.no_grad(), autocast():
        for batch in _rng_neutral(loader):
            task.eval_update(model, batch, prepare)
    model.train(was_training)
    return task.eval_compute()


def _rng_neutral(loader: Iterable[TaskBatch]) -> Iterator[TaskBatch]:
    """Iterate ``loader`` without its start-up touching torch's global RNG.

    A DataLoader draws its workers' base seed from the global RNG when its iterator starts. A
    run resumed mid-epoch starts that iterator at another point of the RNG stream than the
    uninterrupted run did, so the draw would shift every later dropout mask; the loader's
    randomness comes from (seed, epoch, key) anyway and needs no global draw.
    """
    it = iter(loader)
    with torch.random.fork_rng(devices=[]):
        first = next(it, None)
    if first is None:
        return
    yield first
    # Holding the first batch all epoch would keep its buffer from being reused by the loader.
    del first
    yield from it


def _exit_for_requeue(step: int) -> None:
    print0(f"pre-empted: checkpoint at step {step} saved; exiting for requeue")
    raise SystemExit(REQUEUE)


EpochHook = Callable[[dict[str, Any], Path], None]


def fit(cfg: TrainConfig, on_epoch_end: EpochHook | None = None) -> dict[str, Any]:
    """Train as ``cfg`` says, resuming if the run dir holds a checkpoint.

    Args:
        cfg: The run's configuration.
        on_epoch_end: Called on every rank after each epoch's validation and epoch-end
            checkpoint with the epoch's row of metrics and that checkpoint's directory
            (Ray Tune reports through it).

    Returns:
        The summary also written to ``metrics.json``.
    """
    # Slurm's pre-emption warning (USR1) or SIGTERM: checkpoint at the next step and exit
    # with the requeue code. Signals reach only the main thread (not Ray Tune's trial threads).
    main_thread = threading.current_thread() is threading.main_thread()
    preempt = install_preemption_handler() if main_thread else None
    try:
        return _fit(cfg, on_epoch_end, preempt)
    finally:
        if preempt is not None:
            preempt.restore()


def _fit(
    cfg: TrainConfig, on_epoch_end: EpochHook | None, preempt: Preemption | None
) -> dict[str, Any]:
    info = init_distributed(cfg.train.device)
    # train.threads=0 resolves to a count that is part of the run's name: resolve it before
    # naming the directory to lock, or the lock and the run would be different directories.
    cfg = apply_threads(cfg)
    # Held until the run ends or fails (or its process dies): a second fit on this run dir
    # fails at once instead of interleaving its checkpoints with this one's.
    with locked_run_dir(run_dir_of(cfg), info.is_main):
        run = build_run(cfg)
        try:
            for epoch in range(run.state.epoch, cfg.train.epochs):
                run.state.epoch = epoch
                train_loss = _train_epoch(run, preempt)
                if _end_epoch(run, train_loss, on_epoch_end, preempt):
                    break
            return _finish(run)
        except BaseException as exc:  # the MLflow run ends as failed (killed: pre-empted)
            run.rundir.abort(exc)
            raise


@dataclass
class _EpochProgress:
    """Running totals of one epoch's training: the logs' loss and throughput, and resume's."""

    loss_sum: torch.Tensor  # sum of the micro-batch losses, on the device (no sync per step)
    samples: int = 0  # samples seen on this rank since this process started the epoch
    start: float = field(default_factory=time.perf_counter)
    window: torch.Tensor | None = None  # loss sum of the accumulation window in progress
    skipped: int = 0  # micro-steps of skipped (non-finite) windows, left out of loss_sum

    def add(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss, into the window in progress."""
        loss = loss.detach().float()
        self.window = loss if self.window is None else self.window + loss

    def mean(self, micro: int) -> float:
        """Mean micro-batch loss of the epoch's ``micro`` steps so far (nan when none count)."""
        counted = micro - self.skipped
        return self.loss_sum.item() / counted if counted > 0 else float("nan")


def _train_epoch(run: Run, preempt: Preemption | None) -> float:
    """The epoch's micro-steps from where the state stands; returns its mean train loss."""
    st, b = run.state, run.backend
    run.train_loader.set_epoch(st.epoch)
    b.train()
    bar = progress_report(
        run.micro_per_epoch, f"epoch {st.epoch}", initial=st.micro, disable=not run.info.is_main
    )
    progress = _EpochProgress(torch.tensor(st.epoch_loss if st.micro else 0.0, device=b.device))
    batches = _rng_neutral(itertools.islice(run.train_loader, run.micro_per_epoch - st.micro))
    with bar:  # closed on an error too, so that the error is the log's last line
        for batch in batches:
            with b.micro_step():
                loss, n = run.task.train_loss(b, batch)
                b.backward(loss)
            progress.add(loss)
            progress.samples += n
            st.micro += 1
            bar.update()
            if b.at_boundary() and not _window_is_finite(run, progress):
                b.skip_step()
            elif b.step():
                _after_optimizer_step(run, progress, bar, preempt)
    return progress.mean(st.micro)


def _window_is_finite(run: Run, progress: _EpochProgress) -> bool:
    """Whether every rank's loss of this accumulation window is finite (collective).

    All ranks decide together from every rank's value: under DDP a nan on one rank reaches
    every rank's gradients through the all-reduce. A finite window joins the epoch's loss sum;
    a non-finite one stops the run (``train.nonfinite_loss: stop``) or is left out of it.

    Raises:
        NonFiniteLoss: Naming the step, epoch, loss and a remedy, under ``stop``.
    """
    assert progress.window is not None
    window, progress.window = progress.window, None
    losses = all_gather_floats(window)
    if all(map(math.isfinite, losses)):
        progress.loss_sum += window
        return True
    st, t = run.state, run.cfg.train
    bad = [(rank, v / t.grad_accum) for rank, v in enumerate(losses) if not math.isfinite(v)]
    where = ", ".join(f"{v} on rank {rank}" for rank, v in bad)
    what = (
        f"training loss is not finite at optimizer step {st.step + 1} (epoch {st.epoch}, "
        f"micro-step {st.micro} of {run.micro_per_epoch}): {where}"
    )
    if t.nonfinite_loss == "stop":
        hints = [f"lower optim.lr (now {run.cfg.optim.lr:g})"]
        hints += ["set train.clip_grad"] if not t.clip_grad else []
        hints += ["use train.precision=fp32"] if t.precision != "fp32" else []
        raise NonFiniteLoss(
            f"{what}. The run has diverged: {', '.join(hints)}; or set "
            "train.nonfinite_loss=skip to skip such steps"
        )
    progress.skipped += t.grad_accum
    print0(f"warning: {what}; step skipped (train.nonfinite_loss=skip)")
    return False


def _after_optimizer_step(
    run: Run, progress: _EpochProgress, bar: Progress, preempt: Preemption | None
) -> None:
    """Schedule, EMA, logs, then a mid-epoch checkpoint when due or when pre-empted."""
    st = run.state
    st.step += 1
    run.schedule.step()
    if run.ema is not None:
        broadcast_buffers(run.backend.module)
        run.ema.update(run.backend.module, step=st.step)
    if st.step % run.cfg.train.log_every == 0:
        _log_train(run, progress, bar)
    every = run.cfg.checkpoint.save_every_steps
    mid_epoch = st.micro < run.micro_per_epoch
    stop = mid_epoch and preempt is not None and any_rank_requested(preempt)  # collective
    if (stop or (every and st.step % every == 0)) and mid_epoch:
        st.epoch_loss = progress.loss_sum.item()
        _save(run, epoch_end=False, metric=None)
    if stop:
        _exit_for_requeue(st.step)


def _log_train(run: Run, progress: _EpochProgress, bar: Progress) -> None:
    """Training loss, LR and throughput to the progress bar and TensorBoard."""
    st = run.state
    rate = progress.samples * run.info.world_size / (time.perf_counter() - progress.start)
    loss, lr = progress.mean(st.micro), run.schedule.lr()
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.0f}")
    bar.refresh()  # in a log file: one line per log interval
    logs = {"train/loss": loss, "train/lr": lr, "train/samples_per_s": rate}
    run.rundir.log_scalars(st.step, logs)


def _end_epoch(
    run: Run, train_loss: float, on_epoch_end: EpochHook | None, preempt: Preemption | None
) -> bool:
    """Validate, record, write the epoch's files and checkpoint, call the hook.

    Returns:
        Whether early stopping ends training here.
    """
    st, b, t = run.state, run.backend, run.cfg.train
    broadcast_buffers(b.module)
    eval_model = run.ema.module if run.ema is not None else b.module
    results = validate(run.task, eval_model, run.val_loader, b.to_input, b.autocast, b.device)
    value = _metric_value(run, results)
    run.schedule.step_epoch(value)
    row = {
        "epoch": st.epoch,
        "step": st.step,
        "train_loss": train_loss,
        "lr": run.schedule.lr(),
        **scalars(results, "val_"),
    }
    st.end_epoch(row, value, results, run.mode)
    print0(f"epoch {st.epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
    run.rundir.log_scalars(st.step, {f"epoch/{k}": v for k, v in row.items()})
    if run.info.is_main:
        run.rundir.write_history(st.history)
        run.task.write_reports(run.rundir.path, run.cfg.data.val_split, results)
    st.micro = 0
    saved_at = _save(run, epoch_end=True, metric=value)
    if on_epoch_end is not None:
        on_epoch_end(row, saved_at)
    if preempt is not None and st.epoch + 1 < t.epochs and any_rank_requested(preempt):
        _exit_for_requeue(st.step)
    if t.early_stop.patience and st.bad_epochs >= t.early_stop.patience:
        print0(f"early stop: {run.metric} did not improve for {st.bad_epochs} epochs")
        return True
    return False


def _metric_value(run: Run, results: dict[str, Any]) -> float:
    """The validation value of the run's metric.

    Raises:
        ConfigError: When the validation does not report it (a misspelt
            ``train.early_stop.metric`` would otherwise read as nan: it never improves, so early
            stopping ends the run, checkpoints rank by nan and the plateau never acts).
    """
    if run.metric not in results:
        names = sorted(scalars(results))
        close = difflib.get_close_matches(run.metric, names, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"train.early_stop.metric: the validation reports no metric {run.metric!r}{hint}; "
            f"it reports: {', '.join(names)}"
        )
    return float(results[run.metric])


def _finish(run: Run) -> dict[str, Any]:
    """Write ``metrics.json`` and close the run directory; returns the summary."""
    st = run.state
    summary = {
        "metric": run.metric,
        "mode": run.mode,
        "best_epoch": st.best_epoch,
        "best_value": st.best,
        "best": st.best_metrics,
        "final": st.last_metrics,
        "epochs_run": len(st.history),
        "steps": st.step,
        "threads": run.cfg.train.threads,
        "run_dir": str(run.rundir.path),
    }
    run.rundir.write_metrics(summary)
    run.rundir.close()
    return summary


def evaluate(
    checkpoint: str | Path,
    split: str = "test",
    out_dir: str | Path | None = None,
    overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Evaluate a checkpoint on one split (collective; works under torchrun too).

    Args:
        checkpoint: Checkpoint directory, ``checkpoints/`` folder or run directory.
        split: Split to evaluate.
        out_dir: Where ``metrics_<split>.json``, predictions and the confusion PNG go; default
            ``<run dir>/eval-<split>``.
        overrides: ``dotted.key=value`` changes to the saved config (e.g. ``data.root=...``).

    Returns:
        The task's results.
    """
    ckpt = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt)
    if overrides:
        cfg = config_from_dict(
            TrainConfig, apply_overrides(config_to_dict(cfg), overrides, TrainConfig)
        )
    if cfg.task == "classify":
        # Outputs are class indices: a permuted class list would score every prediction wrong.
        check_classes(ckpt, cfg.data.root, read_index(cfg.data.root).classes)
    info = init_distributed(cfg.train.device)
    cfg = apply_threads(cfg)
    task = create_task(cfg, ckpt.classes)
    # The weights come from the checkpoint: no initialisation file (a pretrained_path, a tsr
    # run's model.sr_init) is read, it may be gone by now.
    model = task.build_model(pretrained=False)
    model.load_state_dict(load_fp32_weights(ckpt))
    fmt = torch.channels_last if cfg.model.channels_last else torch.preserve_format
    model = model.to(info.device, memory_format=fmt)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return x.to(info.device, memory_format=fmt if x.ndim == 4 else torch.preserve_format)

    loader = _loader(cfg, task, split, False, info)
    amp = functools.partial(precision_autocast, info.device, cfg.train.precision)
    results = validate(task, model, loader, prepare, amp, info.device)
    out = Path(out_dir) if out_dir else eval_dir_of(ckpt.path.parent.parent, split)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(eval_metrics_path(out, split), {"checkpoint": str(ckpt.path), **results})
        task.write_reports(out, split, results)
        print0(f"{split}: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars(results).items()))
    return results
