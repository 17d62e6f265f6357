"""Set up, run and resume a search: Ray, the Tuner, its scheduler, search algorithm and resources.

On a cluster (``--address``, or inside ``ray job submit``) ``experiment.storage`` and the shard set
must be paths (or URLs) every node reaches: trial folders, checkpoints and trainer run folders are
written there by whichever node runs the trial.

An experiment folder holds, besides Ray Tune's own state, ``search.yaml`` (the resolved search
config), ``base.yaml`` (the resolved base trainer config it points to) and ``inputs.json`` (their
fingerprints and contents at the start). ``tune resume`` rebuilds the trainable from those two
files alone, so a search can be resumed from any working directory, and refuses, naming the
keys, when they were edited after the search started (Ray would keep the recorded space while
the trials took the edited base).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

from srmri.config import ConfigError, config_to_dict, save_config
from tune.config import (
    BaseSection,
    ExperimentSection,
    SearchConfig,
)
from tune.experiment import (
    BASE_FILE,
    SEARCH_FILE,
    Prepared,
    check_inputs,
    load_experiment,
    prepare,
    record_inputs,
)
from tune.results import write_outputs
from tune.space import mutations, param_space
from tune.trainable import TrialSetup, run_trial, trial_dirname

__all__ = ["connect", "resume_search", "run_search"]


def connect(address: str | None, dashboard: bool = False) -> None:
    """``ray.init()``: a local Ray by default, or join the cluster at ``address`` (``auto`` too)."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    elif os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`: join the job's cluster
        ray.init()
    else:
        ray.init(include_dashboard=dashboard)


def _max_epochs(prep: Prepared) -> int:
    """Longest trial in epochs (``train.epochs`` may itself be searched)."""
    if prep.search.scheduler.max_t:
        return prep.search.scheduler.max_t
    spec = prep.space.get("train.epochs")
    if spec is None:
        return prep.base.train.epochs
    if spec.randint is not None:
        return int(spec.randint[1]) - 1
    return max(int(v) for v in (spec.choice or spec.grid or [prep.base.train.epochs]))


def _scheduler(prep: Prepared) -> Any:
    s = prep.search.scheduler
    if s.name == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=_max_epochs(prep),
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
        )
    if s.name == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=s.perturbation_interval,
            hyperparam_mutations=mutations(prep.space),
            quantile_fraction=s.quantile_fraction,
            resample_probability=s.resample_probability,
            synch=s.synch,
        )
    return FIFOScheduler()


def _search_alg(prep: Prepared) -> Any:
    a = prep.search.search
    if a.name == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=TPESampler(seed=a.seed))
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=a.seed)


def _concurrency(prep: Prepared) -> int | None:
    """Trials at once: as configured, else (multi-worker trials) what the cluster holds."""
    s = prep.search
    if s.max_concurrent:
        return s.max_concurrent
    if s.resources.workers == 1:
        return None  # Tune packs single-process trials by their declared resources itself
    total = ray.cluster_resources()
    r = s.resources
    fits = math.floor(total.get("CPU", 0) / (r.cpus * r.workers))
    if r.gpus:
        fits = min(fits, math.floor(total.get("GPU", 0) / (r.gpus * r.workers)))
    if fits < 1:
        raise ConfigError(
            f"resources: a trial needs {r.workers} workers x ({r.cpus} CPU, {r.gpus} GPU) but "
            f"the cluster has {total.get('CPU', 0)} CPUs and {total.get('GPU', 0)} GPUs"
        )
    return fits


def _trainable(prep: Prepared) -> Any:
    r = prep.search.resources
    setup = TrialSetup(
        base=config_to_dict(prep.base),
        experiment_dir=str(prep.experiment_dir),
        workers=r.workers,
        cpus=r.cpus,
        gpus=r.gpus,
    )
    fn = tune.with_parameters(run_trial, setup=setup)
    if r.workers == 1:
        return tune.with_resources(fn, {"cpu": r.cpus, "gpu": r.gpus})
    # The trial process only coordinates; its Ray Train workers hold the CPUs and GPUs. Ray
    # needs a non-empty request for it, so it asks for a token amount of memory; the number of
    # such trials at once is capped from the cluster's resources (see _concurrency).
    return tune.with_resources(fn, {"cpu": 0, "memory": 1})


