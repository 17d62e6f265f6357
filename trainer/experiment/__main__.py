"""``python -m trainer.experiment {pipeline,enhance,study,archive} ...``: its commands."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: python -m trainer.experiment {pipeline,enhance,study,archive} ...

  pipeline  the paper's experiment end to end (same as `srmri pipeline`)
  enhance   super-resolve a shard set with a trained SR checkpoint
  study     the pre-registered analysis of several pipeline folders (one per split)
  archive   copy a finished pipeline folder's records (no data, no weights) to keep
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the command's own ``main``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("pipeline", "enhance", "study", "archive"):
        print(USAGE, file=sys.stderr if args else sys.stdout)
        return 2
    if args[0] == "pipeline":
        from trainer.experiment.pipeline import main as command
    elif args[0] == "enhance":
        from trainer.experiment.enhance import main as command
    elif args[0] == "study":
        from trainer.experiment.study import main as command
    else:
        from trainer.experiment.archive import main as command
    return command(args[1:])


if __name__ == "__main__":
    sys.exit(main())
