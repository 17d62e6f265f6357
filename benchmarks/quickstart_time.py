"""Benchmark of the README's main job: the quickstart idle, then beside one CPU-bound process.

Runs ``python -m launch.cli pipeline --config CONFIG out_dir=OUT/<mode>`` in a fresh folder per
mode, one after another in this invocation:

1. ``idle``: nothing else started by the benchmark (the machine's load is printed with it);
2. ``busy``: beside one CPU-bound process (a Python busy loop, as a laptop's other work),
   started before the pipeline and stopped after it.

It prints each stage's seconds (the pipeline's ``[pipeline] STAGE: done in S s`` lines), the
total wall time against the issue's targets (10 minutes idle, 13 busy), the load average
before and after each run, and whether the two runs in their fresh folders gave the same test
accuracies to 4 decimals. Full logs go to ``OUT/<mode>.log``.

    python benchmarks/quickstart_time.py                         # both modes, OUT in /tmp
    python benchmarks/quickstart_time.py --modes idle --out /tmp/qs
"""

from __future__ import annotations

import argparse
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
TARGETS_S = {"idle": 600.0, "busy": 780.0}  # issue 14: 10 minutes idle, 13 beside a process
_DONE = re.compile(r"^\[pipeline\] (\S+): done in ([0-9.]+) s$", re.M)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    p.add_argument("--out", default="", help="folder for the runs (default: a new temp folder)")
    p.add_argument("--modes", default="idle,busy", help="comma-separated: idle, busy")
    return p


def run_mode(config: str, out: Path, mode: str) -> dict:
    """Run the pipeline once in ``out/mode``; returns its stage times, wall time and loads.

    Args:
        config: The pipeline config.
        out: The benchmark's folder.
        mode: ``idle`` or ``busy`` (a busy-loop process runs beside the pipeline).

    Returns:
        ``{"mode", "wall_s", "stages": {name: s}, "load_before", "load_after", "accuracy"}``.
    """
    run_dir = out / mode
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: the benchmark times runs in fresh folders")
    cmd = [sys.executable, "-m", "launch.cli", "pipeline", "--config", config]
    cmd.append(f"out_dir={run_dir}")
    hog = None
    if mode == "busy":
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(2.0)  # let the scheduler see it before the pipeline starts
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        with open(out / f"{mode}.log", "w") as log:
            status = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{mode}: the pipeline failed (exit {status}); see {out / mode}.log")
    text = (out / f"{mode}.log").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    accuracy = {
        arm: [round(s["accuracy"], 4) for s in a["per_seed"]] for arm, a in results["arms"].items()
    }
    return {
        "mode": mode,
        "wall_s": wall,
        "stages": {name: float(s) for name, s in _DONE.findall(text)},
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "accuracy": accuracy,
    }


def print_table(runs: list[dict]) -> None:
    """Print the per-stage seconds of every mode, the totals against the targets, and agreement."""
    names = list(dict.fromkeys(n for r in runs for n in r["stages"]))
    print("\n| stage | " + " | ".join(f"{r['mode']} s" for r in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for n in names:
        cells = " | ".join(f"{r['stages'].get(n, float('nan')):.1f}" for r in runs)
        print(f"| {n} | {cells} |")
    print("| **total wall** | " + " | ".join(f"**{r['wall_s']:.0f}**" for r in runs) + " |")
    for r in runs:
        target = TARGETS_S[r["mode"]]
        verdict = "met" if r["wall_s"] <= target else "NOT met"
        print(
            f"{r['mode']}: {r['wall_s'] / 60:.1f} min against {target / 60:.0f} min: {verdict} "
            f"(load {r['load_before']:.2f} before, {r['load_after']:.2f} after)"
        )
    for r in runs:
        print(f"{r['mode']} test accuracy per arm and seed: {r['accuracy']}")
    if len(runs) > 1:
        same = all(r["accuracy"] == runs[0]["accuracy"] for r in runs[1:])
        print(f"same accuracies to 4 decimals in fresh folders: {'yes' if same else 'NO'}")


def main(argv: list[str] | None = None) -> int:
    """Run the modes asked for and print the table; returns 0."""
    args = _parser().parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="quickstart-time-"))
    out.mkdir(parents=True, exist_ok=True)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in TARGETS_S:
            raise SystemExit(f"--modes: unknown mode {m!r} (idle, busy)")
    runs = [run_mode(args.config, out, m) for m in modes]
    print_table(runs)
    print(f"\ncommand: {shlex.join([sys.executable, *sys.argv])}  (cpus: {os.cpu_count()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
