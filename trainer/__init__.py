"""trainer: one training engine (DDP or DeepSpeed) for the classify and SR tasks.

Run it as ``python -m trainer {fit,evaluate,predict,export}``; the library entry points are
``trainer.loop.fit`` / ``trainer.loop.evaluate`` and ``trainer.export.export_checkpoint``.
Submodules are imported on use so that ``import trainer`` stays cheap.
"""

__all__: list[str] = []
