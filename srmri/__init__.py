"""srmri's base layer: what the four packages share and nothing that knows about them.

- :mod:`srmri.config`: typed configuration trees (dataclasses from YAML plus dotted overrides).
- :mod:`srmri.atomic`: files that are either absent or whole (write to a temp file, then rename).
- :mod:`srmri.torchfile`: the one ``torch.load`` (``weights_only=True``) and state-dict reader.
- :mod:`srmri.distributed`: process-group set-up from the launcher's environment.
- :mod:`srmri.exitcodes`: exit statuses that a launcher or scheduler acts on.

Layers point one way: ``srmri`` <- ``shards`` <- ``trainer`` (engine) <- ``trainer.experiment``
<- ``tune``, ``launch``. Nothing here imports any of those packages.
"""

__all__: list[str] = []
