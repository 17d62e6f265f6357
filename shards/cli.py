"""Command line of the data plane: ``python -m shards {ingest,synth,enhance,verify,inspect}``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from shards.sources.base import SourceError
from srmri.config import ConfigError, dump_config, load_config

__all__ = ["main"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder of the shard set")
    p.add_argument("--config", help="YAML file with ingest settings (see configs/)")
    p.add_argument("--size", type=int, help="output image side in pixels (default 256)")
    p.add_argument("--seed", type=int, help="seed of the split (and of synth)")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.add_argument("--ray-address", help="fan work out over a Ray cluster ('auto' or host:port)")
    p.add_argument("--overwrite", action="store_true", help="replace a different set in OUT")
    p.add_argument("--dedup", action="store_true", help="drop later copies of duplicates")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shards", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ing = sub.add_parser("ingest", help="scans of a supported layout -> shard set")
    ing.add_argument(
        "--source", required=True, choices=["kaggle", "folder", "figshare", "nifti", "dicom"]
    )
    ing.add_argument(
        "--classes",
        help="class names in label order (a,b,c) and/or folder mappings (no_tumor=notumor)",
    )
    ing.add_argument("--labels-csv", help="labels table for nifti/dicom (default INPUT/labels.csv)")
    _common(ing)
    ing.add_argument("args", nargs="*", metavar="INPUT | key=value", help="input and overrides")
    syn = sub.add_parser("synth", help="the built-in synthetic data set -> shard set")
    syn.add_argument("--n", type=int, help="number of slices")
    syn.add_argument("--lesion-size", type=float, help="lesion radius multiplier")
    syn.add_argument("--lesion-contrast", type=float, help="lesion contrast multiplier")
    _common(syn)
    syn.add_argument("args", nargs="*", metavar="key=value", help="config overrides")
    enh = sub.add_parser(
        "enhance",
        help="super-resolve with an SR model (runs python -m trainer.experiment enhance)",
        add_help=False,
    )
    enh.add_argument("args", nargs="*", help="the options of python -m trainer.experiment enhance")
    ver = sub.add_parser("verify", help="check shard checksums and counts")
    ver.add_argument("root")
    ins = sub.add_parser("inspect", help="counts per split/class/status and a contact sheet")
    ins.add_argument("root")
    ins.add_argument("--sheet", help="PNG path (default ROOT/contact_sheet.png)")
    ins.add_argument("--per-class", type=int, default=6)
    return parser


def _overrides(args: argparse.Namespace, synth: bool) -> tuple[list[str], list[str]]:
    positional = [a for a in args.args if "=" not in a]
    overrides = [f"out={args.out}"] + [a for a in args.args if "=" in a]
    flag_keys = {
        "size": "preprocess.size",
        "workers": "workers",
        "ray_address": "ray_address",
        "n": "synth.n",
        "lesion_size": "synth.lesion_size",
        "lesion_contrast": "synth.lesion_contrast",
        "labels_csv": "labels_csv",
    }
    for attr, key in flag_keys.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.insert(1, f"{key}={value}")
    if args.seed is not None:
        overrides[1:1] = [f"split.seed={args.seed}"] + (
            [f"synth.seed={args.seed}"] if synth else []
        )
    if args.overwrite:
        overrides.append("overwrite=true")
    if args.dedup:
        overrides.append("dedup.remove=true")
    if synth:
        overrides.insert(1, "source=synth")
    else:
        overrides.insert(1, f"source={args.source}")
        if len(positional) != 1:
            raise ConfigError(f"ingest needs exactly one INPUT folder, got {positional or 'none'}")
        overrides.insert(2, f"input={positional[0]}")
        if args.classes:
            names = [c for c in args.classes.split(",") if c and "=" not in c]
            maps = [c.split("=", 1) for c in args.classes.split(",") if "=" in c]
            if names:
                overrides.append(f"classes=[{','.join(names)}]")
            if maps:
                overrides.append("class_map={" + ",".join(f"{a}: {b}" for a, b in maps) + "}")
    return positional, overrides


def _run_ingest(args: argparse.Namespace, synth: bool) -> int:
    from shards.ingest import ingest
    from shards.ingest_config import IngestConfig
    from shards.inspect import count_table

    _, overrides = _overrides(args, synth)
    cfg = load_config(IngestConfig, args.config, overrides)
    print(dump_config(cfg), flush=True)
    result = ingest(cfg)
    print(count_table(result.out))
    n_shards, dataset = len(result.index.shards), result.index.dataset_id
    print(f"\nshard set: {result.out} ({n_shards} shards, dataset {dataset})")
    return 0


def _forward_enhance(args: list[str]) -> int:
    """``shards enhance`` runs the experiment layer's ``enhance`` command, by name.

    The SR model lives above the data plane, which therefore names the command instead of
    importing it; ``exec`` keeps this process's environment (torchrun's ranks included).
    """
    argv = [sys.executable, "-m", "trainer.experiment", "enhance", *args]
    sys.stdout.flush()
    os.execv(sys.executable, argv)
    return 2  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["enhance"]:  # its options belong to the command it forwards to
        return _forward_enhance(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command in ("ingest", "synth"):
            return _run_ingest(args, synth=args.command == "synth")
        if args.command == "verify":
            from shards.verify import verify

            problems = verify(args.root)
            for p in problems:
                print(f"FAIL {p}", file=sys.stderr)
            if problems:
                return 1
            print(f"OK {args.root}: every shard matches its sha256 and sample count")
            return 0
        if args.command == "inspect":
            from shards.inspect import contact_sheet, count_table

            print(count_table(args.root))
            path = contact_sheet(args.root, args.sheet, args.per_class)
            print(f"\ncontact sheet: {path}")
            return 0
    except (ConfigError, SourceError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 2
