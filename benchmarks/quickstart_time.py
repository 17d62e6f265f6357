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

With ``--fresh-clone`` each mode instead clones this repository's HEAD into ``OUT/<mode>``
and runs what a new user runs there, ``make setup`` then ``make quickstart`` (its config is
the clone's own ``configs/quickstart.yaml``), and the total is set-up plus quickstart: the
figure issue 14's targets are about. The busy process runs beside both.

    python benchmarks/quickstart_time.py                         # both modes, OUT in /tmp
    python benchmarks/quickstart_time.py --modes idle --out /tmp/qs
    python benchmarks/quickstart_time.py --fresh-clone --out /tmp/qs-fresh
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
    p.add_argument(
        "--fresh-clone", action="store_true", help="clone HEAD, time `make setup` + quickstart"
    )
    return p


def _commands(config: str, out: Path, mode: str, fresh_clone: bool) -> tuple[Path, list]:
    """Where the run writes its results and the timed ``(label, argv, cwd)`` steps of a mode."""
    run_dir = out / mode
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: the benchmark times runs in fresh folders")
    if not fresh_clone:
        cmd = [sys.executable, "-m", "launch.cli", "pipeline", "--config", config]
        return run_dir, [("quickstart", [*cmd, f"out_dir={run_dir}"], ROOT)]
    subprocess.run(["git", "clone", "-q", str(ROOT), str(run_dir)], check=True)
    steps = [("setup", ["make", "setup"], run_dir), ("quickstart", ["make", "quickstart"], run_dir)]
    return run_dir / "runs" / "quickstart", steps


def run_mode(config: str, out: Path, mode: str, fresh_clone: bool = False) -> dict:
    """Run the quickstart once in a fresh folder; returns its stage times, wall time and loads.

    Args:
        config: The pipeline config (unused with ``fresh_clone``: the clone's own).
        out: The benchmark's folder.
        mode: ``idle`` or ``busy`` (a busy-loop process runs beside the pipeline).
        fresh_clone: Clone HEAD into ``out/mode`` and time ``make setup`` + ``make quickstart``.

    Returns:
        ``{"mode", "wall_s", "stages": {name: s}, "load_before", "load_after", "accuracy"}``;
        with ``fresh_clone`` the stages include ``setup``.
    """
    results_dir, steps = _commands(config, out, mode, fresh_clone)
    hog = None
    if mode == "busy":
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(2.0)  # let the scheduler see it before the pipeline starts
    load_before = os.getloadavg()[0]
    timed: dict[str, float] = {}
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    try:
        with open(out / f"{mode}.log", "w") as log:
            for label, cmd, cwd in steps:
                start = time.perf_counter()
                status = subprocess.run(
                    cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env
                ).returncode
                timed[label] = time.perf_counter() - start
                if status != 0:
                    raise SystemExit(f"{mode}: {label} exit {status}; see {out}/{mode}.log")
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    text = (out / f"{mode}.log").read_text()
    results = json.loads((results_dir / "results.json").read_text())
    accuracy = {
        arm: [round(s["accuracy"], 4) for s in a["per_seed"]] for arm, a in results["arms"].items()
    }
    stages = {name: float(s) for name, s in _DONE.findall(text)}
    if "setup" in timed:
        stages = {"setup": timed["setup"], **stages}
    return {
        "mode": mode,
        "wall_s": sum(timed.values()),
        "stages": stages,
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
    runs = [run_mode(args.config, out, m, args.fresh_clone) for m in modes]
    print_table(runs)
    print(f"\ncommand: {shlex.join([sys.executable, *sys.argv])}  (cpus: {os.cpu_count()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
