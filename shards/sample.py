"""The records the loader hands out: one :class:`Sample` per key, collated into a :class:`Batch`.

These are the data plane's contract with whatever trains on it: every key a transform receives
and every key a training step may read is listed here, with its type and meaning. A transform
(run inside the loader's workers) receives a :class:`Sample` and may replace ``image`` or add
keys of its own (the trainer's are in :mod:`trainer.batch`).

A uint16 tensor always holds stored intensities (intensity = value / 65535): whatever uint16
tensor a sample holds after the transform arrives in the batch as float32 in [0, 1]. So a
transform given uint16 images (``create_loader(image_dtype="uint16")``) that only selects
pixels (crop, flip) never converts them itself, and the loader converts once per batch.
"""

from __future__ import annotations

from typing import TypedDict

import torch

__all__ = ["Batch", "Sample"]


class Sample(TypedDict, total=False):
    """One sample, as a per-sample transform receives it.

    Keys:
        key: The sample's key in the shard set (a keyed hash, never a path).
        image: The stored (high-resolution) slice, float32 ``[1,H,W]`` in ``[0, 1]``; with
            ``image_dtype="uint16"`` the stored uint16 values instead.
        label: Class index into the shard set's ``classes`` (-1 where a set has no labels).
        valid: False for the padding an eval loader adds so that every rank runs the same
            number of steps; padded samples must not be counted.
        digest: XXH3-64 hex digest of the stored image payload (the ``.npy`` member): what the
            sample holds, not what it is called. Every per-sample random draw is seeded from
            it, never from the key: a real source's key is a keyed hash made with the local
            ingest secret, so draws seeded from keys would differ from one machine to the next.
        seed: A per-sample seed derived from (run seed, epoch, digest); every random draw of the
            sample (augmentation, degradation) comes from it, which makes resume exact.
        epoch: The epoch the sample is drawn for (a fixed eval epoch in eval mode).
        aligned: Images of the same key from the aligned shard sets (e.g. SR-enhanced), each
            ``[1,H,W]`` of the same dtype as ``image``, in the order the loader was given
            their roots.
    """

    key: str
    image: torch.Tensor
    label: int
    valid: bool
    digest: str
    seed: int
    epoch: int
    aligned: list[torch.Tensor]


class Batch(TypedDict, total=False):
    """A collated batch of :class:`Sample` (``B`` samples on this rank).

    Keys:
        key: The samples' keys, ``list[str]`` of length ``B``.
        image: ``[B,1,H,W]`` float32 (uint16 in the samples: converted, value / 65535).
        label: ``int64[B]``.
        valid: ``bool[B]``; False marks eval padding.
        digest: The samples' payload digests, ``list[str]`` of length ``B``.
        seed: ``int64[B]`` per-sample seeds.
        epoch: ``int64[B]``.
        aligned: Collated aligned images, one ``[B,1,H,W]`` tensor per aligned root (absent
            when a transform consumed them).
    """

    key: list[str]
    image: torch.Tensor
    label: torch.Tensor
    valid: torch.Tensor
    digest: list[str]
    seed: torch.Tensor
    epoch: torch.Tensor
    aligned: list[torch.Tensor]
