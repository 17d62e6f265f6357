"""srmri's base layer: what the four packages share and nothing that knows about them.

- :mod:`srmri.config`: typed configuration trees (dataclasses from YAML plus dotted overrides).
- :mod:`srmri.atomic`: files that are either absent or whole (write to a temp file, then rename).
- :mod:`srmri.torchfile`: the one ``torch.load`` (``weights_only=True``) and state-dict reader.
- :mod:`srmri.distributed`: process-group set-up from the launcher's environment.
- :mod:`srmri.exitcodes`: exit statuses that a launcher or scheduler acts on.
- :mod:`srmri.markdown`: Markdown tables whose cells are escaped (the report, study, model card).

Layers point one way: ``srmri`` <- ``shards`` <- ``trainer`` (engine) <- ``trainer.experiment``
<- ``tune``, ``launch``. Nothing here imports any of those packages.

Importing any srmri package sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the user set it) before
torch loads its OpenMP runtime: see :data:`OMP_WAIT_POLICY`.
"""

import os

__all__ = ["OMP_WAIT_POLICY"]

# OpenMP threads spin for a while after each parallel region by default (ACTIVE-ish). On a laptop
# that is also doing other work, the spinning threads steal the cores the next region needs: a
# 2-epoch debug fit beside one busy process took 146.6 s by default and 43.2 s with PASSIVE
# (same val_accuracy; BENCHMARKS.md "Quickstart wall time"). It must be set before the OpenMP
# runtime starts, i.e. before torch is imported, so every package's __init__ imports this one,
# and child processes (torchrun ranks, DataLoader workers, Ray trials) inherit it.
OMP_WAIT_POLICY = "PASSIVE"
os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
