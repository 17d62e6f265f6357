"""Benchmark of the pipeline's executors: serial against Ray, and a critical-path calculation.

1. Measured: the wall time of one pipeline (default ``configs/pipeline-smoke.yaml``) run
   serially and with ``--executor ray`` (a local Ray, or the cluster at ``--address``), each in
   a fresh folder under ``--out``, same config and overrides, one after the other. It prints
   both times, each stage's seconds, whether the test accuracies agree, and the commands.
2. Calculated, not measured: the wall time of ``configs/paper.yaml``'s stage graph on 1, 4 and
   16 GPU nodes against serial (the sum of the stages), by list scheduling (a node runs one
   stage at a time; a stage starts once its upstream stages ended, on the node free first)
   and the critical path (the bound with unlimited nodes). Per-stage seconds are the means
   per stage kind of measured ones: from the Ray run of part 1, from ``--seconds-from`` (an
   ``executor.json`` or a log with ``[pipeline] STAGE: done in S s`` lines), or set with
   ``--seconds KIND=S`` (e.g. paper-scale estimates: ``classify=5400 sr=14400``).

    python benchmarks/pipeline_executors.py                       # both runs, then the calculation
    python benchmarks/pipeline_executors.py --no-run --seconds-from runs/x/executor.json
    python benchmarks/pipeline_executors.py --no-run --seconds-from log.txt --seconds sr=14400
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_DONE = re.compile(r"^\[pipeline\] (\S+): done in ([0-9.]+) s$", re.M)
NODES = (1, 4, 16)
# (name, kind, upstream names) of every stage, in an order they can run serially.
Graph = list[tuple[str, str, tuple[str, ...]]]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/pipeline-smoke.yaml", help="pipeline to time")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="its overrides")
    p.add_argument("--out", default="", help="folder for the runs (default: a new temp folder)")
    p.add_argument("--address", default="", help="Ray cluster of the Ray run (default: local)")
    p.add_argument("--no-run", action="store_true", help="skip part 1, only calculate")
    p.add_argument("--graph", default="configs/paper.yaml", help="the stage graph calculated")
    p.add_argument("--seconds-from", default="", help="executor.json or log of measured stages")
    p.add_argument("--seconds", nargs="*", default=[], metavar="KIND=S", help="set a kind's s")
    return p


def run_once(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` from the checkout with its output in ``log``; returns its wall seconds."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        status = subprocess.run(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise SystemExit(f"exit {status}: {shlex.join(cmd)}; see {log}")
    return time.perf_counter() - start


def measure(config: str, overrides: list[str], out: Path, address: str) -> dict[str, dict]:
    """Time the pipeline serially and with the Ray executor, each in a fresh folder.

    Returns:
        Per executor: ``wall_s``, ``stages`` (name -> s), ``accuracy`` and ``command``.
    """
    base = [sys.executable, "-m", "launch.cli", "pipeline", "--config", config, *overrides]
    ray = ["--executor", "ray", *(["--address", address] if address else [])]
    runs = {}
    for kind, extra in (("serial", []), ("ray", ray)):
        folder = out / kind
        if folder.exists():
            raise SystemExit(f"{folder} exists: the benchmark times runs in fresh folders")
        cmd = [*base, f"out_dir={folder}", *extra]
        wall = run_once(cmd, out / f"{kind}.log")
        runs[kind] = {
            "wall_s": wall,
            "stages": stage_seconds(out / f"{kind}.log"),
            "accuracy": _accuracies(folder),
            "command": shlex.join(cmd),
        }
    runs["ray"]["stages"] = stage_seconds(out / "ray" / "executor.json")
    return runs


def print_stages(runs: dict[str, dict]) -> None:
    """Each stage's seconds in both runs (a Ray task's includes its process start)."""
    print("| stage | serial s | ray s |\n|---|---|---|")
    for name, secs in runs["serial"]["stages"].items():
        print(f"| {name} | {secs:.1f} | {runs['ray']['stages'].get(name, float('nan')):.1f} |")


def _accuracies(out: Path) -> dict[str, list[float]]:
    """Test accuracy per arm and seed of the pipeline in ``out`` (its results.json)."""
    arms = json.loads((out / "results.json").read_text())["arms"]
    return {arm: [s["accuracy"] for s in result["per_seed"]] for arm, result in arms.items()}


def stage_seconds(path: Path) -> dict[str, float]:
    """Seconds per stage that ran: from an ``executor.json`` or ``[pipeline] X: done in`` lines."""
    text = path.read_text()
    if path.suffix == ".json":
        stages = json.loads(text)["stages"]
        return {n: float(s["seconds"]) for n, s in stages.items() if s["status"] == "done"}
    return {name: float(s) for name, s in _DONE.findall(text)}


def kind_seconds(stages: dict[str, float], given: list[str]) -> dict[str, float]:
    """Mean seconds per stage kind, with ``KIND=S`` settings taking precedence."""
    by_kind: dict[str, list[float]] = {}
    for name, s in stages.items():
        by_kind.setdefault(name.split("/", 1)[0], []).append(s)
    means = {k: sum(v) / len(v) for k, v in by_kind.items()}
    for item in given:
        kind, _, value = item.partition("=")
        means[kind] = float(value)
    return means


def stage_graph(config: str) -> Graph:
    """``(name, kind, upstream)`` of every stage of ``config``'s pipeline, in serial order."""
    from trainer.experiment.pipeline import load_pipeline_config, plan_pipeline

    plan = plan_pipeline(load_pipeline_config(config, []), "")
    return [(s.name, s.kind, tuple(s.upstream)) for s in plan.stages]


