"""Builders for the model, optimizer and learning-rate schedule, from typed arguments.

Models come from timm by name with one input channel and never download weights; a local
ImageNet weights file is adapted to one channel with timm's ``adapt_input_conv`` (the sum over
the RGB filters). Optimizers come from timm's ``create_optimizer_v2`` (no weight decay on norms
and biases). Schedules are torch's LR schedulers, stepped once per optimizer step, behind
:class:`LRSchedule`, which adds the warmup and the per-epoch plateau step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.models import adapt_input_conv
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from torch import nn
from torch.optim import lr_scheduler

__all__ = ["LRSchedule", "create_model", "create_optimizer", "create_scheduler", "load_weights"]


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors from ``.safetensors`` or a torch file (``weights_only``).

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it cannot be read as a state dict of tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: weights file does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{p}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{p}: not a state dict of tensors")
    return state


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 1,
    pretrained_path: str | Path | None = None,
    drop_rate: float = 0.0,
) -> nn.Module:
    """A timm model with ``in_chans`` inputs, optionally initialised from a local weights file.

    Args:
        name: timm model name, e.g. ``resnet50``.
        num_classes: Output classes.
        in_chans: Input channels (1 for MRI).
        pretrained_path: Local weights (any channel count; the first conv is adapted, a
            classifier of another size is dropped). Never downloads.
        drop_rate: Dropout before the classifier.

    Returns:
        The model, in train mode, on the CPU.

    Raises:
        ValueError: On an unknown model name or unusable weights.
    """
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        raise ValueError(f"model.name: unknown timm model {name!r}; close names: {close}")
    model = timm.create_model(
        name, pretrained=False, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate
    )
    if pretrained_path:
        state = load_weights(pretrained_path)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        first = cfg.get("first_conv")
        firsts = [first] if isinstance(first, str) else list(first or [])
        for conv in firsts:
            key = f"{conv}.weight"
            if key in state and state[key].shape[1] != in_chans:
                state[key] = adapt_input_conv(in_chans, state[key])
        own = model.state_dict()
        dropped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        for k in dropped:  # e.g. the 1000-class ImageNet head
            del state[k]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - set(dropped):
            head = set(dropped)
            bad = [k for k in missing if k not in head]
            if bad or unexpected:
                raise ValueError(
                    f"{pretrained_path}: weights do not fit {name}: missing {bad[:5]}, "
                    f"unexpected {list(unexpected)[:5]}"
                )
    return model


def create_optimizer(
    model: nn.Module,
    name: Literal["adamw", "adam", "sgd"],
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = True,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD over ``model``'s parameters (no weight decay on norms and biases).

    Args:
        model: The (unwrapped) model.
        name: adamw, adam or sgd.
        lr: Peak learning rate.
        weight_decay: Decoupled (adamw) or L2 (adam, sgd) weight decay.
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        betas: Adam betas.

    Returns:
        The optimizer.
    """

    def groups(module: nn.Module) -> list[dict[str, Any]]:
        # Always the two timm groups, each marked: the group structure must not depend on
        # the decay's value, or a run resumed with another optim.weight_decay (PBT) could not
        # load its optimizer state, nor tell which group takes the new decay.
        made = param_groups_weight_decay(module, 1.0)  # 1.0 only marks which group decays
        for group in made:
            group["decay"] = group["weight_decay"] > 0
            group["weight_decay"] = weight_decay if group["decay"] else 0.0
        return made

    common: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay, "param_group_fn": groups}
    if name == "sgd":
        opt = "sgd" if nesterov else "momentum"  # timm: "sgd" is Nesterov, "momentum" is not
        return create_optimizer_v2(model, opt=opt, momentum=momentum, **common)
    if name in ("adam", "adamw"):
        return create_optimizer_v2(model, opt=name, betas=tuple(betas), **common)
    raise ValueError(f"optim.name: {name!r} is not adamw, adam or sgd")


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


def create_scheduler(
    optimizer: torch.optim.Optimizer,
    name: Literal["cosine", "step", "onecycle", "plateau", "constant"],
    lr: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    warmup_lr: float = 1e-6,
    min_lr: float = 0.0,
    step_epochs: int = 30,
    gamma: float = 0.1,
    patience: int = 5,
    factor: float = 0.1,
    mode: Literal["max", "min"] = "max",
) -> LRSchedule:
    """Build the schedule; every kind starts with a linear warmup from ``warmup_lr`` to ``lr``.

    Args:
        optimizer: The optimizer (its param groups' ``lr`` must equal ``lr``).
        name: cosine, step, onecycle, plateau or constant.
        lr: Peak learning rate.
        epochs: Training epochs.
        steps_per_epoch: Optimizer steps per epoch.
        warmup_epochs: Warmup length in epochs (fractions allowed).
        warmup_lr: LR at the first step of the warmup.
        min_lr: Final LR (cosine, onecycle) or floor (plateau).
        step_epochs: step: epochs between decays.
        gamma: step: decay factor.
        patience: plateau: epochs without improvement before decaying.
        factor: plateau: decay factor.
        mode: plateau: whether the validation metric is maximised or minimised.

    Returns:
        The schedule, already at step 0.
    """
    total = max(1, epochs * steps_per_epoch)
    warm = min(total - 1, round(warmup_epochs * steps_per_epoch)) if warmup_epochs > 0 else 0
    start = min(1.0, max(warmup_lr / lr, 1e-8))

    def warmup() -> lr_scheduler.LinearLR:
        return lr_scheduler.LinearLR(optimizer, start_factor=start, total_iters=warm)

    def chained(after: lr_scheduler.LRScheduler) -> lr_scheduler.LRScheduler:
        if warm == 0:
            return after
        return lr_scheduler.SequentialLR(optimizer, [warmup(), after], milestones=[warm])

    if name == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warm), eta_min=min_lr)
        return LRSchedule(optimizer, chained(main))
    if name == "step":
        main = lr_scheduler.StepLR(
            optimizer, step_size=max(1, step_epochs * steps_per_epoch), gamma=gamma
        )
        return LRSchedule(optimizer, chained(main))
    if name == "constant":
        return LRSchedule(optimizer, chained(lr_scheduler.ConstantLR(optimizer, 1.0, 0)))
    if name == "onecycle" and total < 4:
        # OneCycleLR divides by its phase lengths; with under 4 steps there is no cycle to run.
        return LRSchedule(optimizer, chained(lr_scheduler.ConstantLR(optimizer, 1.0, 0)))
    if name == "onecycle":
        initial = lr * start if warm > 0 else lr / 25.0
        cycle = lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=lr,
            total_steps=total,
            # Each phase needs >= 2 steps: OneCycleLR divides by (phase end - phase start).
            pct_start=min(max(warm, 2), total - 2) / total,
            anneal_strategy="cos",
            div_factor=lr / initial,
            final_div_factor=initial / max(min_lr, initial * 1e-4),
        )
        return LRSchedule(optimizer, cycle)
    if name == "plateau":
        plateau = lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=factor, patience=patience, min_lr=min_lr
        )
        return LRSchedule(optimizer, None, warmup() if warm else None, warm, plateau)
    raise ValueError(f"sched.name: {name!r} is not cosine, step, onecycle, plateau or constant")
