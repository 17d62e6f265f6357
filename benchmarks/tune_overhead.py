"""Benchmark of Ray Tune's overhead: N short trainer runs through a search against a plain loop.

Makes a small synthetic shard set (``python -m shards synth``), then runs the same ``--n`` tiny
trainer runs (they differ only in ``train.seed``) twice on this machine in this invocation:

1. plain: one after another in this process, ``trainer.loop.fit(cfg)``, after a warm import;
2. tune: as a Ray Tune grid over ``train.seed`` (FIFO, ``--concurrent`` trials at a time), with
   per-epoch reporting and checkpoints to Tune: ``ray.init()`` plus ``run_search`` to its return
   (trial processes, result files and plots included); Ray's start-up is also shown apart.

It prints both wall times, the overhead per trial in seconds and in percent, and the command.
Anchor: Ray's scalability note reports about +14% for 10,000 one-second trials on 16 CPUs.

    python benchmarks/tune_overhead.py                     # 8 trials, one at a time
    python benchmarks/tune_overhead.py --n 16 --concurrent 2
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=8, help="trials (default 8)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    p.add_argument("--steps", type=int, default=2, help="train steps per epoch (default 2)")
    p.add_argument("--model", default="test_resnet", help="timm model (default test_resnet)")
    p.add_argument("--concurrent", type=int, default=1, help="Tune trials at once (default 1)")
    p.add_argument("--no-reuse", action="store_true", help="a new process per Tune trial")
    p.add_argument("--samples", type=int, default=48, help="synthetic slices (default 48)")
    p.add_argument("--size", type=int, default=32, help="slice side in px (default 32)")
    p.add_argument("--workdir", type=Path, default=None, help="keep outputs here")
    return p


def _base(root: Path, work: Path, args: argparse.Namespace) -> Path:
    base = {
        "task": "classify",
        "out_dir": str(work / "best"),
        "name": "best",
        "data": {"root": str(root), "batch_size": 8, "num_workers": 0},
        "model": {"name": args.model},
        "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0},
        "train": {
            "epochs": args.epochs,
            "max_steps_per_epoch": args.steps,
            "device": "cpu",
            "log_every": 1,
        },
        "checkpoint": {"keep_last": 1, "keep_best": 0},
    }
    path = work / "base.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def main(argv: list[str] | None = None) -> int:
    """Run both arms and print the comparison."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tune-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    root = work / "synth"
    if not (root / "index.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "shards",
                "synth",
                "--n",
                str(args.samples),
                "--size",
                str(args.size),
                "--out",
                str(root),
                "--workers",
                "1",
            ],
            check=True,
            capture_output=True,
        )
    base_path = _base(root, work, args)

    from srmri.config import config_to_dict, load_config
    from srmri.distributed import cleanup
    from trainer.config import TrainConfig
    from trainer.loop import fit
    from tune.space import trial_config

    base = config_to_dict(load_config(TrainConfig, base_path))
    t0 = time.perf_counter()
    for seed in range(args.n):
        fit(trial_config(base, {"train.seed": seed}, str(work / "plain" / f"t{seed}")))
    cleanup()
    plain = time.perf_counter() - t0

    from tune.config import load_search_config
    from tune.search import connect, run_search

    search = {
        "base": {"config": str(base_path)},
        "space": {"train.seed": {"grid": list(range(args.n))}},
        "scheduler": {"name": "fifo"},
        "num_samples": 1,
        "max_concurrent": args.concurrent,
        "reuse_actors": not args.no_reuse,
        "max_failures": 0,
        "experiment": {"name": f"overhead-{int(time.time())}", "storage": str(work / "tune")},
    }
    search_path = work / "search.yaml"
    search_path.write_text(yaml.safe_dump(search))
    t0 = time.perf_counter()
    connect(None)  # what `tune run` does first; timed apart from the search
    started = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_search(load_search_config(search_path))
    searched = time.perf_counter() - t0
    tuned = started + searched

    per_trial_plain = plain / args.n
    overhead = (tuned - plain) / args.n
    print()
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"{args.n} trials x {args.epochs} epochs x {args.steps} steps, {args.model}, "
        f"{args.size} px, Tune concurrency {args.concurrent}, "
        f"reuse_actors={not args.no_reuse}, {os.cpu_count()} CPUs"
    )
    print(f"plain loop : {plain:8.1f} s  ({per_trial_plain:.2f} s per run)")
    print(f"ray tune   : {tuned:8.1f} s  ({tuned / args.n:.2f} s per trial)")
    print(f"  of which : {started:8.1f} s Ray start-up, {searched:.1f} s the search itself")
    print(f"overhead   : {overhead:+8.2f} s per trial  ({100 * (tuned / plain - 1):+.0f}%)")
    print(
        f"  w/o start: {(searched - plain) / args.n:+8.2f} s per trial  "
        f"({100 * (searched / plain - 1):+.0f}%)"
    )
    print("anchor     : Ray's scalability note: about +14% for 10,000 1-s trials on 16 CPUs")
    print(f"outputs    : {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
