"""Exit statuses that mean something to a launcher or a scheduler.

The training loop exits with :data:`REQUEUE` after a pre-emption checkpoint; the Slurm batch
script that ``python -m launch slurm`` renders requeues the job on that status. Both sides read
the number from here, so neither imports the other.
"""

from __future__ import annotations

__all__ = ["CONFIG_ERROR", "REQUEUE"]

REQUEUE = 3
"""A run stopped for pre-emption after writing its checkpoint: requeue it and it resumes."""

CONFIG_ERROR = 2
"""A command refused its configuration or input; the message on stderr names the problem."""
