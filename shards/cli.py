"""The data plane's command line: ``python -m shards {ingest,synth,enhance,verify,inspect,locate}``.

What is private where: nothing this command prints while it runs names a path of the input
tree, except an error that stops the run and names the file to fix (a malformed labels table
line). ``locate`` is the one command that prints real input paths, read from the local
mapping file the ingest wrote beside the secret key (see :mod:`shards.locate`).
"""

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
    loc = sub.add_parser(
        "locate",
        help="the real input file of a key (default: of every row that is not ok); local only",
    )
    loc.add_argument("root", help="the shard set's folder (OUT)")
    loc.add_argument("keys", nargs="*", help="sample keys or input ids (default: rows not ok)")
    loc.add_argument("--secret-file", help="the secret key file the ingest used, if not default")
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
    from shards.ingest_config import IngestConfig, shareable_config
    from shards.inspect import count_table
    from shards.privacy import load_secret

    _, overrides = _overrides(args, synth)
    cfg = load_config(IngestConfig, args.config, overrides)
    # As the set records it: a job's console often ends up in a log file.
    shared = shareable_config(cfg, load_secret(cfg.secret_file or None))
    print(dump_config(shared), flush=True)
    result = ingest(cfg)
    print(count_table(result.out))
    n_shards, dataset = len(result.index.shards), result.index.dataset_id
    print(f"\nshard set: {result.out} ({n_shards} shards, dataset {dataset})")
    return 0


def _run_locate(args: argparse.Namespace) -> int:
    """Print ``status key path reason`` for the asked rows; 1 if a key is unknown."""
    from shards.locate import locate, printable

    found = locate(args.root, args.keys or None, args.secret_file)
    for hit in found:
        r = hit.row
        where = printable(hit.path) if hit.path else "(not in this machine's mapping)"
        print(f"{r.status}\t{r.key}\t{where}\t{r.reason}")
    known = {h.row.key for h in found} | {h.row.input_id for h in found}
    unknown = [k for k in args.keys if k not in known]
    for key in unknown:
        print(f"error: no row has key or input id {key!r}", file=sys.stderr)
    return 1 if unknown else 0


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
        if args.command == "locate":
            return _run_locate(args)
    except (ConfigError, SourceError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 2
