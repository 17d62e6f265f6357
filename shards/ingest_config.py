"""The ingest's typed configuration: everything that decides the content of a shard set.

Read by :mod:`shards.ingest` (which runs it) and :mod:`shards.assemble` (which writes the set),
and by the pipeline's ``data`` section; kept apart so those modules need not import each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from shards.dedup import DedupConfig
from shards.preprocess import PreprocessConfig
from shards.privacy import keyed_token
from shards.split import SplitConfig
from shards.synth import SynthConfig
from srmri.config import config_to_dict, require

__all__ = ["KAGGLE_CLASSES", "IngestConfig", "Source", "shareable_config"]

KAGGLE_CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
Source = Literal["kaggle", "folder", "figshare", "nifti", "dicom", "synth"]


@dataclass
class IngestConfig:
    """Everything that decides the content of a shard set (plus how to compute it).

    Attributes:
        source: Which reader interprets ``input``.
        input: Input folder (unused for ``synth``).
        out: Output folder of the shard set.
        classes: Class names, in label order.
        class_map: Folder name -> class name, for trees that name classes differently.
        labels_csv: Labels table for nifti/dicom (default ``INPUT/labels.csv``).
        max_slices_per_volume: Axial slices taken from each volume (nifti/dicom).
        shard_max_count: Samples per shard at most.
        shard_max_mb: Megabytes per shard at most.
        workers: Processes for reading and preprocessing (0: all cores).
        ray_address: Fan the work out as Ray tasks on this cluster ("auto" or host:port).
        overwrite: Replace an OUT that holds a different data set.
        secret_file: Key file for patient-id pseudonymisation (default: see shards.privacy).
    """

    source: Source = "synth"
    input: str = ""
    out: str = ""
    classes: list[str] = field(default_factory=lambda: list(KAGGLE_CLASSES))
    class_map: dict[str, str] = field(default_factory=dict)
    labels_csv: str = ""
    max_slices_per_volume: int = 16
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    shard_max_count: int = 1000
    shard_max_mb: float = 512.0
    workers: int = 0
    ray_address: str = ""
    overwrite: bool = False
    secret_file: str = ""

    def check(self) -> None:
        require(
            self.source == "synth" or bool(self.input),
            "input",
            f"source {self.source!r} needs an INPUT folder",
        )
        require(len(self.classes) >= 2, "classes", "need at least two classes")
        require(len(set(self.classes)) == len(self.classes), "classes", "names must be unique")
        for folder_name, cls in self.class_map.items():
            require(
                cls in self.classes,
                f"class_map.{folder_name}",
                f"maps to unknown class {cls!r}; known: {', '.join(self.classes)}",
            )
        require(self.shard_max_count >= 1, "shard_max_count", "must be at least 1")
        require(self.workers >= 0, "workers", "must be 0 (all cores) or more")
        require(self.max_slices_per_volume >= 1, "max_slices_per_volume", "must be at least 1")


def shareable_config(cfg: IngestConfig, secret: bytes) -> dict[str, Any]:
    """The config as a shard set records it (``config.yaml``, ``index.json``): no local path.

    ``input`` and ``labels_csv`` become keyed hashes of their absolute paths (``hmac:...``), so
    the config hash still tells one input folder from another but names neither; ``out`` and
    ``secret_file`` (this machine's paths, which change nothing in the set) are left empty.

    Args:
        cfg: The ingest config.
        secret: The pseudonymisation key.

    Returns:
        The config as plain nested dicts.
    """
    data = config_to_dict(cfg)
    for key in ("input", "labels_csv"):
        if data[key] and not str(data[key]).startswith("hmac:"):
            data[key] = keyed_token(os.path.abspath(data[key]), secret)
    data["out"] = ""
    data["secret_file"] = ""
    return data
