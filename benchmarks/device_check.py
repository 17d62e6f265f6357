"""Device check (issue 18): the paper's configuration on one GPU, in one command, one table.

What it runs, each part within a time budget (the whole under 8 minutes on one H200):

1. ``tests``: ``pytest -m cuda tests/test_cuda.py`` (degradation on CUDA against the CPU, a DDP
   step on an nccl group of one, bf16 and fp16-with-GradScaler steps, channels_last,
   ``torch.compile``, pinned-memory loading, DeepSpeed ZeRO-1/2 in bf16 when it imports, one
   real ``python -m trainer fit`` on CUDA). It runs in the background while the shard sets are
   made (that is CPU work), and is waited for before any timing starts.
2. ``resnet50``: the classifier of ``configs/paper.yaml`` (its classify stage:
   ``configs/classify.yaml`` plus the paper's overrides, built through ``trainer.factories`` and
   ``trainer.backend``): ResNet50, one channel, 224 px, bf16 autocast, channels_last. The
   largest batch that fits (doubling from ``batch_start`` until out of memory or the cap), then
   images/s on synthetic on-device data and end to end from the project's shards through
   ``shards.loader.create_loader`` (pinned memory, worker processes, the trainer's own train
   transform with augmentation), eager and under ``torch.compile``; the loader alone; peak GPU
   memory; end to end over synthetic against 97% and end to end against 3,000 images/s.
3. ``sr``: the paper's SR stage (``configs/sr-synth.yaml`` plus the paper's overrides: EDSR full
   preset, x2, 96 px patches, bf16): training patches/s through the trainer's backend, the model
   alone and ``shards.enhance.enhance`` in slices/s.
4. ``paper``: ``python -m trainer fit`` with the paper's classify stage (50 steps) and its SR
   stage (30 steps) on the built-in synthetic data at 224 px: the real configuration runs.

The shard sets are made by the project's ingest (``shards.ingest.ingest``, what ``python -m
shards synth`` and the pipeline's data stage run) from the paper's own ``data`` section: built-in
synthetic data at 224 px; only the count and the split fractions change, so that the train
split holds enough batches of the largest batch for one timed epoch.

``--tiny`` shrinks everything for a CPU (32 px, batch 2-4, two timed steps, no batch search, no
compile, 48 slices, the two fits run in this process through ``trainer.__main__.main`` with the
same command lines) so that ``tests/test_device_check.py`` runs it in about a minute; figures
that need CUDA then read ``n/a (no CUDA)``. The device is chosen automatically (``--device``).

Outputs (``--out DIR``; at most 8 files, which is what the device tool brings back):
``device_check.log`` (every step's detail), ``results.json`` (every figure, the environment and
the command; rewritten after each part), ``pytest_cuda.log``, ``fit_classify.log`` and
``fit_sr.log``; ``benchmarks/device_check.sh`` adds ``console.log``. The table is printed last.
``--report DIR`` prints the table of an existing ``DIR/results.json`` (the shell script does so
when the run itself was cut short).

The code: this file is the command line; the sizes, the parts and the report are modules of
``benchmarks/device_parts/`` (one job each; its ``__init__`` lists them).

Preparing the carried wheels (here, once; the device's image lacks webdataset, MONAI, nibabel,
nilearn, pydicom, imagehash and DeepSpeed, and reaches no registry)::

    bash benchmarks/device_check.sh --fetch-wheels

That downloads cp312 manylinux wheels for the device's Python 3.12 into ``.whl/`` (already
ignored by ``.gitignore``) with ``pip download --no-deps --only-binary=:all: --python-version
3.12 --implementation cp --platform manylinux_2_28_x86_64 [...] -d .whl NAME==VERSION``, and
builds DeepSpeed, which PyPI ships only as source, into a pure-Python wheel with ``DS_BUILD_OPS=0
pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl``. About 28 MB in all, inside
the 64 MiB a call may carry (the tracked tree adds about 2 MB). Ray is not carried: its cp312
wheel alone is about 79 MB, and nothing here uses it (the ingest runs on local processes).

The device call a session with a GPU makes (one call: a minute or two of start, then at most
about 8 minutes of run; ``timeout_s`` just above the script's own 500 s limit, which leaves
about 4 minutes of the 15 for one rerun while the machine is still warm)::

    run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=540)

To rerun only some parts in the time left: ``command="bash benchmarks/device_check.sh --parts
resnet50,sr"``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # the project is not installed on the device

# Only what needs no torch is imported here: ``--report`` and a test reading FULL stay quick.
from device_parts.report import Figure, Report, format_table, print_report  # noqa: E402
from device_parts.sizes import FULL, PARTS, TINY, Sizes  # noqa: E402

__all__ = ["FULL", "PARTS", "TINY", "Figure", "Report", "Sizes", "format_table", "main"]


def main(argv: list[str] | None = None) -> int:
    """Command line; see the module docstring.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 when the run finished (whatever it measured; the table says how it
        went), 1 when ``--report`` found no results.
    """
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="the CPU size (tests run it)")
    parser.add_argument("--out", type=Path, default=Path("runs/device-check"))
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument("--budget", type=float, default=0.0, help="seconds for the whole run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch shard sets")
    parser.add_argument("--report", type=Path, default=None, help="print DIR/results.json")
    args = parser.parse_args(argv)
    if args.report is not None:
        return print_report(args.report)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {PARTS}")
    from device_parts.run import run_check  # imports torch: after the quick paths

    run_check(args).close()
    return print_report(args.out)


if __name__ == "__main__":
    sys.exit(main())
