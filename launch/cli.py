"""The ``srmri`` console script: one front door to the four packages.

``srmri shards ...``, ``srmri trainer ...``, ``srmri tune ...`` and ``srmri launch ...`` are
the same as ``python -m NAME ...``; ``srmri quickstart`` runs the README's main job.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "quickstart"]

PACKAGES = ("shards", "trainer", "tune", "launch")
USAGE = """usage: srmri {shards,trainer,tune,launch,quickstart} ...

  shards      preprocess scans into WebDataset shards (python -m shards)
  trainer     train, evaluate, predict, export (python -m trainer)
  tune        Ray Tune hyperparameter searches (python -m tune)
  launch      submit runs to torchrun, DeepSpeed, Slurm or Ray (python -m launch)
  quickstart  the README's main job on the built-in synthetic data
"""


def quickstart(out: str = "runs/quickstart") -> int:
    """Synthesize a small built-in data set, verify it and inspect it."""
    from shards.cli import main as shards_main

    data = f"{out}/data"
    steps = [
        ["synth", "--out", data, "--n", "240", "--size", "128", "--seed", "0"],
        ["verify", data],
        ["inspect", data],
    ]
    for step in steps:
        print(f"\n$ python -m shards {' '.join(step)}", flush=True)
        status = shards_main(step)
        if status:
            return status
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``srmri COMMAND ARGS`` to the package's own command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "quickstart":
        return quickstart()
    if command not in PACKAGES:
        print(f"srmri: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{command}.cli")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
