"""``srmri pipeline``: the paper's experiment end to end, one stage after another.

data (synth or ingest) -> SR training -> enhance -> classifier per input arm and seed ->
test evaluation -> report. Each stage has a fingerprint: its own config (without the keys that
cannot change its output, see ``TRAIN_IGNORE``/``DATA_IGNORE``) and the fingerprints of the
stages it reads from (SR and enhance read the data stage; a classifier and its evaluation read
the data stage and, for the sr and lr+sr arms, the SR and enhance stages). What downstream
stages see of the data stage is its config *and* the finished set's content ``dataset_id``: the
data stage runs on every pipeline run (ingest fingerprints each input's bytes and is a fast
"nothing to do" when none changed), so an edited input (a corrected ``labels.csv``, a replaced
scan) rebuilds the set and then retrains every stage that read it. ``OUT/stages.json``
records each stage's fingerprint and whether it finished. A re-run skips a stage finished under
the same fingerprint, resumes one started under it (training from its run directory's last
checkpoint, ingest and enhance from their own journals), and redoes from scratch one whose
fingerprint changed: its old output folder is first moved aside to
``NAME.replaced-<old fingerprint[:10]>`` beside it (nothing is deleted), so no stage ever
continues from weights or data made under another config. Under torchrun every stage runs
distributed: training and enhance on all ranks, ingest and the report on rank 0 while the
others wait.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from shards.degrade import SAMPLE_DRAWS
from shards.format import read_index
from shards.ingest import ingest
from srmri.atomic import write_json
from srmri.config import dump_config, save_config
from srmri.distributed import init_distributed, print0
from srmri.fingerprint import config_fingerprint, fingerprint
from trainer.config import LoggingConfig, TrainConfig, run_dir_of
from trainer.experiment.config import (
    DATA_IGNORE,
    SR_RUN_NAME,
    STAGES_FILE,
    TRAIN_IGNORE,
    PipelineConfig,
    StageConfig,
    StageRecord,
    StageStatus,
    arm_run_name,
    data_dir,
    load_pipeline_config,
    read_stages,
    runs_dir,
    sr_data_dir,
    trainer_config,
)
from trainer.experiment.enhance import enhance_with_checkpoint
from trainer.experiment.parent_run import log_report, open_parent_run, stage_logging, tracked_stage
from trainer.experiment.report import build_report
from trainer.input_kind import needs_sr
from trainer.rundir import eval_dir_of
from trainer.shared_run import end_status

__all__ = [
    "PipelineConfig",
    "Plan",
    "Stage",
    "StageConfig",
    "main",
    "plan_pipeline",
    "run_pipeline",
]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the pipeline.

    Attributes:
        name: Its key in ``stages.json`` (``data``, ``sr``, ``enhance``, ``classify/RUN``, ...).
        fingerprint: Its own config's fingerprint combined with ``upstream``.
        output: The folder it writes; moved aside when the fingerprint changed.
        work: Runs it.
        upstream: Upstream stage name -> fingerprint.
        main_only: Whether only rank 0 runs ``work`` (the others wait).
        always: Whether ``work`` runs even when done before under the same fingerprint (the
            data stage: only ingest can tell whether its inputs changed since).
    """

    name: str
    fingerprint: str
    output: Path
    work: Callable[[], Any]
    upstream: dict[str, str] = dataclasses.field(default_factory=dict)
    main_only: bool = False
    always: bool = False


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every stage of a pipeline, in the order they run.

    Attributes:
        stages: The stages.
        sr_cfg: The SR stage's trainer config when an SR arm uses it (for the report), else None.
    """

    stages: list[Stage]
    sr_cfg: TrainConfig | None


def _stage_fingerprint(own: str, upstream: dict[str, str], draws: str = "") -> str:
    """A stage's fingerprint; a training stage passes :data:`SAMPLE_DRAWS` as ``draws``."""
    made = {"config": own, "upstream": upstream}
    return fingerprint({**made, "draws": draws} if draws else made)


