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
from srmri.config import config_hash, dump_config, save_config
from srmri.distributed import init_distributed, print0
from trainer.config import TrainConfig, run_dir_of
from trainer.experiment.config import (
    PipelineConfig,
    StageConfig,
    arm_run_name,
    load_pipeline_config,
    trainer_config,
)
from trainer.experiment.enhance import enhance_with_checkpoint
from trainer.experiment.report import build_report

__all__ = ["PipelineConfig", "StageConfig", "main", "run_pipeline"]


class Stages:
    """``OUT/stages.json``: which stages finished, under which config hash."""

    def __init__(self, out: Path, is_main: bool) -> None:
        self.path = out / "stages.json"
        self.is_main = is_main
        self.done: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def finished(self, name: str, digest: str) -> bool:
        return self.done.get(name) == digest

    def mark(self, name: str, digest: str) -> None:
        self.done[name] = digest
        if self.is_main:
            tmp = self.path.with_name(".stages.json.tmp")
            tmp.write_text(json.dumps(self.done, indent=1))
            tmp.replace(self.path)


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
    """Run (or finish) every stage; returns the path of the HTML report."""
    from trainer.loop import evaluate, fit

    info = init_distributed("auto")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print0(dump_config(cfg))
    if info.is_main:
        save_config(cfg, out / "pipeline.yaml")
    stages = Stages(out, info.is_main)
    data_cfg = dataclasses.replace(cfg.data, out=str(out / "data"))
    _stage(stages, "data", config_hash(data_cfg), lambda: ingest(data_cfg), main_only=True)
    data_root = str(out / "data")

    sr_root = str(out / "data-sr")
    sr_cfg, degrade = None, []
    if cfg.sr.config:
        # The lr arm always sees the SR stage's degradation, whether or not the SR arms run:
        # an hr/lr-only run (calibrating a benchmark) trains exactly the classifiers that the
        # full run trains, under the same config hashes.
        sr_cfg = trainer_config(
            cfg.sr, [f"data.root={data_root}", f"out_dir={out / 'runs'}", "name=sr", "task=sr"]
        )
        degrade = [f"data.degrade.{k}={v}" for k, v in _degrade_items(sr_cfg)]
    sr_runs = sr_cfg is not None and any(a in ("sr", "lr+sr") for a in cfg.arms)
    if sr_runs:
        sr_run = run_dir_of(sr_cfg)
        _stage(stages, "sr", config_hash(sr_cfg), lambda: fit(sr_cfg))
        _stage(
            stages,
            "enhance",
            config_hash(sr_cfg) + str(cfg.enhance_batch),
            lambda: enhance_with_checkpoint(sr_run, data_root, sr_root, cfg.enhance_batch),
        )

    for arm in cfg.arms:
        for seed in cfg.seeds:
            name = arm_run_name(arm, seed)
            run_cfg = trainer_config(
                cfg.classify,
                [*degrade, f"data.root={data_root}", f"data.sr_root={sr_root}",
                 f"data.inputs={arm}", f"train.seed={seed}", f"out_dir={out / 'runs'}",
                 f"name={name}", "task=classify"],
            )  # fmt: skip
            _stage(stages, f"classify/{name}", config_hash(run_cfg), lambda c=run_cfg: fit(c))
            run_dir = out / "runs" / name
            _stage(stages, f"evaluate/{name}", config_hash(run_cfg),
                   lambda d=run_dir: evaluate(d, "test", d / "eval-test"))  # fmt: skip

    report_path = out / "report.html"
    if info.is_main:
        build_report(cfg, out, read_index(data_root), sr_cfg if sr_runs else None)
        print0(f"\n[pipeline] report: {report_path.resolve()}")
    _barrier()
    return report_path


def _degrade_items(sr_cfg: TrainConfig) -> list[tuple[str, Any]]:
    """The SR stage's degradation as override items, so the lr arm sees the same LR images."""
    d = sr_cfg.sr_degradation()
    items = []
    for f in dataclasses.fields(d):
        value = getattr(d, f.name)
        items.append((f.name, "null" if value is None else json.dumps(value)))
    return items


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
