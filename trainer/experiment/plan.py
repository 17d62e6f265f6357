"""The pipeline's plan: every stage with its fingerprint, output and upstream, run by none.

:func:`plan_pipeline` builds the stages (data, SR training, enhance, a classifier and its test
evaluation per arm and seed, the report); :func:`plan_status` says which are done, for an
executor that schedules them (serial in one process, Ray tasks, Slurm jobs); :func:`stage_argv`
is the command line that runs one stage alone. Fingerprints: see :mod:`trainer.experiment.pipeline`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from shards.degrade import SAMPLE_DRAWS
from shards.format import read_index
from shards.ingest import ingest
from srmri.config import ConfigError
from srmri.fingerprint import config_fingerprint, fingerprint
from trainer.config import LoggingConfig, TrainConfig, run_dir_of
from trainer.experiment.config import (
    DATA_IGNORE,
    SR_RUN_NAME,
    TRAIN_IGNORE,
    PipelineConfig,
    arm_run_name,
    data_dir,
    runs_dir,
    sr_data_dir,
    trainer_config,
)
from trainer.experiment.enhance import enhance_with_checkpoint
from trainer.experiment.parent_run import log_report, tracked_stage
from trainer.experiment.report import build_report
from trainer.experiment.stage import Stage, Stages
from trainer.input_kind import needs_sr, needs_sr_stage, trains_sr
from trainer.rundir import eval_dir_of
from trainer.tracking import Tracker

__all__ = ["Plan", "PlannedStage", "data_stage", "plan_pipeline", "plan_status", "stage_argv"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every stage of a pipeline, in an order they can run one after another.

    Attributes:
        stages: The stages; the first is the data stage, the last the report.
        sr_cfg: The SR stage's trainer config when an SR arm uses it (for the report), else None.
    """

    stages: list[Stage]
    sr_cfg: TrainConfig | None

    def stage(self, name: str) -> Stage:
        """The stage called ``name``.

        Raises:
            ConfigError: No stage has that name (the message lists them).
        """
        names = [s.name for s in self.stages]
        if name not in names:
            raise ConfigError(f"--stage: no stage {name!r} in this pipeline; its stages: {names}")
        return self.stages[names.index(name)]


def _stage_fingerprint(own: str, upstream: dict[str, str], draws: str = "") -> str:
    """A stage's fingerprint; a training stage passes :data:`SAMPLE_DRAWS` as ``draws``."""
    made = {"config": own, "upstream": upstream}
    return fingerprint({**made, "draws": draws} if draws else made)


def data_stage(cfg: PipelineConfig) -> Stage:
    """The ingest (or synth) stage; its fingerprint is its config's alone, see the docstring."""
    out = Path(cfg.out_dir)
    data_cfg = dataclasses.replace(cfg.data, out=str(data_dir(out)))
    return Stage(
        "data",
        _stage_fingerprint(config_fingerprint(data_cfg, DATA_IGNORE), {}),
        data_dir(out),
        lambda: ingest(data_cfg),
        always=True,
    )


def plan_pipeline(
    cfg: PipelineConfig,
    dataset_id: str,
    logging: LoggingConfig | None = None,
    parent: Tracker | None = None,
) -> Plan:
    """Every stage of the pipeline with its fingerprint and output, without running any.

    Args:
        cfg: The pipeline config.
        dataset_id: ``dataset_id`` of the data stage's finished set: every later stage's
            fingerprint depends on it ("" to plan before the set exists).
        logging: The training stages' logging section (:func:`stage_logging`; no part of any
            fingerprint), or None to keep the stage configs' own.
        parent: The pipeline's MLflow parent run the report stage logs to (None: none).

    Returns:
        The plan; its first stage is the data stage, its last the report.
    """
    out = Path(cfg.out_dir)
    data = data_stage(cfg)
    stages = [data]
    upstream = {"data": fingerprint({"config": data.fingerprint, "dataset_id": dataset_id})}
    sr_upstream = dict(upstream)
    sr_cfg = _sr_config(cfg, out, logging)
    tsr_arms = [a for a in cfg.arms if trains_sr(a)]
    if tsr_arms and sr_cfg is None:
        raise ConfigError(f"sr.config: the {tsr_arms[0]} arm fine-tunes the SR stage's network")
    sr_used = sr_cfg if sr_cfg is not None and any(map(needs_sr_stage, cfg.arms)) else None
    # A tsr arm reads the SR run, not the enhanced set: its upstream is the SR stage alone.
    tsr_upstream = dict(upstream)
    if sr_used is not None:
        sr_stages = _sr_stages(cfg, sr_used, out, upstream)
        stages += sr_stages
        sr_upstream.update({s.name: s.fingerprint for s in sr_stages})
        tsr_upstream["sr"] = sr_stages[0].fingerprint
    # The lr arm always sees the SR stage's degradation, whether or not the SR arms run: an
    # hr/lr-only run (calibrating a benchmark) trains exactly the classifiers that the full
    # run trains, under the same fingerprints.
    degrade = [] if sr_cfg is None else _degrade_overrides(sr_cfg)
    for arm in cfg.arms:
        for seed in cfg.seeds:
            extra = _tsr_overrides(sr_used) if sr_used is not None and trains_sr(arm) else []
            run_cfg = _arm_config(cfg, out, arm, seed, [*degrade, *extra], logging)
            up = tsr_upstream if trains_sr(arm) else sr_upstream if needs_sr(arm) else upstream
            stages += _classifier_stages(run_cfg, up)
    stages.append(_report_stage(cfg, stages, upstream, sr_used, parent))
    return Plan(stages, sr_used)


