"""``launch slurm -- pipeline ...``: the pipeline's stages as Slurm jobs chained by ``afterok``.

The plan (:func:`trainer.experiment.plan.plan_status`) names every stage, its upstream and
whether it is done. Each stage not done, and the data stage (it always runs, to check its
inputs), becomes one sbatch job that runs ``srmri pipeline --stage NAME`` alone, with
``--dependency=afterok:<the jobs of its upstream stages>`` and ``--kill-on-invalid-dep=yes``: a
stage that fails gets everything downstream of it cancelled rather than left pending for ever.
Resources per kind: SR training and enhance run on every requested node (one torchrun per node,
as a trainer job does); each classifier and its test evaluation on one node (torchrun over that
node's ranks), so the classifiers of all arms and seeds, which are independent, run in
parallel; data and report as one plain process on one node. The jobs that run on ranks keep a
trainer job's pre-emption signal and requeue (a pre-empted classifier resumes from its last
checkpoint when Slurm starts it again).

The DAG is recorded in ``OUT/slurm-dag.json`` (OUT: the pipeline's ``out_dir`` under the jobs'
working directory), which ``python -m launch status|logs|cancel OUT`` read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launch.program import Program
from launch.slurm import SlurmOptions, job_dirs, render_sbatch, submit_sbatch
from launch.slurm_jobs import DAG_FILE, is_active, read_dag, show_job
from srmri.atomic import write_json

if TYPE_CHECKING:  # the plan pulls in torch: imported only when a pipeline is launched
    from trainer.experiment.plan import PlannedStage

__all__ = ["PipelineArgs", "dag_args", "run_slurm_pipeline", "stage_options", "stage_program"]

# Stage kinds spread over every requested node; every other kind gets one node.
_WIDE = ("sr", "enhance")
# What a job name may not hold (``classify/hr-seed0`` becomes ``NAME-classify-hr-seed0``).
_UNSAFE = re.compile(r"[^\w.-]")

# What the loop hands each stage's rendered script to: submit it (job id back) or print it.
Submit = Callable[["PlannedStage", str, SlurmOptions], str]


@dataclasses.dataclass(frozen=True)
class PipelineArgs:
    """A whole pipeline's command line: ``pipeline --config CONFIG OVERRIDES...``.

    Attributes:
        config: The pipeline YAML, as typed (relative to the jobs' working directory).
        overrides: Its dotted overrides.
    """

    config: str
    overrides: tuple[str, ...]


def dag_args(program: Program) -> PipelineArgs | None:
    """The config and overrides when ``program`` is a whole pipeline, else None.

    The words are read by the pipeline's own parser (a bad one fails here, before any job).
    ``pipeline --stage NAME``, ``--plan`` and ``--executor``/``--address`` (a pipeline that
    schedules itself) stay single jobs.
    """
    if not program.is_pipeline:
        return None
    from trainer.experiment.pipeline import pipeline_parser  # torch: only for a pipeline

    args = pipeline_parser().parse_intermixed_args(list(program.args[1:]))
    if args.stage or args.plan or args.expect_dataset_id or args.executor or args.address:
        return None
    return PipelineArgs(args.config, tuple(args.overrides))


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """Work in ``folder`` inside the block (``contextlib.chdir`` is Python 3.11+)."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _plan(
    options: SlurmOptions, args: PipelineArgs, cwd: Path | None
) -> tuple[Path, str, list[PlannedStage]]:
    """Plan in the jobs' working directory: the config's relative paths mean what they will."""
    from trainer.experiment.config import load_pipeline_config
    from trainer.experiment.plan import plan_status

    workdir, _ = job_dirs(options, cwd)
    with _inside(workdir):
        cfg = load_pipeline_config(args.config, list(args.overrides))
        dataset_id, stages = plan_status(cfg)
        out = Path(cfg.out_dir).resolve()
    return out, dataset_id, stages