def _run_config(prep: Prepared) -> tune.RunConfig:
    return tune.RunConfig(
        name=prep.experiment_dir.name,
        storage_path=str(prep.experiment_dir.parent),
        failure_config=tune.FailureConfig(max_failures=prep.search.max_failures),
        # PBT copies another trial's checkpoint a moment after it was reported: keep them all
        # there (Ray would otherwise delete a donor's checkpoint before it is copied).
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=None if prep.search.scheduler.name == "pbt" else 2
        ),
        verbose=1,
    )


def _save_inputs(prep: Prepared) -> None:
    """Write ``base.yaml``, ``search.yaml`` and their record so the experiment resumes alone."""
    d = prep.experiment_dir
    d.mkdir(parents=True, exist_ok=True)
    save_config(prep.base, d / BASE_FILE)
    search = dataclasses.replace(
        prep.search,
        base=BaseSection(config=str(d / BASE_FILE), overrides=[]),
        experiment=ExperimentSection(name=d.name, storage=str(d.parent)),
        space=prep.space,
        metric=prep.metric,
        mode=prep.mode,
    )
    save_config(search, d / SEARCH_FILE)
    record_inputs(d)


def run_search(search: SearchConfig, address: str | None = None, dashboard: bool = False) -> Path:
    """Validate, start Ray and run the whole search; write the results; return the folder.

    Args:
        search: The search config.
        address: Ray cluster to join (``auto`` or ``HOST:PORT``); None starts Ray locally.
        dashboard: Start Ray's dashboard with a local Ray.

    Returns:
        The experiment folder.

    Raises:
        ConfigError: Before any trial starts, on an invalid space or setting.
    """
    prep = prepare(search)
    if prep.experiment_dir.exists() and any(prep.experiment_dir.glob("experiment_state-*")):
        raise ConfigError(
            f"{prep.experiment_dir}: an experiment of that name exists; continue it with "
            f"`python -m tune resume {prep.experiment_dir}` or choose experiment.name"
        )
    _save_inputs(prep)
    connect(address, dashboard)
    tuner = tune.Tuner(
        _trainable(prep),
        param_space=param_space(prep.space),
        tune_config=tune.TuneConfig(
            metric=prep.metric,
            mode=prep.mode,
            search_alg=_search_alg(prep),
            scheduler=_scheduler(prep),
            num_samples=search.num_samples,
            max_concurrent_trials=_concurrency(prep),
            reuse_actors=search.reuse_actors and search.resources.workers == 1,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=_run_config(prep),
    )
    with _cwd(prep.experiment_dir):
        tuner.fit()
    write_outputs(prep.experiment_dir)
    return prep.experiment_dir


@contextlib.contextmanager
def _cwd(folder: Path) -> Iterator[None]:
    """Run the Tuner with ``folder`` (absolute) as the working directory.

    Under ``ray job submit`` the driver starts in the job's unpacked ``working_dir``, and Ray's
    runtime-env agent may replace that folder while it starts the trials' workers, which leaves
    the driver in a deleted directory: Tune's final ``os.path.abspath`` then fails with a
    FileNotFoundError that names no file. The driver uses only absolute paths from here on
    (the experiment folder, its inputs); trials run in their own processes.
    """
    before = None
    with contextlib.suppress(FileNotFoundError):
        before = os.getcwd()
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    try:
        yield
    finally:
        if before is not None and os.path.isdir(before):
            os.chdir(before)


def resume_search(experiment_dir: str | Path, address: str | None = None) -> Path:
    """Continue an interrupted search: finished trials kept, the others resumed or retried.

    Args:
        experiment_dir: The experiment folder.
        address: Ray cluster to join; None starts Ray locally.

    Returns:
        The experiment folder.

    Raises:
        ConfigError: If the folder is no experiment, has no Ray Tune state, or its
            ``search.yaml``/``base.yaml`` were edited after the search started (naming the keys).
    """
    prep = load_experiment(experiment_dir)
    check_inputs(prep)
    if not tune.Tuner.can_restore(str(prep.experiment_dir)):
        raise ConfigError(f"{prep.experiment_dir}: no Ray Tune state to resume from")
    connect(address)
    tuner = tune.Tuner.restore(
        str(prep.experiment_dir),
        trainable=_trainable(prep),
        resume_unfinished=True,
        resume_errored=True,
    )
    with _cwd(prep.experiment_dir):
        tuner.fit()
    write_outputs(prep.experiment_dir)
    return prep.experiment_dir
