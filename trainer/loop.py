"""The one training loop: ``fit(cfg)`` for every task and backend.

``build_run`` assembles the pieces (process group, loaders, task, model, backend, schedule,
EMA, resume); ``fit`` is the loop itself: epochs of micro-steps, validation, checkpoints and
early stopping. Everything task- or backend-specific lives behind ``Task`` and ``Backend``.
"""

from __future__ import annotations

import contextlib
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

from shards.loader import ShardLoader, create_loader
from srmri.config import dump_config
from srmri.distributed import DistInfo, broadcast_buffers, init_distributed, print0
from srmri.exitcodes import REQUEUE
from trainer.backend import Backend, create_backend
from trainer.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from trainer.config import TrainConfig, run_dir_of
from trainer.factories import LRSchedule, create_optimizer, create_scheduler
from trainer.preempt import (
    Preemption,
    any_rank_requested,
    install_preemption_handler,
)
from trainer.rundir import RunDir, scalars
from trainer.task import Prepare, Task, create_task

__all__ = ["Run", "TrainState", "build_run", "evaluate", "fit", "seed_everything", "validate"]


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint (primitives only)."""

    epoch: int = 0  # epoch in progress
    micro: int = 0  # micro-steps done in that epoch
    step: int = 0  # optimizer steps done overall
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metrics: dict[str, Any] = field(default_factory=dict)
    last_metrics: dict[str, Any] = field(default_factory=dict)
    epoch_loss: float = 0.0  # sum of the epoch's micro-batch losses so far (mid-epoch resume)


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
    state: TrainState
    classes: list[str]


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


def build_run(cfg: TrainConfig) -> Run:
    """Set up a run (collective): group, loaders, task, model, backend, schedule, resume."""
    info = init_distributed(cfg.train.device)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    rundir = RunDir(run_dir_of(cfg), info.is_main)
    print0(dump_config(cfg))
    rundir.save_config(cfg)
    from shards.format import read_index

    classes = list(read_index(cfg.data.root).classes)
    task = create_task(cfg, classes)
    train_loader = _loader(cfg, task, cfg.data.train_split, True, info)
    val_loader = _loader(cfg, task, cfg.data.val_split, False, info)
    t = cfg.train
    micro = min(len(train_loader), t.max_steps_per_epoch or len(train_loader))
    micro -= micro % t.grad_accum  # whole accumulation windows only: both backends agree
    if micro == 0:
        raise ValueError(
            f"{cfg.data.root}: an epoch has {len(train_loader)} batches, fewer than "
            f"train.grad_accum={t.grad_accum}; lower grad_accum or data.batch_size"
        )
    model = task.build_model()
    o = cfg.optim
    optimizer = create_optimizer(
        model, o.name, o.lr, o.weight_decay, o.momentum, o.nesterov, o.betas
    )
    backend = create_backend(
        cfg.backend, model, optimizer, info.device, t.precision, t.grad_accum, t.clip_grad,
        cfg.data.batch_size, cfg.model.channels_last, cfg.model.compile,
    )  # fmt: skip
    metric = t.early_stop.metric or task.best_metric
    mode = t.early_stop.mode if t.early_stop.metric else task.best_mode
    s = cfg.sched
    schedule = create_scheduler(
        backend.optimizer, s.name, o.lr, t.epochs, micro // t.grad_accum, s.warmup_epochs,
        s.warmup_lr, s.min_lr, s.step_epochs, s.gamma, s.patience, s.factor, mode,  # type: ignore[arg-type]
    )  # fmt: skip
    ema = ModelEmaV3(backend.module, decay=t.ema_decay) if t.ema_decay else None
    run = Run(cfg, info, rundir, task, train_loader, val_loader, backend, schedule, ema, micro,
              metric, mode, TrainState(), classes)  # fmt: skip
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
    info, saved, mine = load_checkpoint(found.path, run.backend, run.info.rank)
    if info.world_size != run.info.world_size:
        print0(f"warning: {found.path} was written by {info.world_size} ranks; resuming on "
               f"{run.info.world_size} restarts its epoch's data order")  # fmt: skip
    run.schedule.load_state_dict(saved["schedule"])
    if run.ema is not None and saved.get("ema") is not None:
        run.ema.load_state_dict(saved["ema"])
    _apply_changed_hparams(run, saved.get("hparams"))
    run.state = TrainState(**saved["state"])
    if info.epoch_end:
        run.state.epoch, run.state.micro = info.epoch + 1, 0
    elif mine is not None and info.world_size == run.info.world_size:
        run.train_loader.load_state_dict(mine["loader"])
    else:
        run.state.micro = 0
    if mine is not None:
        set_rng_state(mine["rng"])
    print0(f"resumed from {found.path} (epoch {run.state.epoch}, step {run.state.step})")


def _apply_changed_hparams(run: Run, saved: dict[str, float] | None) -> None:
    """Make ``optim.lr`` / ``optim.weight_decay`` of this run's config win over the checkpoint's.

    Resuming restores the optimizer's param groups and the schedule as they were saved; a PBT
    exploit (or a user's override on resume) that changed either value would otherwise do
    nothing. The LR schedule is rescaled by new/old peak; weight decay is set on the groups
    :func:`trainer.factories.create_optimizer` marked as decaying (norms and biases keep none).
    """
    if not saved:
        return
    o = run.cfg.optim
    if o.lr != saved["lr"]:
        run.schedule.rescale(o.lr / saved["lr"])
        print0(f"optim.lr changed since the checkpoint ({saved['lr']:g} -> {o.lr:g}): "
               "the LR schedule is rescaled")  # fmt: skip
    if o.weight_decay != saved["weight_decay"]:
        for group in run.backend.optimizer.param_groups:
            if group.get("decay", True):
                group["weight_decay"] = o.weight_decay
        print0(f"optim.weight_decay changed since the checkpoint ({saved['weight_decay']:g} -> "
               f"{o.weight_decay:g})")  # fmt: skip


def _save(run: Run, epoch_end: bool, metric: float | None) -> Path:
    st = run.state
    saved = {
        "hparams": {"lr": run.cfg.optim.lr, "weight_decay": run.cfg.optim.weight_decay},
        "state": {k: getattr(st, k) for k in TrainState.__dataclass_fields__},
        "schedule": run.schedule.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
    }
    mine = {"rng": rng_state(), "loader": run.train_loader.state_dict()}
    path = save_checkpoint(
        run.rundir.checkpoints, st.step, st.epoch, epoch_end, run.backend, saved, mine, run.cfg,
        run.cfg.backend.name, run.classes, metric, run.info.rank, run.info.world_size,
    )  # fmt: skip
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
    """One synchronised validation pass (collective); returns the task's results."""
    was_training = model.training
    model.eval()
    task.eval_reset(device)
    with torch.no_grad(), autocast():
        for batch in _rng_neutral(loader):
            task.eval_update(model, batch, prepare)
    model.train(was_training)
    return task.eval_compute()


def _rng_neutral(loader: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
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


def _improved(value: float, best: float | None, mode: str) -> bool:
    if value != value:  # nan never improves
        return False
    return best is None or (value > best if mode == "max" else value < best)


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


def _fit(cfg: TrainConfig, on_epoch_end: EpochHook | None, preempt: Preemption | None) -> dict:
    run = build_run(cfg)
    st, b, t = run.state, run.backend, cfg.train
    eval_model = run.ema.module if run.ema is not None else b.module
    for epoch in range(st.epoch, t.epochs):
        st.epoch = epoch
        run.train_loader.set_epoch(epoch)
        b.train()
        bar = tqdm(total=run.micro_per_epoch, initial=st.micro, desc=f"epoch {epoch}",
                   disable=not run.info.is_main, dynamic_ncols=True)  # fmt: skip
        loss_sum = torch.tensor(st.epoch_loss if st.micro else 0.0, device=b.device)
        n_seen = 0
        t0 = time.perf_counter()
        batches = _rng_neutral(itertools.islice(run.train_loader, run.micro_per_epoch - st.micro))
        for batch in batches:
            with b.micro_step():
                loss, n = run.task.train_loss(b, batch)
                b.backward(loss)
            loss_sum += loss.detach().float()
            n_seen, st.micro = n_seen + n, st.micro + 1
            bar.update()
            if not b.step():
                continue
            st.step += 1
            run.schedule.step()
            if run.ema is not None:
                broadcast_buffers(b.module)
                run.ema.update(b.module, step=st.step)
            if st.step % t.log_every == 0:
                rate = n_seen * run.info.world_size / (time.perf_counter() - t0)
                logs = {"train/loss": loss_sum.item() / st.micro, "train/lr": run.schedule.lr(),
                        "train/samples_per_s": rate}  # fmt: skip
                bar.set_postfix(loss=f"{logs['train/loss']:.4f}", lr=f"{logs['train/lr']:.2e}",
                                sps=f"{rate:.0f}")  # fmt: skip
                run.rundir.log_scalars(st.step, logs)
            every = cfg.checkpoint.save_every_steps
            mid_epoch = st.micro < run.micro_per_epoch
            stop = mid_epoch and preempt is not None and any_rank_requested(preempt)
            if (stop or (every and st.step % every == 0)) and mid_epoch:
                st.epoch_loss = loss_sum.item()
                _save(run, epoch_end=False, metric=None)
            if stop:
                _exit_for_requeue(st.step)
        bar.close()
        broadcast_buffers(b.module)
        results = validate(run.task, eval_model, run.val_loader, b.to_input, b.autocast, b.device)
        value = float(results.get(run.metric, float("nan")))
        run.schedule.step_epoch(value)
        row = {"epoch": epoch, "step": st.step, "train_loss": loss_sum.item() / st.micro,
               "lr": run.schedule.lr(), **scalars(results, "val_")}  # fmt: skip
        st.history.append(row)
        if _improved(value, st.best, run.mode):
            st.best, st.best_epoch, st.bad_epochs, st.best_metrics = value, epoch, 0, results
        else:
            st.bad_epochs += 1
        st.last_metrics = results
        print0(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
        run.rundir.log_scalars(st.step, {f"epoch/{k}": v for k, v in row.items()})
        if run.info.is_main:
            run.rundir.write_history(st.history)
            run.task.write_reports(run.rundir.path, cfg.data.val_split, results)
        st.micro = 0
        saved_at = _save(run, epoch_end=True, metric=value)
        if on_epoch_end is not None:
            on_epoch_end(row, saved_at)
        if preempt is not None and epoch + 1 < t.epochs and any_rank_requested(preempt):
            _exit_for_requeue(st.step)
        if t.early_stop.patience and st.bad_epochs >= t.early_stop.patience:
            print0(f"early stop: {run.metric} did not improve for {st.bad_epochs} epochs")
            break
    summary = {"metric": run.metric, "mode": run.mode, "best_epoch": st.best_epoch,
               "best_value": st.best, "best": st.best_metrics, "final": st.last_metrics,
               "epochs_run": len(st.history), "steps": st.step,
               "run_dir": str(run.rundir.path)}  # fmt: skip
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
    from srmri.config import apply_overrides, config_from_dict, config_to_dict
    from trainer.export import checkpoint_config, load_fp32_weights

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
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)

    def autocast() -> contextlib.AbstractContextManager[None]:
        return torch.autocast(info.device.type, dtype=dtype, enabled=dtype is not None)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return x.to(info.device, memory_format=fmt if x.ndim == 4 else torch.preserve_format)

    loader = _loader(cfg, task, split, False, info)
    results = validate(task, model, loader, prepare, autocast, info.device)
    out = Path(out_dir) if out_dir else ckpt.path.parent.parent / f"eval-{split}"
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        from trainer.rundir import write_json

        write_json(out / f"metrics_{split}.json", {"checkpoint": str(ckpt.path), **results})
        task.write_reports(out, split, results)
        print0(f"{split}: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars(results).items()))
    return results