def earliest_starts(graph: Graph, secs: dict[str, float]) -> dict[str, float]:
    """When each stage can start with as many nodes as stages (its upstream chain's length)."""
    start: dict[str, float] = {}
    for name, _, upstream in graph:  # serial order: the upstream stages come first
        start[name] = max((start[u] + secs[_kind(graph, u)] for u in upstream), default=0.0)
    return start


def _kind(graph: Graph, name: str) -> str:
    return next(kind for n, kind, _ in graph if n == name)


def critical_path(graph: Graph, secs: dict[str, float]) -> float:
    """The longest chain of stages: the wall time with unlimited nodes."""
    start = earliest_starts(graph, secs)
    return max(start[name] + secs[kind] for name, kind, _ in graph)


def list_schedule(graph: Graph, secs: dict[str, float], nodes: int) -> float:
    """Wall time on ``nodes`` nodes that run one stage each at a time.

    Stages are taken in the order they could start with unlimited nodes; each goes to the node
    free first and starts when that node is free and its upstream stages have ended (what the
    Ray executor does when each stage's resources are a whole node).
    """
    ready = earliest_starts(graph, secs)
    free = [0.0] * nodes
    end: dict[str, float] = {}
    for name, kind, upstream in sorted(graph, key=lambda g: ready[g[0]]):  # stable: ties keep order
        start = max([heapq.heappop(free), *(end[u] for u in upstream)])
        end[name] = start + secs[kind]
        heapq.heappush(free, end[name])
    return max(end.values())


def calculate(graph_config: str, secs: dict[str, float]) -> None:
    """Print the calculated wall times of ``graph_config``'s stage graph (see the module doc)."""
    graph = stage_graph(graph_config)
    missing = sorted({kind for _, kind, _ in graph} - set(secs))
    if missing:
        raise SystemExit(f"no seconds for stage kinds {missing}: measure them or pass --seconds")
    serial = sum(secs[kind] for _, kind, _ in graph)
    kinds = ", ".join(f"{k} {secs[k]:.1f} s" for k in sorted(secs))
    print(f"\nCALCULATION (not a measurement) for {graph_config}: {len(graph)} stages, {kinds}")
    print("| nodes | wall s | speed-up over serial |\n|---|---|---|")
    print(f"| serial | {serial:.0f} | 1.00 |")
    for n in NODES:
        wall = list_schedule(graph, secs, n)
        print(f"| {n} | {wall:.0f} | {serial / wall:.2f} |")
    path = critical_path(graph, secs)
    print(f"| unlimited (critical path) | {path:.0f} | {serial / path:.2f} |")


def main(argv: list[str] | None = None) -> int:
    """Run the measurement (unless ``--no-run``) and the calculation; returns 0."""
    args = _parser().parse_args(argv)
    os.chdir(ROOT)  # the configs name their trainer YAMLs relative to the checkout
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    measured: dict[str, float] = {}
    if not args.no_run:
        out = Path(args.out or tempfile.mkdtemp(prefix="pipeline-executors-"))
        out.mkdir(parents=True, exist_ok=True)
        runs = measure(args.config, args.overrides, out, args.address)
        print_stages(runs)
        for kind, run in runs.items():
            print(f"MEASURED {kind}: {run['wall_s']:.1f} s wall  ({run['command']})")
        same = runs["serial"]["accuracy"] == runs["ray"]["accuracy"]
        print(
            f"speed-up: {runs['serial']['wall_s'] / runs['ray']['wall_s']:.2f}x; "
            f"same test accuracies: {'yes' if same else 'NO'}; cpus: {os.cpu_count()}"
        )
        measured = runs["ray"]["stages"]
    if args.seconds_from:
        measured = stage_seconds(Path(args.seconds_from))
    calculate(args.graph, kind_seconds(measured, args.seconds))
    print(f"\ncommand: {shlex.join([sys.executable, *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
