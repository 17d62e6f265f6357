"""The one training loop: ``fit(cfg)`` for every task and backend.

``build_run`` assembles the pieces (process group, loaders, task, model, backend, schedule,
EMA, resume); ``fit`` is the loop itself: epochs of micro-steps (:func:`_train_epoch`), then
validation, bookkeeping, the epoch-end checkpoint and early stopping (:func:`_end_epoch`).
Everything task- or backend-specific lives behind ``Task`` and ``Backend``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
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
from tqdm import tqdm

from shards.format import read_index
from shards.loader import ShardLoader, create_loader
from srmri.config import apply_overrides, config_from_dict, config_to_dict, dump_config
from srmri.distributed import DistInfo, broadcast_buffers, init_distributed, print0
from srmri.exitcodes import REQUEUE
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
from trainer.export import checkpoint_config, load_fp32_weights
from trainer.factories import LRSchedule, create_optimizer, create_scheduler
from trainer.precision import autocast as precision_autocast
from trainer.preempt import (
    Preemption,
    any_rank_requested,
    install_preemption_handler,
)
from trainer.rundir import RunDir, eval_dir_of, eval_metrics_path, scalars, write_json
from trainer.state import OptimHParams, TrainState
from trainer.task import Prepare, Task, create_task

__all__ = ["Run", "TrainState", "build_run", "evaluate", "fit", "seed_everything", "validate"]


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
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    rundir = RunDir(run_dir_of(cfg), info.is_main)
    print0(dump_config(cfg))
    rundir.save_config(cfg)
    classes = list(read_index(cfg.data.root).classes)
    task = create_task(cfg, classes)
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
    )
    _maybe_resume(run)
    return run


def _maybe_resume(run: Run) -> None:
    """Restore the newest checkpoint of the run dir (``resume: auto``) or a given one."""
    how = run.cfg.train.resume
    if how == "never":
        return
    found = latest_checkpoint(run.rundir.checkpoints) if how == "auto" else resolve_checkpoint(how)
    if found is None:
        return
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
    _apply_changed_hparams(run)
    st = run.state
    if info.epoch_end:
        st.epoch, st.micro = info.epoch + 1, 0
    elif not (restored and same_world):
        st.micro = 0  # no loader position for this rank: the epoch restarts
    print0(f"resumed from {found.path} (epoch {st.epoch}, step {st.step})")


def _apply_changed_hparams(run: Run) -> None:
    """Make ``optim.lr`` / ``optim.weight_decay`` of this run's config win over the checkpoint's.

    Resuming restores the optimizer's param groups and the schedule as they were saved; a PBT
    exploit (or a user's override on resume) that changed either value would otherwise do
    nothing. The LR schedule is rescaled by new/old peak; weight decay is set on the groups
    :func:`trainer.factories.create_optimizer` marked as decaying (norms and biases keep none).
    """
    saved = run.hparams.saved
    if not saved:
        return
    o = run.cfg.optim
    if o.lr != saved["lr"]:
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
    marker = CheckpointMarker(
        step=st.step,
        epoch=st.epoch,
        epoch_end=epoch_end,
        metric=metric,
        world_size=run.info.world_size,
        backend=run.cfg.backend.name,
        classes=run.classes,
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
    run = build_run(cfg)
    for epoch in range(run.state.epoch, cfg.train.epochs):
        run.state.epoch = epoch
        train_loss = _train_epoch(run, preempt)
        if _end_epoch(run, train_loss, on_epoch_end, preempt):
            break
    return _finish(run)


@dataclass
class _EpochProgress:
    """Running totals of one epoch's training: the logs' loss and throughput, and resume's."""

    loss_sum: torch.Tensor  # sum of the micro-batch losses, on the device (no sync per step)
    samples: int = 0  # samples seen on this rank since this process started the epoch
    start: float = field(default_factory=time.perf_counter)


def _train_epoch(run: Run, preempt: Preemption | None) -> float:
    """The epoch's micro-steps from where the state stands; returns its mean train loss."""
    st, b = run.state, run.backend
    run.train_loader.set_epoch(st.epoch)
    b.train()
    bar = tqdm(
        total=run.micro_per_epoch,
        initial=st.micro,
        desc=f"epoch {st.epoch}",
        disable=not run.info.is_main,
        dynamic_ncols=True,
    )
    progress = _EpochProgress(torch.tensor(st.epoch_loss if st.micro else 0.0, device=b.device))
    batches = _rng_neutral(itertools.islice(run.train_loader, run.micro_per_epoch - st.micro))
    for batch in batches:
        with b.micro_step():
            loss, n = run.task.train_loss(b, batch)
            b.backward(loss)
        progress.loss_sum += loss.detach().float()
        progress.samples += n
        st.micro += 1
        bar.update()
        if b.step():
            _after_optimizer_step(run, progress, bar, preempt)
    bar.close()
    return progress.loss_sum.item() / st.micro


def _after_optimizer_step(
    run: Run, progress: _EpochProgress, bar: tqdm, preempt: Preemption | None
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


def _log_train(run: Run, progress: _EpochProgress, bar: tqdm) -> None:
    """Training loss, LR and throughput to the progress bar and TensorBoard."""
    st = run.state
    rate = progress.samples * run.info.world_size / (time.perf_counter() - progress.start)
    loss, lr = progress.loss_sum.item() / st.micro, run.schedule.lr()
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.0f}")
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
    value = float(results.get(run.metric, float("nan")))
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
    info = init_distributed(cfg.train.device)
    task = create_task(cfg, ckpt.classes)
    model = task.build_model()
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
