"""trainer: one training engine (DDP or DeepSpeed) for the classify and SR tasks.

Run it as ``python -m trainer {fit,evaluate,predict,export}``; the library entry points are
``trainer.loop.fit`` / ``trainer.loop.evaluate`` and ``trainer.export.export_checkpoint``.
Submodules are imported on use so that ``import trainer`` stays cheap.
"""

import srmri  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads; see srmri)

__all__: list[str] = []
