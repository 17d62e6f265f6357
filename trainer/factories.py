"""Builders for the model, optimizer and learning-rate schedule, from the config sections.

Models come from timm by name and never download weights. A classifier has one input channel
per image its input kind stacks (:func:`create_classifier`: two for ``lr|sr``, else one); a
local ImageNet weights file is adapted to that count with timm's ``adapt_input_conv`` (one
channel: the sum over the RGB filters; two: the RGB filters repeated, scaled by 3/2).
Optimizers come from timm's ``create_optimizer_v2`` (no weight decay on norms and biases).
Schedules are torch's LR schedulers, stepped once per optimizer step, behind
:class:`LRSchedule`, which adds the warmup and the per-epoch plateau step.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Literal

import timm
import torch
from timm.models import adapt_input_conv
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from torch import nn
from torch.optim import lr_scheduler

from srmri.torchfile import load_state_dict_file
from trainer.config import ModelConfig, OptimConfig, SchedConfig, TrainConfig
from trainer.input_kind import input_channels

__all__ = [
    "LRSchedule",
    "create_classifier",
    "create_model",
    "create_optimizer",
    "create_scheduler",
]


def create_model(cfg: ModelConfig, num_classes: int, in_chans: int = 1) -> nn.Module:
    """A timm model with ``in_chans`` inputs, optionally initialised from a local weights file.

    Args:
        cfg: The model section: timm ``name``, ``drop_rate`` before the classifier, and
            ``pretrained_path``, local weights of any channel count (the first conv is adapted,
            a classifier of another size is dropped). Nothing is ever downloaded.
        num_classes: Output classes.
        in_chans: Input channels (1 for one greyscale MRI image; see
            :func:`create_classifier` for the count an input kind needs).

    Returns:
        The model, in train mode, on the CPU.

    Raises:
        ValueError: On an unknown model name or unusable weights.
    """
    if not timm.is_model(cfg.name):
        close = timm.list_models(f"*{cfg.name}*")[:5]
        raise ValueError(f"model.name: unknown timm model {cfg.name!r}; close names: {close}")
    model = timm.create_model(
        cfg.name,
        pretrained=False,
        num_classes=num_classes,
        in_chans=in_chans,
        drop_rate=cfg.drop_rate,
    )
    if cfg.pretrained_path:
        _load_pretrained(model, cfg, in_chans)
    return model


def create_classifier(cfg: TrainConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    """The classifier a run config describes, with the input channels its input kind needs.

    Training, evaluation, ``trainer predict`` and ``trainer export`` all build the network
    here from the run's (saved) config, so a checkpoint always gets back the network it was
    trained as: ``data.inputs`` decides ``in_chans`` (:func:`trainer.input_kind.input_channels`).

    Args:
        cfg: The run config (its ``model`` section and ``data.inputs``).
        num_classes: Output classes.
        pretrained: Initialise from ``model.pretrained_path`` when set; False where trained
            weights are loaded next (the pretrained file may be gone by then).

    Returns:
        The model, in train mode, on the CPU.

    Raises:
        ValueError: On an unknown model name, input kind or unusable weights.
    """
    model_cfg = cfg.model if pretrained else dataclasses.replace(cfg.model, pretrained_path=None)
    return create_model(model_cfg, num_classes, in_chans=len(input_channels(cfg.data.inputs)))


def _load_pretrained(model: nn.Module, cfg: ModelConfig, in_chans: int) -> None:
    """Load ``cfg.pretrained_path`` into ``model``: first conv adapted, other heads dropped."""
    path = cfg.pretrained_path
    state = load_state_dict_file(path)
    pretrained_cfg = getattr(model, "pretrained_cfg", {}) or {}
    first = pretrained_cfg.get("first_conv")
    for conv in [first] if isinstance(first, str) else list(first or []):
        key = f"{conv}.weight"
        if key in state and state[key].shape[1] != in_chans:
            state[key] = adapt_input_conv(in_chans, state[key])
    own = model.state_dict()
    dropped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in dropped:  # e.g. the 1000-class ImageNet head
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if k not in set(dropped)]
    if bad or unexpected:
        raise ValueError(
            f"{path}: weights do not fit {cfg.name}: missing {bad[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )


def create_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD over ``model``'s parameters (no weight decay on norms and biases).

    Args:
        model: The (unwrapped) model.
        cfg: The ``optim`` section: name (adamw, adam or sgd), peak ``lr``, ``weight_decay``
            (decoupled for adamw, L2 for adam and sgd), SGD ``momentum``/``nesterov``, Adam
            ``betas``.

    Returns:
        The optimizer.

    Raises:
        ValueError: On an unknown optimizer name.
    """
    weight_decay = cfg.weight_decay

    def groups(module: nn.Module) -> list[dict[str, Any]]:
        # Always the two timm groups, each marked: the group structure must not depend on
        # the decay's value, or a run resumed with another optim.weight_decay (PBT) could not
        # load its optimizer state, nor tell which group takes the new decay.
        made = param_groups_weight_decay(module, 1.0)  # 1.0 only marks which group decays
        for group in made:
            group["decay"] = group["weight_decay"] > 0
            group["weight_decay"] = weight_decay if group["decay"] else 0.0
        return made

    common: dict[str, Any] = {"lr": cfg.lr, "weight_decay": weight_decay, "param_group_fn": groups}
    if cfg.name == "sgd":
        opt = "sgd" if cfg.nesterov else "momentum"  # timm: "sgd" is Nesterov, "momentum" is not
        return create_optimizer_v2(model, opt=opt, momentum=cfg.momentum, **common)
    if cfg.name in ("adam", "adamw"):
        return create_optimizer_v2(model, opt=cfg.name, betas=tuple(cfg.betas), **common)
    raise ValueError(f"optim.name: {cfg.name!r} is not adamw, adam or sgd")


