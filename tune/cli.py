"""Command line: ``python -m tune {run,resume,report} ...`` (also ``srmri tune ...``).

- ``run --config FILE [--address auto|HOST:PORT] [dotted.key=value ...]``: validate the search
  space against the trainer config, then run the search; keys of the search file
  (``num_samples=8``) and trainer keys (``data.root=PATH``) may both be overridden.
- ``resume EXPERIMENT_DIR``: continue an interrupted search (finished trials kept, unfinished
  ones resumed from their checkpoints, errored ones retried), exactly as it was started: the
  folder's ``search.yaml`` and ``base.yaml`` define it, and an edit made to them since the start
  is refused, naming the keys (start a new search to change the space or the base).
- ``report EXPERIMENT_DIR``: results table, ``results.parquet``, ``best.yaml`` and PNGs of any
  search, finished or not (Ray need not be running).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from srmri.config import ConfigError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a hyperparameter search")
    run.add_argument("--config", required=True, type=Path, help="search YAML")
    run.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (auto or HOST:PORT); default: a local Ray",
    )
    run.add_argument("--dashboard", action="store_true", help="start the dashboard (local Ray)")
    run.add_argument(
        "--check",
        action="store_true",
        help="validate the search space and exit without running trials",
    )
    run.add_argument("overrides", nargs="*", help="dotted.key=value (search or trainer keys)")
    res = sub.add_parser("resume", help="continue an interrupted search")
    res.add_argument("experiment_dir", type=Path)
    res.add_argument("--address", default=None, help="Ray cluster to join")
    rep = sub.add_parser("report", help="results table, parquet, best.yaml and plots")
    rep.add_argument("experiment_dir", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; returns the exit status (2 on a configuration or input error)."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "run":
            from tune.config import load_search_config
            from tune.experiment import prepare
            from tune.search import run_search

            search = load_search_config(args.config, args.overrides)
            if args.check:
                prep = prepare(search)
                print(
                    f"search space OK: {', '.join(prep.space)}; metric {prep.metric} "
                    f"({prep.mode}); experiment {prep.experiment_dir}"
                )
                return 0
            out = run_search(search, args.address, args.dashboard)
        elif args.command == "resume":
            from tune.search import resume_search

            out = resume_search(args.experiment_dir, args.address)
        else:
            from tune.results import write_outputs

            write_outputs(args.experiment_dir)
            return 0
    except (ConfigError, FileNotFoundError) as exc:
        if isinstance(exc, FileNotFoundError) and exc.filename is None:
            # No file named: not a user's missing input but a fault to diagnose; show where.
            import traceback

            traceback.print_exc()
        where = str(getattr(args, "config", "") or "")
        text = str(exc) if not where or str(exc).startswith(where) else f"{where}: {exc}"
        print(f"error: {text}", file=sys.stderr)
        return 2
    return _finished(out)


def _finished(experiment_dir: Path) -> int:
    """Exit status of a search: 1 if a trial ended in error (after its retries), else 0."""
    from tune.experiment import load_experiment
    from tune.results import collect

    frame = collect(load_experiment(experiment_dir))
    failed = sorted(set(frame.loc[frame["status"] == "ERROR", "trial_id"])) if len(frame) else []
    print(f"experiment: {experiment_dir}")
    if failed:
        print(f"error: trials {', '.join(failed)} failed after their retries", file=sys.stderr)
        return 1
    return 0
