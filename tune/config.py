"""The search's typed configuration tree: base trainer run, search space, scheduler, resources.

A search file is loaded with :func:`srmri.config.load_config` like every other srmri config::

    base:
      config: configs/debug.yaml          # a trainer YAML
      overrides: [data.root=data/synth]   # trainer overrides applied to every trial
    space:                                # trainer dotted key -> exactly one distribution
      optim.name: {choice: [adamw, sgd]}
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      sched.name: {grid: [cosine, onecycle]}
      sched.warmup_epochs: {uniform: [0.0, 1.0]}
      data.batch_size: {randint: [8, 33]}   # upper bound excluded, as in Ray
    scheduler: {name: asha, grace_period: 1}
    search: {name: random}
    num_samples: 4
    resources: {cpus: 1, gpus: 0.5, workers: 1}

Values in the space are checked against :class:`trainer.config.TrainConfig` by
:func:`tune.space.validate_space` before any trial starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from srmri.config import ConfigError, load_config, require

__all__ = [
    "BaseSection",
    "ExperimentSection",
    "ParamSpec",
    "ResourcesSection",
    "SchedulerSection",
    "SearchAlgSection",
    "SearchConfig",
    "load_search_config",
]

_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


@dataclass
class ParamSpec:
    """One searched trainer key: exactly one of the fields is set.

    Attributes:
        choice: Values sampled uniformly.
        grid: Values all tried (random search only; multiplies the number of trials).
        uniform: ``[low, high]`` of a float sampled uniformly.
        loguniform: ``[low, high]`` of a float sampled log-uniformly (both > 0).
        randint: ``[low, high)`` of an integer sampled uniformly (high excluded, as in Ray).
    """

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @property
    def kind(self) -> str:
        """The name of the one distribution that is set."""
        return next(k for k in _KINDS if getattr(self, k) is not None)

    def check_named(self, key: str) -> None:
        """Raise ConfigError (naming ``space.KEY``) unless the distribution is well formed."""
        where = f"space.{key}"
        given = [k for k in _KINDS if getattr(self, k) is not None]
        require(len(given) == 1, where, f"give exactly one of {', '.join(_KINDS)}; got {given}")
        kind = given[0]
        if kind in ("choice", "grid"):
            values = getattr(self, kind)
            require(len(values) > 0, f"{where}.{kind}", "is empty: list at least one value")
            return
        low, high = getattr(self, kind)
        require(low < high, f"{where}.{kind}", f"low {low} must be below high {high}")
        if kind == "loguniform":
            require(low > 0, f"{where}.loguniform", f"bounds must be > 0 (got low={low})")


@dataclass
class BaseSection:
    """The trainer run every trial starts from.

    Attributes:
        config: A trainer YAML file (relative paths: from the working directory, else from the
            folder of the search file).
        overrides: Trainer ``dotted.key=value`` strings applied to every trial.
    """

    config: str = ""
    overrides: list[str] = field(default_factory=list)

    def check(self) -> None:
        require(bool(self.config), "base.config", "name the trainer YAML the trials start from")


@dataclass
class SchedulerSection:
    """Trial scheduler on the validation metric reported every epoch.

    Attributes:
        name: asha (early stopping of weak trials), fifo (none) or pbt (population-based).
        grace_period: ASHA: epochs every trial runs before it may be stopped.
        reduction_factor: ASHA: keep 1/factor of the trials at each rung.
        max_t: ASHA: epochs of the longest trial; 0 means the trainer's ``train.epochs``.
        perturbation_interval: PBT: epochs between exploit/explore steps.
        quantile_fraction: PBT: bottom fraction that copies the top fraction.
        resample_probability: PBT: chance a mutated value is resampled, not perturbed.
        synch: PBT: wait until every trial reaches a perturbation point and rank them on the
            same epoch (asynchronous PBT compares a trial's newest score with the others' older
            ones, which favours whichever trial reported last when the metric drifts).
    """

    name: Literal["asha", "fifo", "pbt"] = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int = 0
    perturbation_interval: int = 1
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    synch: bool = False

    def check(self) -> None:
        require(self.grace_period >= 1, "scheduler.grace_period", "must be >= 1 epoch")
        require(self.reduction_factor > 1, "scheduler.reduction_factor", "must be > 1")
        require(self.max_t >= 0, "scheduler.max_t", "must be >= 0 (0: train.epochs)")
        require(self.perturbation_interval >= 1, "scheduler.perturbation_interval", "must be >= 1")
        require(0 < self.quantile_fraction <= 0.5, "scheduler.quantile_fraction", "in (0, 0.5]")
        require(0 <= self.resample_probability <= 1, "scheduler.resample_probability", "in [0, 1]")


@dataclass
class SearchAlgSection:
    """How configurations are proposed.

    Attributes:
        name: random (random and grid sampling) or optuna (TPE through Ray's integration).
        seed: Seed of the sampler (optuna) or of Ray's random sampling; None: unseeded.
    """

    name: Literal["random", "optuna"] = "random"
    seed: int | None = 0


@dataclass
class ResourcesSection:
    """What one trial holds.

    Attributes:
        cpus: CPUs per worker.
        gpus: GPUs per worker (fractions allowed for one-worker trials, e.g. 0.25 packs four
            trials on a GPU).
        workers: Training processes per trial; more than one trains with DDP (or DeepSpeed,
            from the trainer's ``backend``) through Ray Train's TorchTrainer.
    """

    cpus: float = 1.0
    gpus: float = 0.0
    workers: int = 1

    def check(self) -> None:
        require(self.cpus > 0, "resources.cpus", f"must be > 0, got {self.cpus}")
        require(self.gpus >= 0, "resources.gpus", f"must be >= 0, got {self.gpus}")
        require(
            self.gpus <= 1 or float(self.gpus).is_integer(),
            "resources.gpus",
            "above 1 must be a whole number",
        )
        require(self.workers >= 1, "resources.workers", f"must be >= 1, got {self.workers}")
        require(
            self.workers == 1 or self.gpus == 0 or self.gpus >= 1,
            "resources.gpus",
            "a fraction of a GPU needs workers=1 (NCCL cannot run two ranks of a trial on "
            "one GPU); give multi-worker trials whole GPUs",
        )


@dataclass
class ExperimentSection:
    """Where the experiment lives: ``storage/name`` (a path every node can reach).

    Attributes:
        name: Experiment folder name; empty: ``{task}-{date-time}``.
        storage: Parent folder of experiments.
    """

    name: str = ""
    storage: str = "tune-runs"

    def check(self) -> None:
        require("/" not in self.name, "experiment.name", "must be a plain folder name")
        require(bool(self.storage), "experiment.storage", "must be a folder")


@dataclass
class SearchConfig:
    """One hyperparameter search.

    Attributes:
        base: The trainer run each trial starts from.
        space: Trainer dotted key -> distribution.
        metric: Metric the scheduler and the best config use; empty: val_accuracy (classify)
            or val_sr_psnr (sr).
        mode: max or min; empty: max for the default metrics.
        scheduler: ASHA, FIFO or PBT.
        search: random/grid or optuna.
        num_samples: Trials sampled (with grid keys: repeats of the whole grid).
        max_concurrent: Trials at once; 0: as many as the cluster's resources allow.
        resources: CPUs, GPUs and workers per trial.
        max_failures: Retries of a crashed trial (from its last checkpoint).
        reuse_actors: Reuse trial processes between single-worker trials (saves start-up).
        experiment: Name and storage of the experiment folder.
    """

    base: BaseSection = field(default_factory=BaseSection)
    space: dict[str, ParamSpec] = field(default_factory=dict)
    metric: str = ""
    mode: Literal["", "max", "min"] = ""
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    search: SearchAlgSection = field(default_factory=SearchAlgSection)
    num_samples: int = 4
    max_concurrent: int = 0
    resources: ResourcesSection = field(default_factory=ResourcesSection)
    max_failures: int = 2
    reuse_actors: bool = True
    experiment: ExperimentSection = field(default_factory=ExperimentSection)

    def check(self) -> None:
        require(bool(self.space), "space", "is empty: give at least one trainer key to search")
        for key, spec in self.space.items():
            spec.check_named(key)
        require(self.num_samples >= 1, "num_samples", "must be >= 1")
        require(self.max_concurrent >= 0, "max_concurrent", "must be >= 0 (0: from resources)")
        require(self.max_failures >= 0, "max_failures", "must be >= 0")
        grids = [k for k, s in self.space.items() if s.grid is not None]
        require(
            not grids or self.search.name == "random",
            f"space.{grids[0] if grids else ''}",
            "grid values need search.name=random (Optuna samples; use choice)",
        )


def _route(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Split command-line overrides into search-config keys and trainer keys (by first part)."""
    own = set(SearchConfig.__dataclass_fields__)
    mine, trainer = [], []
    for item in overrides:
        head = item.split("=", 1)[0].split(".", 1)[0].strip()
        (mine if head in own else trainer).append(item)
    return mine, trainer


def load_search_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> SearchConfig:
    """Load and check a :class:`SearchConfig`.

    Args:
        path: The search YAML file.
        overrides: ``dotted.key=value``: keys of the search tree (``num_samples=8``,
            ``scheduler.name=fifo``) or trainer keys (``data.root=PATH``), which are appended
            to ``base.overrides``.

    Returns:
        The checked search config, ``base.config`` made absolute.

    Raises:
        ConfigError: Naming the file and key on any invalid input.
    """
    mine, trainer = _route(list(overrides))
    cfg = load_config(SearchConfig, path, mine)
    cfg.base.overrides = [*cfg.base.overrides, *trainer]
    base = Path(cfg.base.config).expanduser()
    if not base.is_absolute() and not base.is_file() and path is not None:
        base = Path(path).resolve().parent / base
    if not base.is_file():
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}base.config: trainer config {cfg.base.config} does not exist")
    cfg.base.config = str(base.resolve())
    return cfg
