"""Command line: ``python -m trainer {fit,evaluate,predict,export} ...``.

Works as one process, under ``torchrun --nproc_per_node N -m trainer ...`` and under the
``deepspeed`` launcher (``deepspeed --module trainer ...``), whose ``--local_rank=N`` argument is
accepted anywhere and ignored: the rank comes from the environment the launcher sets.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from srmri.config import ConfigError
from srmri.exitcodes import CONFIG_ERROR

__all__ = ["main"]


def _strip_local_rank(argv: Sequence[str]) -> list[str]:
    """Drop ``--local_rank N`` / ``--local-rank=N`` (legacy launchers pass it; env has it)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        out.append(arg)
    return out


_SR_HELP = "the SR run that enhanced an sr, lr+sr or lr|sr model's training set (default: beside)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train one run from a YAML config plus overrides")
    fit.add_argument("--config", type=Path, help="YAML config (a saved config.yaml works)")
    fit.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. optim.lr=3e-4")
    ev = sub.add_parser("evaluate", help="evaluate a checkpoint on one split")
    ev.add_argument("--checkpoint", required=True, type=Path)
    ev.add_argument("--split", default="test")
    ev.add_argument("--out", type=Path, default=None, help="output folder")
    ev.add_argument("overrides", nargs="*", help="dotted.key=value changes, e.g. data.root=...")
    pr = sub.add_parser("predict", help="classify image files, folders, NIfTI or DICOM")
    source = pr.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a run, its checkpoints or one")
    source.add_argument("--model", type=Path, help="a model folder from `trainer export`")
    pr.add_argument("--out", required=True, type=Path, help="output CSV")
    pr.add_argument("--sr-checkpoint", type=Path, default=None, help=_SR_HELP)
    pr.add_argument("--gradcam", type=Path, default=None, help="folder for Grad-CAM overlays")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--max-slices", type=int, default=None)
    pr.add_argument("--device", default="cpu")
    pr.add_argument("paths", nargs="+", type=Path)
    ex = sub.add_parser("export", help="write a model folder: weights, model.json, model card")
    ex.add_argument("--checkpoint", required=True, type=Path)
    ex.add_argument("--out", required=True, type=Path, help="the model folder to write")
    ex.add_argument(
        "--format",
        nargs="+",
        action="extend",
        choices=["safetensors", "onnx", "torchscript"],
        default=[],
        help="formats beside the fp32 safetensors (always written); repeatable",
    )
    ex.add_argument("--sr-checkpoint", type=Path, default=None, help=_SR_HELP)
    ex.add_argument("--no-ema", action="store_true", help="export raw weights, not the EMA")
    return parser


def _predict(args: argparse.Namespace) -> None:
    from trainer.inference import classifier_from_checkpoint, classifier_from_folder
    from trainer.predict import predict_paths, write_predictions_csv

    if args.model is not None:
        if args.sr_checkpoint is not None:
            raise ValueError("--sr-checkpoint: a model folder bundles its SR model; drop it")
        clf = classifier_from_folder(args.model)
    else:
        clf = classifier_from_checkpoint(args.checkpoint, args.sr_checkpoint)
    clf.to(args.device)
    on_batch = None
    if args.gradcam is not None:
        from trainer.gradcam_overlay import GradcamWriter

        on_batch = GradcamWriter(clf.model, clf.classes, args.gradcam)
    rows = predict_paths(
        clf.model,
        args.paths,
        clf.classes,
        clf.preprocess,
        args.device,
        batch_size=args.batch_size,
        input_transform=clf.model_input,
        max_slices=args.max_slices,
        on_batch=on_batch,
    )
    write_predictions_csv(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; returns the exit status.

    2 on a configuration or input error, or a run directory another run holds; 1 when training
    diverged (a nan or infinite loss under ``train.nonfinite_loss: stop``).
    """
    args = _parser().parse_args(_strip_local_rank(sys.argv[1:] if argv is None else argv))
    from srmri.distributed import cleanup
    from trainer.loop import NonFiniteLoss
    from trainer.rundir import RunDirInUse

    try:
        if args.command == "fit":
            from trainer.config import load_train_config
            from trainer.loop import fit

            fit(load_train_config(args.config, args.overrides))
        elif args.command == "evaluate":
            from trainer.loop import evaluate

            evaluate(args.checkpoint, args.split, args.out, tuple(args.overrides))
        elif args.command == "export":
            from trainer.export import export_checkpoint

            out = export_checkpoint(
                args.checkpoint,
                args.out,
                use_ema=not args.no_ema,
                formats=args.format,
                sr_checkpoint=args.sr_checkpoint,
            )
            print(f"wrote model folder {out}")
        else:
            _predict(args)
    except (ConfigError, FileNotFoundError, ValueError, RunDirInUse) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