class Stages:
    """``OUT/stages.json``: per stage, the fingerprint it ran under and whether it finished."""

    def __init__(self, out: Path, is_main: bool) -> None:
        self.path = out / STAGES_FILE
        self.is_main = is_main
        self.records = read_stages(out)

    def get(self, name: str) -> StageRecord | None:
        """The record of stage ``name``, or None when it never started."""
        return self.records.get(name)

    def mark(self, stage: Stage, status: StageStatus) -> None:
        """Record ``stage`` as started or done under its fingerprint (rank 0 writes the file)."""
        self.records[stage.name] = StageRecord(stage.fingerprint, status, dict(stage.upstream))
        if self.is_main:
            data = {name: dataclasses.asdict(r) for name, r in self.records.items()}
            write_json(self.path, data, indent=1)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _move_aside(path: Path, old: str) -> Path | None:
    """Rename ``path`` to ``NAME.replaced-<old[:10]>`` (numbered if taken); None if absent."""
    if not path.exists():
        return None
    target = path.with_name(f"{path.name}.replaced-{old[:10]}")
    n = 2
    while target.exists():
        target = path.with_name(f"{path.name}.replaced-{old[:10]}-{n}")
        n += 1
    path.rename(target)
    return target


def _work(stages: Stages, stage: Stage) -> None:
    """Run the stage's work (on rank 0 only for a main-only stage), then wait for every rank."""
    if not stage.main_only or stages.is_main:
        stage.work()
    _barrier()


def _run_stage(stages: Stages, stage: Stage) -> None:
    """Skip, check, resume or (after moving a stale output aside) run one stage."""
    before = stages.get(stage.name)
    same = before is not None and before.fingerprint == stage.fingerprint
    if same and before.status == "done":
        verb = "checking" if stage.always else "skipped"
        print0(f"[pipeline] {stage.name}: done before ({stage.fingerprint[:10]}), {verb}")
        if stage.always:
            _work(stages, stage)
        return
    if before is not None and not same:
        # Another config made what is there: continuing from it would keep stale weights.
        moved = _move_aside(stage.output, before.fingerprint) if stages.is_main else None
        _barrier()
        where = f"; moved {stage.output} to {moved.name}" if moved is not None else ""
        print0(
            f"[pipeline] {stage.name}: config or upstream changed ({before.fingerprint[:10]} -> "
            f"{stage.fingerprint[:10]}), redone from scratch{where}"
        )
    print0(f"[pipeline] {stage.name}: running")
    stages.mark(stage, "started")
    start = time.perf_counter()
    _work(stages, stage)
    stages.mark(stage, "done")
    # One line per stage that a user (and benchmarks/quickstart_time.py) reads the profile from.
    print0(f"[pipeline] {stage.name}: done in {time.perf_counter() - start:.1f} s")


def _data_stage(cfg: PipelineConfig) -> Stage:
    """The ingest (or synth) stage; its fingerprint is its config's alone, see the docstring."""
    out = Path(cfg.out_dir)
    data_cfg = dataclasses.replace(cfg.data, out=str(data_dir(out)))
    return Stage(
        "data",
        _stage_fingerprint(config_fingerprint(data_cfg, DATA_IGNORE), {}),
        data_dir(out),
        lambda: ingest(data_cfg),
        main_only=True,
        always=True,
    )


