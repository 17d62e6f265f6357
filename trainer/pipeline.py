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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch.distributed as dist

from shards.config import config_hash, dump_config, load_config, require, save_config
from shards.format import read_index
from shards.ingest import IngestConfig, ingest
from trainer.config import TrainConfig, load_train_config
from trainer.distributed import init_distributed, print0

__all__ = ["PipelineConfig", "StageConfig", "run_pipeline"]

Arm = Literal["hr", "lr", "sr", "lr+sr"]


@dataclass
class StageConfig:
    """A training stage: a trainer YAML plus overrides (the pipeline adds data paths)."""

    config: str = ""
    overrides: list[str] = field(default_factory=list)


@dataclass
class ReportConfig:
    """What the report computes.

    Attributes:
        bootstrap: Bootstrap replicates for the paired confidence intervals.
        gradcam_per_class: Correct and wrong test samples per class shown with Grad-CAM.
        pairs: Paired comparisons (a, b) reported as a - b.
    """

    bootstrap: int = 2000
    gradcam_per_class: int = 2
    pairs: list[tuple[str, str]] = field(
        default_factory=lambda: [("lr+sr", "lr"), ("sr", "lr"), ("hr", "lr")]
    )


@dataclass
class PipelineConfig:
    """The whole experiment.

    Attributes:
        out_dir: Everything goes here: data, runs, report.
        data: How the data set is made (``source: synth`` is the built-in default).
        sr: The SR training stage (``task: sr`` trainer config).
        classify: The classifier stage (``task: classify`` trainer config).
        arms: Input arms trained and compared.
        seeds: Classifier seeds per arm.
        enhance_batch: Batch size of the enhance stage.
        report: Report settings.
    """

    out_dir: str = "runs/pipeline"
    data: IngestConfig = field(default_factory=IngestConfig)
    sr: StageConfig = field(default_factory=StageConfig)
    classify: StageConfig = field(default_factory=StageConfig)
    arms: list[Arm] = field(default_factory=lambda: ["hr", "lr", "sr", "lr+sr"])
    seeds: list[int] = field(default_factory=lambda: [0])
    enhance_batch: int = 16
    report: ReportConfig = field(default_factory=ReportConfig)

    def check(self) -> None:
        require(bool(self.arms), "arms", "name at least one input arm")
        require(len(set(self.arms)) == len(self.arms), "arms", "arms must be distinct")
        require(bool(self.seeds), "seeds", "name at least one seed")
        require(bool(self.classify.config), "classify.config", "a trainer YAML is required")
        needs_sr = any(a in ("sr", "lr+sr") for a in self.arms)
        require(not needs_sr or bool(self.sr.config), "sr.config", "the sr arms need an SR stage")


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


def trainer_config(stage: StageConfig, extra: list[str]) -> TrainConfig:
    """The stage's trainer config with the pipeline's own overrides applied last."""
    return load_train_config(stage.config or None, [*stage.overrides, *extra])


def arm_run_name(arm: str, seed: int) -> str:
    """Run directory name of one classifier (``lr+sr`` becomes ``lr-sr``)."""
    return f"{arm.replace('+', '-')}-seed{seed}"


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
        _stage(stages, "sr", config_hash(sr_cfg), lambda: fit(sr_cfg))
        _stage(stages, "enhance", config_hash(sr_cfg) + str(cfg.enhance_batch),
               lambda: _enhance(sr_cfg, data_root, sr_root, cfg.enhance_batch))  # fmt: skip

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
        from trainer.report import build_report

        build_report(cfg, out, read_index(data_root), sr_cfg if sr_runs else None)
        print0(f"\n[pipeline] report: {report_path.resolve()}")
    _barrier()
    return report_path


def _degrade_items(sr_cfg: TrainConfig) -> list[tuple[str, Any]]:
    """The SR stage's degradation as override items, so the lr arm sees the same LR images."""
    d = dataclasses.replace(sr_cfg.data.degrade, scale=sr_cfg.sr.scale, random_scale=None)
    items = []
    for f in dataclasses.fields(d):
        value = getattr(d, f.name)
        items.append((f.name, "null" if value is None else json.dumps(value)))
    return items


def _enhance(sr_cfg: TrainConfig, data_root: str, sr_root: str, batch: int) -> None:
    from shards.enhance import EnhanceSpec, enhance
    from trainer.sr_task import load_sr_checkpoint

    info = init_distributed("auto")
    run_dir = Path(sr_cfg.out_dir) / sr_cfg.name
    model, cfg, model_id = load_sr_checkpoint(run_dir, info.device)
    degrade = dataclasses.replace(cfg.data.degrade, scale=cfg.sr.scale, random_scale=None)
    spec = EnhanceSpec(degrade, cfg.train.seed, model_id, batch)
    enhance(data_root, sr_root, model, spec, info.device, info.rank, info.world_size)


def load_pipeline_config(path: str | None, overrides: list[str]) -> PipelineConfig:
    """Load and check a pipeline config (YAML plus dotted overrides)."""
    return load_config(PipelineConfig, path, overrides)


def main(argv: list[str] | None = None) -> int:
    """``srmri pipeline --config FILE [key=value ...]``; returns the exit status."""
    import argparse
    import sys

    from shards.config import ConfigError

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
