"""``srmri pipeline``: the paper's experiment end to end, or one of its stages.

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
distributed: training, evaluation and enhance on all ranks, ingest and the report on rank 0
while the others wait.

``--stage NAME`` runs one stage alone once the stages it reads are done (what an executor's
Ray task or Slurm job runs); ``--plan`` prints every stage, its upstream and whether it is
done, as JSON. Stages that run at the same time in separate processes share ``stages.json``
under a lock (:mod:`trainer.experiment.stage`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import get_args

from shards.format import read_index
from srmri.config import ConfigError, dump_config, save_config
from srmri.distributed import init_distributed, print0
from trainer.experiment.archive import is_archive
from trainer.experiment.config import (
    ExecutorKind,
    PipelineConfig,
    StageConfig,
    data_dir,
    load_pipeline_config,
)
from trainer.experiment.parent_run import open_parent_run, stage_logging
from trainer.experiment.plan import (
    Plan,
    PlannedStage,
    data_stage,
    plan_pipeline,
    plan_status,
    stage_argv,
)
from trainer.experiment.stage import PipelineError, Stage, Stages, locked, run_stage
from trainer.shared_run import end_status

__all__ = [
    "PipelineConfig",
    "PipelineError",
    "Plan",
    "PlannedStage",
    "Stage",
    "StageConfig",
    "main",
    "plan_pipeline",
    "plan_status",
    "run_pipeline",
    "stage_argv",
]


def _run_data(cfg: PipelineConfig, stages: Stages, expect_dataset_id: str) -> str:
    """Run the data stage and return its set's id; fail when it is not the one expected."""
    run_stage(stages, data_stage(cfg))
    dataset_id = read_index(data_dir(Path(cfg.out_dir))).dataset_id
    if expect_dataset_id and dataset_id != expect_dataset_id:
        raise PipelineError(
            f"the data set changed since the stages were planned ({expect_dataset_id[:12]} -> "
            f"{dataset_id[:12]}): the stages planned against the old set would be stale; "
            "run the same command again to plan against the new one"
        )
    return dataset_id


def _check_upstream(stages: Stages, plan: Plan, stage: Stage) -> None:
    """Fail unless every stage ``stage`` reads is done under the fingerprint the plan gives it."""
    for name in stage.upstream:
        if name == "data":
            continue  # checked by the caller: the plan exists only for a finished set
        want = plan.stage(name)
        if not stages.done(want):
            record = stages.get(name)
            state = "never ran" if record is None else f"{record.status} under another config"
            if record is not None and record.fingerprint == want.fingerprint:
                state = record.status
            raise PipelineError(
                f"stage {stage.name} reads {name}, which is not done ({state}): run "
                f"`--stage {name}` first, or the whole pipeline"
            )


def run_pipeline(cfg: PipelineConfig, only: str | None = None, expect_dataset_id: str = "") -> Path:
    """Run (or finish) every stage, or only one of them.

    Args:
        cfg: The pipeline config.
        only: Run just this stage (what an executor's task or job does); its upstream stages
            must be done. None runs every stage in order.
        expect_dataset_id: With ``only="data"``: fail when the finished set is not this one.

    Returns:
        The path of the HTML report (written once the report stage ran).

    Raises:
        PipelineError: ``only``'s upstream stages are not done, the data set changed, or
            ``out_dir`` is an archive.
    """
    out = Path(cfg.out_dir)
    if is_archive(out):  # its stages look done, but it holds nothing to continue from
        raise PipelineError(
            f"{out}: an archive of a finished pipeline (records only, no data or weights); "
            "give another out_dir"
        )
    info = init_distributed("auto")
    out.mkdir(parents=True, exist_ok=True)
    print0(dump_config(cfg))
    if info.is_main:
        save_config(cfg, out / "pipeline.yaml")
    stages = Stages(out, info.is_main)
    report_path = out / "report.html"
    if only in (None, "data"):
        dataset_id = _run_data(cfg, stages, expect_dataset_id)
        if only == "data":
            return report_path
    elif stages.get("data") is None or stages.get("data").status != "done":
        raise PipelineError(
            f"stage {only} reads the data set, which is not made yet: run "
            "`--stage data` first, or the whole pipeline"
        )
    else:
        dataset_id = read_index(data_dir(out)).dataset_id
    untracked = plan_pipeline(cfg, dataset_id)  # tracking changes no fingerprint
    if only is not None:
        _check_upstream(stages, untracked, untracked.stage(only))
    with locked(out):  # stages in other processes continue the same parent run
        fingerprints = [s.fingerprint for s in untracked.stages]
        parent = open_parent_run(cfg, out, dataset_id, fingerprints, info.is_main)
    plan = plan_pipeline(cfg, dataset_id, stage_logging(cfg, parent), parent)
    todo = plan.stages[1:] if only is None else [plan.stage(only)]
    try:
        for stage in todo:
            run_stage(stages, stage)
    except BaseException as exc:  # the parent run ends as failed (killed: interrupted)
        parent.finish(end_status(exc))
        raise
    if only in (None, "report"):  # the parent run ends with the report
        parent.finish()
        print0(f"\n[pipeline] report: {report_path.resolve()}")
    return report_path


def _executor_flags(args: argparse.Namespace) -> list[str]:
    """``--executor``/``--address`` as the overrides they stand for (applied last)."""
    flags = [f"executor.kind={args.executor}"] if args.executor else []
    if args.address is not None:  # JSON-quoted: YAML would read some HOST:PORT as a number
        flags.append(f"executor.address={json.dumps(args.address)}")
    return flags


def pipeline_parser() -> argparse.ArgumentParser:
    """The command line of ``srmri pipeline`` (``launch slurm`` reads a pipeline's with it)."""
    parser = argparse.ArgumentParser(prog="srmri pipeline", description=__doc__)
    parser.add_argument("--config", required=True, help="pipeline YAML (configs/quickstart.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--stage", help="run only this stage (its upstream must be done)")
    parser.add_argument("--plan", action="store_true", help="print the stages as JSON, run none")
    parser.add_argument("--expect-dataset-id", default="", help=argparse.SUPPRESS)
    parser.add_argument("--executor", choices=get_args(ExecutorKind), help="= executor.kind=...")
    parser.add_argument("--address", help="Ray cluster, HOST:PORT or auto (= executor.address)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``srmri pipeline --config FILE [key=value ...] [--stage NAME | --plan]
    [--executor serial|ray] [--address HOST:PORT]``; returns the exit status."""
    import sys

    parser = pipeline_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_pipeline_config(args.config, [*args.overrides, *_executor_flags(args)])
        if args.plan:
            dataset_id, planned = plan_status(cfg)
            rows = [dataclasses.asdict(p) for p in planned]
            print(json.dumps({"dataset_id": dataset_id, "stages": rows}, indent=1))
            return 0
        if cfg.executor.kind == "ray" and args.stage is None:  # a stage alone runs here
            from trainer.experiment.ray_executor import run_with_ray

            # the stages get the flags too: each rewrites OUT/pipeline.yaml, which says how it ran
            run_with_ray(cfg, args.config, [*args.overrides, *_executor_flags(args)])
        else:
            run_pipeline(cfg, args.stage, args.expect_dataset_id)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"srmri pipeline: error: {exc}", file=sys.stderr)
        return 1
    return 0
