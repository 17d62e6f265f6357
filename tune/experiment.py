"""A prepared search: the checked search config, its base trainer config, space and metric.

Both running a search (:mod:`tune.search`) and reading its results (:mod:`tune.results`,
:mod:`tune.plots`) start from a :class:`Prepared`; it lives here so those modules need not
import each other. An experiment folder holds ``search.yaml`` and ``base.yaml``, from which
:func:`load_experiment` rebuilds it in any working directory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from srmri.config import ConfigError
from trainer.config import TrainConfig
from tune.config import ParamSpec, SearchConfig, load_search_config
from tune.space import base_config, default_metric, validate_space

__all__ = ["BASE_FILE", "SEARCH_FILE", "Prepared", "load_experiment", "prepare"]

SEARCH_FILE = "search.yaml"
BASE_FILE = "base.yaml"


@dataclass(frozen=True)
class Prepared:
    """A checked search, ready to hand to Ray Tune.

    Attributes:
        search: The search config.
        base: The base trainer config.
        space: The validated space (values coerced to the trainer's types).
        metric: Metric the scheduler and the best config use.
        mode: max or min.
        experiment_dir: ``experiment.storage/experiment.name``, absolute.
    """

    search: SearchConfig
    base: TrainConfig
    space: dict[str, ParamSpec]
    metric: str
    mode: str
    experiment_dir: Path


def prepare(search: SearchConfig) -> Prepared:
    """Check the search against the trainer config (before Ray starts) and name the experiment.

    Raises:
        ConfigError: On any invalid key or value of the space, scheduler or search algorithm.
    """
    base = base_config(search)
    space = validate_space(search, base)
    if search.scheduler.name == "pbt" and search.search.name == "optuna":
        raise ConfigError("scheduler.name: pbt proposes its own configs; use search.name=random")
    metric, mode = default_metric(search, base)
    name = search.experiment.name or f"{base.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment_dir = (Path(search.experiment.storage).expanduser() / name).resolve()
    return Prepared(search, base, space, metric, mode, experiment_dir)


def load_experiment(experiment_dir: str | Path) -> Prepared:
    """The prepared search of an existing experiment folder (from its ``search.yaml``).

    Raises:
        ConfigError: If the folder is not an experiment written by ``tune run``.
    """
    d = Path(experiment_dir).expanduser().resolve()
    if not (d / SEARCH_FILE).is_file():
        raise ConfigError(
            f"{d}: not a tune experiment (no {SEARCH_FILE}; was it made by tune run?)"
        )
    prep = prepare(load_search_config(d / SEARCH_FILE, [f"base.config={d / BASE_FILE}"]))
    if prep.experiment_dir != d:  # the folder was moved: follow it
        prep = Prepared(prep.search, prep.base, prep.space, prep.metric, prep.mode, d)
    return prep