def _report_stage(
    cfg: PipelineConfig,
    stages: list[Stage],
    upstream: dict[str, str],
    sr_cfg: TrainConfig | None,
    parent: Tracker | None,
) -> Stage:
    """The report: it reads every other stage, and its own settings are part of its fingerprint."""
    out = Path(cfg.out_dir)
    report_up = {**upstream, **{s.name: s.fingerprint for s in stages[1:]}}
    own = fingerprint({"report": config_fingerprint(cfg.report), "arms": cfg.arms})

    def work() -> None:
        build_report(cfg, out, read_index(data_dir(out)), sr_cfg)
        if parent is not None:
            log_report(parent, out)

    return Stage(
        "report",
        _stage_fingerprint(own, report_up),
        out / "report.html",
        work,
        report_up,
    )


@dataclasses.dataclass(frozen=True)
class PlannedStage:
    """What an executor needs of one stage (``srmri pipeline --plan`` prints a list of these).

    Attributes:
        name: The stage (``--stage NAME`` runs it alone).
        kind: What it does (``data``, ``sr``, ``enhance``, ``classify``, ``evaluate``,
            ``report``): the executors' resources are per kind.
        upstream: The stages that must be done before it.
        distributed: Whether it runs on every rank under torchrun (else on rank 0 alone).
        fingerprint: Its fingerprint under the finished data set ("" before there is one).
        done: Whether it finished under that fingerprint (never for the data stage, which
            always runs to check its inputs).
    """

    name: str
    kind: str
    upstream: tuple[str, ...]
    distributed: bool
    fingerprint: str
    done: bool


def plan_status(cfg: PipelineConfig) -> tuple[str, list[PlannedStage]]:
    """Every stage of the pipeline and whether it is done, for an executor that schedules them.

    Args:
        cfg: The pipeline config.

    Returns:
        ``(dataset_id, stages)``: the id of the finished data set ("" when there is none yet:
        then no stage counts as done) and the stages in an order they can run serially.
    """
    out = Path(cfg.out_dir)
    stages = Stages(out, is_main=False)
    data_done = stages.get("data") is not None and stages.get("data").status == "done"
    dataset_id = read_index(data_dir(out)).dataset_id if data_done else ""
    plan = plan_pipeline(cfg, dataset_id)
    return dataset_id, [
        PlannedStage(
            s.name,
            s.kind,
            tuple(s.upstream),
            not s.main_only,
            s.fingerprint if dataset_id or s.name == "data" else "",
            bool(dataset_id) and not s.always and stages.done(s),
        )
        for s in plan.stages
    ]


def stage_argv(
    config: str, overrides: list[str], stage: str, expect_dataset_id: str = ""
) -> list[str]:
    """The ``srmri`` words that run one stage alone (after ``python -m launch.cli``).

    Args:
        config: The pipeline YAML.
        overrides: Its dotted overrides.
        stage: The stage's name.
        expect_dataset_id: For the data stage: fail if the set it finishes is not this one
            (the stages planned against it would be stale); "" checks nothing.

    Returns:
        e.g. ``["pipeline", "--config", F, "a=b", "--stage", "classify/hr-seed0"]``.
    """
    words = ["pipeline", "--config", config, *overrides, "--stage", stage]
    return [*words, "--expect-dataset-id", expect_dataset_id] if expect_dataset_id else words


def _sr_config(cfg: PipelineConfig, out: Path, logging: LoggingConfig | None) -> TrainConfig | None:
    """The SR stage's trainer config, or None when the pipeline has no SR stage."""
    if not cfg.sr.config:
        return None
    overrides = [f"data.root={data_dir(out)}", f"out_dir={runs_dir(out)}", "task=sr"]
    sr_cfg = trainer_config(cfg.sr, [*overrides, f"name={SR_RUN_NAME}"])
    return tracked_stage(sr_cfg, logging, SR_RUN_NAME)


