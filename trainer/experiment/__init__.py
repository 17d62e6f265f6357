"""The experiment layer: the paper's pipeline, its report and statistics, Grad-CAM, enhance.

It sits on the trainer engine (``trainer.loop``, tasks, checkpoints) and the data plane, and
nothing below it imports it. ``python -m trainer.experiment {pipeline,enhance}`` runs its
commands; ``srmri pipeline`` is the same as the first.
"""

__all__: list[str] = []