def stage_options(
    options: SlurmOptions, stage: PlannedStage, index: int, after: list[str]
) -> SlurmOptions:
    """The job options of one stage: its nodes, its name and its dependency.

    Args:
        options: The options given to ``launch slurm``.
        stage: The stage.
        index: Its place in the plan (offsets a fixed ``--port``: jobs may share a node).
        after: Job ids (or dry-run placeholders) of its upstream stages' jobs.

    Returns:
        A copy of ``options`` for the stage's job.
    """
    deps = [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
    return dataclasses.replace(
        options,
        nodes=options.nodes if stage.kind in _WIDE else 1,
        job_name=f"{options.job_name}-{_UNSAFE.sub('-', stage.name)}",
        port=options.port + index if options.port else 0,
        extra=[*options.extra, *(deps if after else [])],
    )


def stage_program(args: PipelineArgs, stage: PlannedStage, dataset_id: str) -> Program:
    """``srmri pipeline --stage NAME`` for one stage, on every rank when the plan says so.

    The data job gets ``--expect-dataset-id`` when a set exists: the stages were planned
    against it, and a data job that finds the inputs changed fails (cancelling them all).
    """
    from trainer.experiment.plan import stage_argv

    expect = dataset_id if stage.kind == "data" else ""
    words = stage_argv(args.config, list(args.overrides), stage.name, expect)
    return Program("launch.cli", tuple(words), spread=stage.distributed)


def _each_job(
    options: SlurmOptions,
    args: PipelineArgs,
    planned: list[PlannedStage],
    dataset_id: str,
    cwd: Path | None,
    submit: Submit,
) -> dict[str, str]:
    """Render each stage to run (upstream first) and hand it to ``submit``; stage -> job."""
    jobs: dict[str, str] = {}
    for index, stage in enumerate(planned):
        if stage.done:  # plan_status never says so of the data stage
            continue
        after = [jobs[name] for name in stage.upstream if name in jobs]
        opts = stage_options(options, stage, index, after)
        program = stage_program(args, stage, dataset_id)
        script = render_sbatch(opts, program, cwd, title=f"pipeline stage {stage.name}")
        jobs[stage.name] = submit(stage, script, opts)
    return jobs


def _script_path(options: SlurmOptions, cwd: Path | None) -> Path:
    return job_dirs(options, cwd)[1] / f"{options.job_name}.sbatch"


def _refuse_while_queued(out: Path) -> None:
    """Fail when jobs of the DAG submitted before are still in Slurm: they would race new ones."""
    dag = read_dag(out)
    if dag is None:
        return
    busy = []
    for name, entry in dag["stages"].items():
        job = show_job(entry["job"]) if entry["job"] != "done" else None
        if job is not None and is_active(job):
            busy.append(f"{name} ({job.job_id} {job.state})")
    if busy:
        raise RuntimeError(
            f"the pipeline's earlier DAG still has jobs in Slurm: {', '.join(busy)}; wait for "
            f"them (python -m launch status {out}) or cancel them (python -m launch cancel {out})"
        )


def _submit_all(
    options: SlurmOptions,
    args: PipelineArgs,
    planned: list[PlannedStage],
    dataset_id: str,
    cwd: Path | None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Submit every job; on a failed sbatch cancel the ones submitted. Returns jobs, scripts."""
    scripts: dict[str, str] = {}

    def submit(stage: PlannedStage, script: str, opts: SlurmOptions) -> str:
        job = submit_sbatch(script, opts, cwd)
        scripts[job] = str(_script_path(opts, cwd))
        return job

    try:
        return _each_job(options, args, planned, dataset_id, cwd, submit), scripts
    except BaseException:
        for job in reversed(list(scripts)):  # half a DAG would run stages nobody recorded
            subprocess.run(["scancel", job], capture_output=True, check=False)
        raise


def _record(
    options: SlurmOptions,
    args: PipelineArgs,
    planned: list[PlannedStage],
    dataset_id: str,
    jobs: tuple[dict[str, str], dict[str, str]],
    cwd: Path | None,
) -> dict[str, Any]:
    """The content of ``OUT/slurm-dag.json``."""
    by_stage, scripts = jobs
    workdir, output_dir = job_dirs(options, cwd)
    stages = {}
    for s in planned:
        job = by_stage.get(s.name, "done")
        stages[s.name] = {
            "job": job,
            "script": scripts.get(job, ""),
            "upstream": list(s.upstream),
            "kind": s.kind,
            "fingerprint": s.fingerprint,
        }
    return {
        "config": args.config,
        "overrides": list(args.overrides),
        "workdir": str(workdir),
        "output_dir": str(output_dir),
        "dataset_id": dataset_id,
        "stages": stages,
    }


def _print_dry_run(
    options: SlurmOptions,
    args: PipelineArgs,
    planned: list[PlannedStage],
    dataset_id: str,
    cwd: Path | None,
) -> None:
    """Print every script; an upstream job id shows as ``<stage>``."""

    def show(stage: PlannedStage, script: str, opts: SlurmOptions) -> str:
        print(f"# ===== stage {stage.name}: {_script_path(opts, cwd)} =====\n{script}")
        return f"<{stage.name}>"

    jobs = _each_job(options, args, planned, dataset_id, cwd, show)
    done = len(planned) - len(jobs)
    print(f"dry run: {len(jobs)} job(s), {done} stage(s) done before", file=sys.stderr)


def run_slurm_pipeline(
    options: SlurmOptions, args: PipelineArgs, dry_run: bool = False, cwd: Path | None = None
) -> int:
    """Plan the pipeline and submit its stages as a DAG (or print the scripts).

    Args:
        options: The options given to ``launch slurm`` (``--nodes`` is SR's and enhance's).
        args: The pipeline's config and overrides.
        dry_run: Print every script, submit nothing.
        cwd: What a relative ``--workdir`` means (default: the current directory).

    Returns:
        0 on success.

    Raises:
        RuntimeError: sbatch failed, or jobs of an earlier DAG are still in Slurm.
    """
    out, dataset_id, planned = _plan(options, args, cwd)
    if dry_run:
        _print_dry_run(options, args, planned, dataset_id, cwd)
        return 0
    _refuse_while_queued(out)
    jobs = _submit_all(options, args, planned, dataset_id, cwd)
    write_json(out / DAG_FILE, _record(options, args, planned, dataset_id, jobs, cwd))
    for name, job in jobs[0].items():
        print(f"{name} {job}", flush=True)
    done = len(planned) - len(jobs[0])
    print(f"submitted {len(jobs[0])} Slurm job(s); {done} stage(s) done before", file=sys.stderr)
    if done == len(planned) - 1:
        print(
            "every stage but data is done under its fingerprint; the data job checks the "
            "inputs (when they changed it fails: run the command again)",
            file=sys.stderr,
        )
    print(f"DAG: {out / DAG_FILE}   status: python -m launch status {out}", file=sys.stderr)
    return 0
