"""launch: submit trainer and tune runs to torchrun, DeepSpeed, Slurm or Ray.

``python -m launch TARGET [options] [--dry-run] -- ARGS`` (see :mod:`launch.commands`).
"""

__all__: list[str] = []