class LRSchedule:
    """A per-optimizer-step LR schedule with linear warmup, plus the plateau's epoch step.

    Args:
        optimizer: The optimizer whose param-group ``lr`` is driven.
        main: Scheduler stepped every optimizer step (may include the warmup), or None.
        warmup: Warmup stepped for ``warmup_steps`` (plateau only), or None.
        warmup_steps: Length of that warmup.
        plateau: ReduceLROnPlateau stepped per epoch with the validation metric, or None.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        main: lr_scheduler.LRScheduler | None,
        warmup: lr_scheduler.LRScheduler | None = None,
        warmup_steps: int = 0,
        plateau: lr_scheduler.ReduceLROnPlateau | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.main = main
        self.warmup = warmup
        self.warmup_steps = warmup_steps
        self.plateau = plateau
        self.steps = 0

    def step(self) -> None:
        """Advance one optimizer step."""
        self.steps += 1
        if self.main is not None:
            self.main.step()
        elif self.warmup is not None and self.steps <= self.warmup_steps:
            self.warmup.step()

    def fast_forward(self, steps: int) -> None:
        """Advance ``steps`` optimizer steps without training (a schedule rebuilt on resume).

        Args:
            steps: Optimizer steps the run has already done.
        """
        with warnings.catch_warnings():
            # Stepping the schedulers of an optimizer that has not stepped yet is the point here.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step")
            for _ in range(steps):
                self.step()

    def step_epoch(self, metric: float | None) -> None:
        """End of an epoch: the plateau schedule looks at the validation metric."""
        if self.plateau is not None and metric is not None and self.steps >= self.warmup_steps:
            self.plateau.step(metric)

    def lr(self) -> float:
        """Current learning rate of the first param group."""
        return float(self.optimizer.param_groups[0]["lr"])

    def rescale(self, factor: float) -> None:
        """Multiply the whole schedule, past and future, by ``factor`` (a changed peak LR).

        A run resumed with another ``optim.lr`` (a PBT mutation, or a user's override) restores
        the checkpoint's schedule state, whose base LRs are the old peak's: scaling the current
        LR, the schedulers' base LRs and OneCycle's anchors puts the run on the schedule that
        the new peak would have given at the same step. ``min_lr`` floors stay as configured.

        Args:
            factor: New peak LR over the old one.
        """
        for group in self.optimizer.param_groups:
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                if key in group:
                    group[key] *= factor
        for part in (self.main, self.warmup, self.plateau):
            if part is None:
                continue
            for sched in (part, *getattr(part, "_schedulers", ())):  # SequentialLR's parts too
                if hasattr(sched, "base_lrs"):
                    sched.base_lrs = [b * factor for b in sched.base_lrs]
                if hasattr(sched, "_last_lr"):
                    sched._last_lr = [lr * factor for lr in sched._last_lr]

    def state_dict(self) -> dict[str, Any]:
        """Tensors and primitives only (loadable with ``weights_only=True``)."""
        return {
            "steps": self.steps,
            "main": self.main.state_dict() if self.main is not None else None,
            "warmup": self.warmup.state_dict() if self.warmup is not None else None,
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.steps = int(state["steps"])
        for name in ("main", "warmup", "plateau"):
            part = getattr(self, name)
            if part is not None and state.get(name) is not None:
                part.load_state_dict(state[name])


def _onecycle(
    optimizer: torch.optim.Optimizer, cfg: SchedConfig, lr: float, total: int, warm: int
) -> lr_scheduler.OneCycleLR:
    """OneCycle over ``total`` steps whose rise lasts the warmup (at least 2 steps)."""
    start = min(1.0, max(cfg.warmup_lr / lr, 1e-8))
    initial = lr * start if warm > 0 else lr / 25.0
    return lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=lr,
        total_steps=total,
        # Each phase needs >= 2 steps: OneCycleLR divides by (phase end - phase start).
        pct_start=min(max(warm, 2), total - 2) / total,
        anneal_strategy="cos",
        div_factor=lr / initial,
        final_div_factor=initial / max(cfg.min_lr, initial * 1e-4),
    )


def create_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: SchedConfig,
    *,
    lr: float,
    epochs: int,
    steps_per_epoch: int,
    mode: Literal["max", "min"] = "max",
    at_step: int = 0,
) -> LRSchedule:
    """Build the schedule; every kind starts with a linear warmup from ``warmup_lr`` to ``lr``.

    With ``at_step`` the schedule is the one a run of this length would be on after that many
    optimizer steps: a run resumed with a longer ``train.epochs`` continues along the longer
    schedule from the step it reached, without a second warmup. The optimizer's param groups
    (restored from a checkpoint of the old schedule) are reset to ``lr`` first. The plateau
    schedule's epoch state (its reductions) is not replayed; it does not depend on the length.

    Args:
        optimizer: The optimizer (its param groups' ``lr`` must equal ``lr``).
        cfg: The ``sched`` section: name (cosine, step, onecycle, plateau or constant), warmup
            (``warmup_epochs``, fractions allowed, from ``warmup_lr``), ``min_lr`` (final LR of
            cosine/onecycle, floor of plateau), step's ``step_epochs``/``gamma``, plateau's
            ``patience``/``factor``.
        lr: Peak learning rate (``optim.lr``).
        epochs: Training epochs.
        steps_per_epoch: Optimizer steps per epoch.
        mode: plateau: whether the validation metric is maximised or minimised.
        at_step: Optimizer steps already done (0: a new run).

    Returns:
        The schedule, at step ``at_step``.

    Raises:
        ValueError: On an unknown schedule name.
    """
    if at_step:
        # torch's schedulers keep an ``initial_lr`` already in a group (setdefault): the old
        # schedule's anchors must go, or the rebuilt one would start from the old peak's state.
        for group in optimizer.param_groups:
            group["lr"] = lr
            for key in ("initial_lr", "max_lr", "min_lr"):
                group.pop(key, None)
    schedule = _schedule(
        optimizer, cfg, lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch, mode=mode
    )
    schedule.fast_forward(at_step)
    return schedule


def _schedule(
    optimizer: torch.optim.Optimizer,
    cfg: SchedConfig,
    *,
    lr: float,
    epochs: int,
    steps_per_epoch: int,
    mode: Literal["max", "min"],
) -> LRSchedule:
    """The schedule of :func:`create_scheduler`, at step 0."""
    total = max(1, epochs * steps_per_epoch)
    warm = 0
    if cfg.warmup_epochs > 0:
        warm = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))
    start = min(1.0, max(cfg.warmup_lr / lr, 1e-8))

    def warmup() -> lr_scheduler.LinearLR:
        return lr_scheduler.LinearLR(optimizer, start_factor=start, total_iters=warm)

    def chained(after: lr_scheduler.LRScheduler) -> lr_scheduler.LRScheduler:
        if warm == 0:
            return after
        return lr_scheduler.SequentialLR(optimizer, [warmup(), after], milestones=[warm])

    name = cfg.name
    if name == "cosine":
        main = lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, total - warm), eta_min=cfg.min_lr
        )
        return LRSchedule(optimizer, chained(main))
    if name == "step":
        step_size = max(1, cfg.step_epochs * steps_per_epoch)
        main = lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=cfg.gamma)
        return LRSchedule(optimizer, chained(main))
    if name == "constant" or (name == "onecycle" and total < 4):
        # OneCycleLR divides by its phase lengths; with under 4 steps there is no cycle to run.
        return LRSchedule(optimizer, chained(lr_scheduler.ConstantLR(optimizer, 1.0, 0)))
    if name == "onecycle":
        return LRSchedule(optimizer, _onecycle(optimizer, cfg, lr, total, warm))
    if name == "plateau":
        plateau = lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=cfg.factor, patience=cfg.patience, min_lr=cfg.min_lr
        )
        return LRSchedule(optimizer, None, warmup() if warm else None, warm, plateau)
    raise ValueError(f"sched.name: {name!r} is not cosine, step, onecycle, plateau or constant")