def _sr_stages(
    cfg: PipelineConfig, sr_cfg: TrainConfig, out: Path, upstream: dict[str, str]
) -> list[Stage]:
    """Train the SR network, then enhance the data set with it (when an arm reads that set)."""
    from trainer.loop import fit  # the loop pulls in every backend: import it when one trains

    sr_run = run_dir_of(sr_cfg)
    own = config_fingerprint(sr_cfg, TRAIN_IGNORE)
    sr = Stage(
        "sr", _stage_fingerprint(own, upstream, SAMPLE_DRAWS), sr_run, lambda: fit(sr_cfg), upstream
    )
    enhance_up = {**upstream, "sr": sr.fingerprint}
    enhance = Stage(
        "enhance",
        _stage_fingerprint(
            fingerprint({"enhance_batch": cfg.enhance_batch}), enhance_up, SAMPLE_DRAWS
        ),
        sr_data_dir(out),
        lambda: enhance_with_checkpoint(sr_run, data_dir(out), sr_data_dir(out), cfg.enhance_batch),
        enhance_up,
    )
    return [sr, enhance] if cfg.sr_arms() else [sr]


def _arm_config(
    cfg: PipelineConfig,
    out: Path,
    arm: str,
    seed: int,
    extra: list[str],
    logging: LoggingConfig | None,
) -> TrainConfig:
    """The trainer config of one classifier: the classify stage plus the pipeline's settings.

    ``extra`` holds the overrides derived from the SR stage (its degradation, and for a tsr
    arm its run directory and network), applied before the pipeline's own.
    """
    overrides = [
        *extra,
        f"data.root={data_dir(out)}",
        f"data.sr_root={sr_data_dir(out)}",
        f"data.inputs={arm}",
        f"train.seed={seed}",
        f"out_dir={runs_dir(out)}",
        f"name={arm_run_name(arm, seed)}",
        "task=classify",
    ]
    run_cfg = trainer_config(cfg.classify, overrides)
    return tracked_stage(run_cfg, logging, f"classify/{run_cfg.name}")


def _classifier_stages(run_cfg: TrainConfig, upstream: dict[str, str]) -> list[Stage]:
    """Train one classifier, then evaluate it on the test split."""
    from trainer.loop import evaluate, fit

    run_dir = run_dir_of(run_cfg)
    # A tsr run's model.sr_init is the SR run's path inside out_dir (its content is the sr
    # upstream's fingerprint). Left out for tsr alone: dropping the key (empty elsewhere) from
    # every stage would change every fingerprint made so far and re-run finished pipelines.
    tsr = ("model.sr_init",) if trains_sr(run_cfg.data.inputs) else ()
    own = config_fingerprint(run_cfg, (*TRAIN_IGNORE, *tsr))
    name = run_cfg.name
    classify = Stage(
        f"classify/{name}",
        _stage_fingerprint(own, upstream, SAMPLE_DRAWS),
        run_dir,
        lambda: fit(run_cfg),
        upstream,
    )
    eval_up = {**upstream, classify.name: classify.fingerprint}
    evaluation = Stage(
        f"evaluate/{name}",
        _stage_fingerprint(fingerprint({"split": "test"}), eval_up),
        eval_dir_of(run_dir, "test"),
        lambda: evaluate(run_dir, "test", eval_dir_of(run_dir, "test")),
        eval_up,
    )
    return [classify, evaluation]


def _section_overrides(prefix: str, section: Any) -> list[str]:
    """``prefix.field=value`` overrides setting every field of a config dataclass."""
    overrides = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        overrides.append(f"{prefix}.{f.name}={'null' if value is None else json.dumps(value)}")
    return overrides


def _degrade_overrides(sr_cfg: TrainConfig) -> list[str]:
    """``data.degrade.*`` overrides giving the lr arm the SR stage's degradation (its LR images)."""
    return _section_overrides("data.degrade", sr_cfg.sr_degradation())


def _tsr_overrides(sr_cfg: TrainConfig) -> list[str]:
    """A tsr arm's start: the SR stage's run directory and its ``sr`` section (the network).

    The degradation comes with every arm's :func:`_degrade_overrides`; the whole ``sr`` section
    is copied so that the tsr run's saved config rebuilds the SR part (:mod:`trainer.tsr_task`).
    """
    return [f"model.sr_init={run_dir_of(sr_cfg)}", *_section_overrides("sr", sr_cfg.sr)]
