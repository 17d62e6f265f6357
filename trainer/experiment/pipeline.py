"""``srmri pipeline``: the paper's experiment end to end, one stage after another.

data (synth or ingest) -> SR training -> enhance -> classifier per input arm and seed ->
test evaluation -> report. Each stage records the hash of the config that defines it in
``OUT/stages.json``; a re-run skips stages whose hash matches and resumes the others (training
resumes from its run directory's last checkpoint, ingest and enhance from their own journals).
Under torchrun every stage runs distributed: training and enhance on all ranks, ingest and the
report on rank 0 while the others wait.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from shards.format import read_index
from shards.ingest import ingest
from srmri.atomic import write_json
from srmri.config import config_hash, dump_config, save_config
from srmri.distributed import init_distributed, print0
from trainer.config import TrainConfig, run_dir_of
from trainer.experiment.config import (
    SR_RUN_NAME,
    PipelineConfig,
    StageConfig,
    arm_run_name,
    data_dir,
    load_pipeline_config,
    runs_dir,
    sr_data_dir,
    trainer_config,
)
from trainer.experiment.enhance import enhance_with_checkpoint
from trainer.experiment.report import build_report
from trainer.rundir import eval_dir_of

__all__ = ["PipelineConfig", "StageConfig", "main", "run_pipeline"]


class Stages:
    """``OUT/stages.json``: which stages finished, under which config hash."""

    def __init__(self, out: Path, is_main: bool) -> None:
        self.path = out / "stages.json"
        self.is_main = is_main
        self.done: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def finished(self, name: str, digest: str) -> bool:
        """Whether stage ``name`` finished under the config hash ``digest``."""
        return self.done.get(name) == digest

    def mark(self, name: str, digest: str) -> None:
        """Record stage ``name`` as finished under ``digest`` (rank 0 writes the file)."""
        self.done[name] = digest
        if self.is_main:
            write_json(self.path, self.done, indent=1)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _stage(
    stages: Stages, name: str, digest: str, work: Callable[[], Any], main_only: bool = False
) -> None:
    if stages.finished(name, digest):
        print0(f"[pipeline] {name}: done before (config {digest[:10]}), skipped")
        return
    print0(f"[pipeline] {name}: running")
    if not main_only or stages.is_main:
        work()
    _barrier()
    stages.mark(name, digest)


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
    data_cfg = dataclasses.replace(cfg.data, out=str(data_dir(out)))
    _stage(stages, "data", config_hash(data_cfg), lambda: ingest(data_cfg), main_only=True)

    sr_cfg = _sr_config(cfg, out)
    sr_used = sr_cfg if sr_cfg is not None and cfg.sr_arms() else None
    if sr_used is not None:
        _sr_stages(stages, cfg, sr_used, out)
    # The lr arm always sees the SR stage's degradation, whether or not the SR arms run: an
    # hr/lr-only run (calibrating a benchmark) trains exactly the classifiers that the full
    # run trains, under the same config hashes.
    degrade = [] if sr_cfg is None else _degrade_overrides(sr_cfg)
    for arm in cfg.arms:
        for seed in cfg.seeds:
            _classifier_stages(stages, _arm_config(cfg, out, arm, seed, degrade))

    report_path = out / "report.html"
    if info.is_main:
        build_report(cfg, out, read_index(data_dir(out)), sr_used)
        print0(f"\n[pipeline] report: {report_path.resolve()}")
    _barrier()
    return report_path


def _sr_config(cfg: PipelineConfig, out: Path) -> TrainConfig | None:
    """The SR stage's trainer config, or None when the pipeline has no SR stage."""
    if not cfg.sr.config:
        return None
    overrides = [f"data.root={data_dir(out)}", f"out_dir={runs_dir(out)}", "task=sr"]
    return trainer_config(cfg.sr, [*overrides, f"name={SR_RUN_NAME}"])


def _sr_stages(stages: Stages, cfg: PipelineConfig, sr_cfg: TrainConfig, out: Path) -> None:
    """Train the SR network, then enhance the data set with it."""
    from trainer.loop import fit  # the loop pulls in every backend: import it when one trains

    sr_run = run_dir_of(sr_cfg)
    digest = config_hash(sr_cfg)
    _stage(stages, "sr", digest, lambda: fit(sr_cfg))
    _stage(
        stages,
        "enhance",
        digest + str(cfg.enhance_batch),
        lambda: enhance_with_checkpoint(sr_run, data_dir(out), sr_data_dir(out), cfg.enhance_batch),
    )


def _arm_config(
    cfg: PipelineConfig, out: Path, arm: str, seed: int, degrade: list[str]
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
    return trainer_config(cfg.classify, overrides)


def _classifier_stages(stages: Stages, run_cfg: TrainConfig) -> None:
    """Train one classifier, then evaluate it on the test split."""
    from trainer.loop import evaluate, fit

    digest = config_hash(run_cfg)
    run_dir = run_dir_of(run_cfg)
    _stage(stages, f"classify/{run_cfg.name}", digest, lambda: fit(run_cfg))
    _stage(
        stages,
        f"evaluate/{run_cfg.name}",
        digest,
        lambda: evaluate(run_dir, "test", eval_dir_of(run_dir, "test")),
    )


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
