"""launch: submit trainer and tune runs to torchrun, DeepSpeed, Slurm or Ray.

``python -m launch TARGET [options] [--dry-run] -- ARGS`` (see :mod:`launch.commands`).
"""

import srmri  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads; see srmri)

__all__: list[str] = []
