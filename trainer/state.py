"""The loop's own checkpointed components: where training stands, and the optimizer hparams.

Both are stateful components (``state_dict`` / ``load_state_dict``) that
:func:`trainer.checkpoint.save_checkpoint` writes into ``trainer.pt`` beside the LR schedule and
the EMA, and that :func:`trainer.checkpoint.load_checkpoint` restores in place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from trainer.config import OptimConfig

__all__ = ["OptimHParams", "TrainState", "improved"]


def improved(value: float, best: float | None, mode: Literal["max", "min"] | str) -> bool:
    """Whether ``value`` beats ``best`` in direction ``mode`` (nan never does).

    Args:
        value: This epoch's metric.
        best: The best so far, or None before the first epoch.
        mode: ``max`` or ``min``.

    Returns:
        True when it is a new best.
    """
    if value != value:  # nan never improves
        return False
    return best is None or (value > best if mode == "max" else value < best)


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

    def state_dict(self) -> dict[str, Any]:
        """Every field by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` in place; fields it lacks take their defaults.

        Raises:
            TypeError: On a key that is not a field.
        """
        loaded = TrainState(**state)
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(loaded, f.name))

    def end_epoch(
        self, row: dict[str, Any], value: float, results: dict[str, Any], mode: str
    ) -> None:
        """Record a finished epoch: its history row, and the best and early-stop counters.

        Args:
            row: The epoch's row of metrics (appended to the history).
            value: Its validation metric.
            results: The full validation results.
            mode: ``max`` or ``min``: which direction of the metric is better.
        """
        self.history.append(row)
        if improved(value, self.best, mode):
            self.best, self.best_epoch, self.bad_epochs = value, row["epoch"], 0
            self.best_metrics = results
        else:
            self.bad_epochs += 1
        self.last_metrics = results


@dataclass
class OptimHParams:
    """The ``optim`` values a checkpoint records, so a resume can tell whether they changed.

    Saving writes this run's ``lr`` and ``weight_decay``; loading keeps the checkpoint's in
    :attr:`saved` (None until a checkpoint with them is loaded) for the loop to compare.
    """

    lr: float
    weight_decay: float
    saved: dict[str, float] | None = None

    @classmethod
    def of(cls, cfg: OptimConfig) -> OptimHParams:
        """This run's values, from the ``optim`` section."""
        return cls(lr=cfg.lr, weight_decay=cfg.weight_decay)

    def state_dict(self) -> dict[str, Any]:
        """This run's ``lr`` and ``weight_decay``."""
        return {"lr": self.lr, "weight_decay": self.weight_decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep the checkpoint's values in :attr:`saved`."""
        self.saved = dict(state)
