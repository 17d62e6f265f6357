"""How big the device check runs: the device's full size, ``--tiny`` for a CPU, and the budget.

Nothing here imports torch, so that the entry script's ``--report`` and a test reading
:data:`FULL` stay quick.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["FULL", "PARTS", "SHARE", "TINY", "Sizes"]

PARTS = ("tests", "resnet50", "sr", "paper")


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: the device's full size, or ``--tiny`` for a CPU.

    Attributes:
        size: Image side of the shard sets and the classifier, in pixels.
        samples: Slices in the main shard set.
        slices_per_subject: Slices per synthetic subject (0: the paper's).
        enhance_samples: Slices in the set ``enhance`` is timed on (0: the main set).
        val_fraction: Split fraction of val (and of test) in the shard sets.
        batch_start: First batch of the search (the batch, with ``search`` off).
        batch_cap: Largest batch the search tries.
        search: Search for the largest batch that fits (on CUDA only); also marks the size
            the targets are judged at.
        steps: Timed steps at most per synthetic measurement.
        sr_steps: Timed steps at most of the SR training rate.
        e2e_steps: Timed steps at most from the shards (the epoch's end stops them too).
        warmup: Untimed steps first (synthetic).
        e2e_warmup: Untimed steps first from the shards (the workers' start).
        seconds: Time budget of each timed measurement.
        workers: Loader worker processes.
        compile: Also time under ``torch.compile`` (on CUDA only).
        sr_batch: Batch of the SR training rate (0: the paper's ``data.batch_size``).
        sr_slices: LR slices the SR model alone is timed on.
        fit_steps: Steps of the paper's classify fit.
        sr_fit_steps: Steps of the paper's SR fit.
        fit_batch: Batch of both fits (0: the paper's own).
        fits_in_process: Run the two fits in this process through ``trainer.__main__.main``
            with the same command lines (else as ``python -m trainer fit`` children, each
            under its time budget); one after the other either way.
        precision: Training precision everywhere ("": the paper's, bf16).
        tests_timeout: Seconds the CUDA tests may take.
        budget: Seconds for the whole run; each part gets a share of what is left.
    """

    size: int
    samples: int
    slices_per_subject: int
    enhance_samples: int
    val_fraction: float
    batch_start: int
    batch_cap: int
    search: bool
    steps: int
    sr_steps: int
    e2e_steps: int
    warmup: int
    e2e_warmup: int
    seconds: float
    workers: int
    compile: bool
    sr_batch: int
    sr_slices: int
    fit_steps: int
    sr_fit_steps: int
    fit_batch: int
    fits_in_process: bool
    precision: str
    tests_timeout: float
    budget: float


FULL = Sizes(
    size=224,
    samples=12288,  # train split 9,830 at 10/10/80: 19 batches of 512, so 16 timed in one epoch
    slices_per_subject=0,
    enhance_samples=512,
    val_fraction=0.1,
    batch_start=64,
    batch_cap=512,  # ResNet50's images/s flattens out well before; the search logs each batch
    search=True,
    steps=60,
    sr_steps=400,
    e2e_steps=10**6,
    warmup=8,
    e2e_warmup=3,
    seconds=8.0,
    workers=max(1, min(14, (os.cpu_count() or 2) - 2)),
    compile=True,
    sr_batch=0,
    sr_slices=512,
    fit_steps=50,
    sr_fit_steps=30,
    fit_batch=0,
    fits_in_process=False,
    precision="",
    tests_timeout=240.0,
    budget=450.0,
)
TINY = Sizes(
    size=32,
    samples=48,
    slices_per_subject=1,  # small val/test splits (each class needs a subject in each)
    enhance_samples=0,
    val_fraction=0.1,
    batch_start=4,
    batch_cap=4,
    search=False,
    steps=2,
    sr_steps=2,
    e2e_steps=2,
    warmup=1,
    e2e_warmup=1,
    seconds=20.0,
    workers=1,
    compile=False,
    sr_batch=2,
    sr_slices=8,
    fit_steps=2,
    sr_fit_steps=2,
    fit_batch=2,
    # A child would spend most of its time importing torch and timm again (10-20 s each on a
    # loaded CPU); this process has them already.
    fits_in_process=True,
    # bf16 convolutions on a CPU without bf16 units are emulated, about 5x slower than fp32:
    # the tiny run checks that the script works, the device run measures bf16.
    precision="fp32",
    tests_timeout=120.0,
    budget=170.0,
)
# Each part's share of the time left when it starts (the rest is kept for the later parts).
SHARE = {"resnet50": 0.5, "sr": 0.3, "paper": 0.9}