def plan_pipeline(
    cfg: PipelineConfig, dataset_id: str, logging: LoggingConfig | None = None
) -> Plan:
    """Every stage of the pipeline with its fingerprint and output folder, without running any.

    Args:
        cfg: The pipeline config.
        dataset_id: ``dataset_id`` of the data stage's finished set: every later stage's
            fingerprint depends on it ("" to plan before the set exists).
        logging: The training stages' logging section (:func:`stage_logging`; no part of any
            fingerprint), or None to keep the stage configs' own.

    Returns:
        The plan; its first stage is the data stage.
    """
    out = Path(cfg.out_dir)
    data = _data_stage(cfg)
    stages = [data]
    upstream = {"data": fingerprint({"config": data.fingerprint, "dataset_id": dataset_id})}
    sr_upstream = dict(upstream)
    sr_cfg = _sr_config(cfg, out, logging)
    sr_used = sr_cfg if sr_cfg is not None and cfg.sr_arms() else None
    if sr_used is not None:
        sr_stages = _sr_stages(cfg, sr_used, out, upstream)
        stages += sr_stages
        sr_upstream.update({s.name: s.fingerprint for s in sr_stages})
    # The lr arm always sees the SR stage's degradation, whether or not the SR arms run: an
    # hr/lr-only run (calibrating a benchmark) trains exactly the classifiers that the full
    # run trains, under the same fingerprints.
    degrade = [] if sr_cfg is None else _degrade_overrides(sr_cfg)
    for arm in cfg.arms:
        for seed in cfg.seeds:
            run_cfg = _arm_config(cfg, out, arm, seed, degrade, logging)
            stages += _classifier_stages(run_cfg, sr_upstream if needs_sr(arm) else upstream)
    return Plan(stages, sr_used)


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run (or finish) every stage.

    Args:
        cfg: The pipeline config.

    Returns:
        The path of the HTML report.
    """
    info = init_distributed("auto")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print0(dump_config(cfg))
    if info.is_main:
        save_config(cfg, out / "pipeline.yaml")
    stages = Stages(out, info.is_main)
    _run_stage(stages, _data_stage(cfg))
    dataset_id = read_index(data_dir(out)).dataset_id
    untracked = plan_pipeline(cfg, dataset_id)  # tracking changes no fingerprint
    fingerprints = [s.fingerprint for s in untracked.stages]
    parent = open_parent_run(cfg, out, dataset_id, fingerprints, info.is_main)
    plan = plan_pipeline(cfg, dataset_id, stage_logging(cfg, parent))
    try:
        for stage in plan.stages[1:]:  # the data stage ran above: the plan needed its set's id
            _run_stage(stages, stage)
        report_path = out / "report.html"
        if info.is_main:
            start = time.perf_counter()
            build_report(cfg, out, read_index(data_dir(out)), plan.sr_cfg)
            log_report(parent, out)
            print0(f"[pipeline] report: done in {time.perf_counter() - start:.1f} s")
            print0(f"\n[pipeline] report: {report_path.resolve()}")
        _barrier()
    except BaseException as exc:  # the parent run ends as failed (killed: interrupted)
        parent.finish(end_status(exc))
        raise
    parent.finish()
    return report_path


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
    """Train the SR network, then enhance the data set with it."""
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
    return [sr, enhance]


def _arm_config(
    cfg: PipelineConfig,
    out: Path,
    arm: str,
    seed: int,
    degrade: list[str],
    logging: LoggingConfig | None,
) -> TrainConfig:
    """The trainer config of one classifier: the classify stage plus the pipeline's settings."""
    overrides = [
        *degrade,
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
    own = config_fingerprint(run_cfg, TRAIN_IGNORE)
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


def _degrade_overrides(sr_cfg: TrainConfig) -> list[str]:
    """``data.degrade.*`` overrides giving the lr arm the SR stage's degradation (its LR images)."""
    d = sr_cfg.sr_degradation()
    overrides = []
    for f in dataclasses.fields(d):
        value = getattr(d, f.name)
        overrides.append(f"data.degrade.{f.name}={'null' if value is None else json.dumps(value)}")
    return overrides


def main(argv: list[str] | None = None) -> int:
    """``srmri pipeline --config FILE [key=value ...]``; returns the exit status."""
    import argparse
    import sys

    from srmri.config import ConfigError

    parser = argparse.ArgumentParser(prog="srmri pipeline", description=__doc__)
    parser.add_argument("--config", required=True, help="pipeline YAML (configs/quickstart.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        run_pipeline(load_pipeline_config(args.config, args.overrides))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
