"""A prepared search: the checked search config, its base trainer config, space and metric.

Both running a search (:mod:`tune.search`) and reading its results (:mod:`tune.results`,
:mod:`tune.plots`) start from a :class:`Prepared`; it lives here so those modules need not
import each other. An experiment folder holds ``search.yaml`` and ``base.yaml``, from which
:func:`load_experiment` rebuilds it in any working directory, and ``inputs.json``: their
fingerprints and contents as the search started (:func:`record_inputs`). Those two files are
the truth for ``tune resume``, which continues exactly the recorded search; Ray restores the
trials and the sampled configs from its own state, so an edit made afterwards could only apply
in part (a new base to unfinished trials, never a new space): :func:`check_inputs` refuses it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srmri.atomic import write_json
from srmri.config import ConfigError, config_to_dict
from srmri.fingerprint import config_fingerprint, describe, differences
from trainer.config import TrainConfig
from tune.config import ParamSpec, SearchConfig, load_search_config
from tune.space import base_config, default_metric, validate_space

__all__ = [
    "BASE_FILE",
    "INPUTS_FILE",
    "SEARCH_FILE",
    "Prepared",
    "check_inputs",
    "load_experiment",
    "prepare",
    "record_inputs",
]

SEARCH_FILE = "search.yaml"
BASE_FILE = "base.yaml"
INPUTS_FILE = "inputs.json"
# Keys of search.yaml that say where the experiment lives, not what it searches: loading
# rewrites base.config to the folder's base.yaml, and the folder itself is the experiment.
_LOCATION = ("base.config", "experiment")


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


def _plain(cfg: Any) -> dict[str, Any]:
    """A config as JSON data (tuples as lists), so a recorded one compares equal to it."""
    return json.loads(json.dumps(config_to_dict(cfg)))


def record_inputs(experiment_dir: str | Path) -> Path:
    """Record the folder's ``search.yaml`` and ``base.yaml`` as they are now, in ``inputs.json``.

    Args:
        experiment_dir: The experiment folder (its two files already written).

    Returns:
        The written ``inputs.json``: the fingerprint and the resolved contents of each.
    """
    prep = load_experiment(experiment_dir)
    search, base = _plain(prep.search), _plain(prep.base)
    record = {
        "search_fingerprint": config_fingerprint(search, _LOCATION),
        "base_fingerprint": config_fingerprint(base),
        "search": search,
        "base": base,
    }
    path = prep.experiment_dir / INPUTS_FILE
    write_json(path, record, indent=1)
    return path


def check_inputs(prep: Prepared) -> None:
    """Refuse an experiment whose ``search.yaml`` or ``base.yaml`` changed since it started.

    Args:
        prep: The experiment as :func:`load_experiment` read it from the folder now.

    Raises:
        ConfigError: Naming each key (and its recorded and current value) that differs from
            ``inputs.json``. An experiment without ``inputs.json`` (made before it was
            recorded) has nothing to compare and passes.
    """
    path = prep.experiment_dir / INPUTS_FILE
    if not path.is_file():
        return
    recorded = json.loads(path.read_text())
    search, base = _plain(prep.search), _plain(prep.base)
    if (
        config_fingerprint(search, _LOCATION) == recorded["search_fingerprint"]
        and config_fingerprint(base) == recorded["base_fingerprint"]
    ):
        return
    lines = []
    for name, diffs in (
        (SEARCH_FILE, differences(recorded["search"], search, _LOCATION)),
        (BASE_FILE, differences(recorded["base"], base)),
    ):
        if diffs:
            lines += [f"{name} (recorded -> now):", describe(diffs)]
    raise ConfigError(
        f"{prep.experiment_dir}: edited since the search started; resume continues exactly the "
        f"recorded search ({INPUTS_FILE}), so it refuses these changes:\n"
        + "\n".join(lines)
        + "\nundo them, or start a new search with `tune run` under another experiment.name"
    )
