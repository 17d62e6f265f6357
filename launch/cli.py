"""The ``srmri`` console script: one front door to the four packages.

``srmri shards ...``, ``srmri trainer ...``, ``srmri tune ...`` and ``srmri launch ...`` are
the same as ``python -m NAME ...``; ``srmri pipeline`` runs the whole experiment and
``srmri quickstart`` the README's main job.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "quickstart"]

# Command -> the module whose ``main(argv)`` is ``python -m NAME``: an explicit table.
COMMANDS = {
    "shards": "shards.cli",
    "trainer": "trainer.__main__",
    "tune": "tune.cli",
    "launch": "launch.commands",
    "pipeline": "trainer.experiment.pipeline",
    "enhance": "trainer.experiment.enhance",
}
USAGE = """usage: srmri {pipeline,enhance,shards,trainer,tune,launch,quickstart} ...

  pipeline    the paper's experiment end to end: data, SR, enhance, classifiers, report
  enhance     super-resolve a shard set with a trained SR model
  shards      preprocess scans into WebDataset shards (python -m shards)
  trainer     train, evaluate, predict, export (python -m trainer)
  tune        Ray Tune hyperparameter searches (python -m tune)
  launch      submit runs to torchrun, DeepSpeed, Slurm or Ray (python -m launch)
  quickstart  the README's main job: `pipeline --config configs/quickstart.yaml`
"""


def quickstart() -> int:
    """The README's main job: the whole pipeline on the built-in synthetic data."""
    config = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
    return main(["pipeline", "--config", str(config)])


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``srmri COMMAND ARGS`` to the package's own command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "quickstart":
        return quickstart()
    if command not in COMMANDS:
        print(f"srmri: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
