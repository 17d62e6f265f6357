"""What an ingest reads: the listed inputs, and a reason for every other entry of the tree.

Every file or link under the input folder is accounted for exactly once: it is an input (an
image, a ``.mat`` file, a volume), a file of an input (a DICOM series folder's instances), or
``skipped`` with why (unsupported extension, outside the reader's layout, the labels table,
hidden, a link outside the tree, a dangling or looping link). :func:`tally` counts the
entries in and the outcomes out, so the ingest can print that the two agree.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from shards.ingest_config import IngestConfig
from shards.sources import SourceItem, Tree, public_id, reader_for, walk_tree
from shards.synth import synth_items
from shards.writer import ManifestRow
from srmri.config import ConfigError

__all__ = ["Inventory", "ids_of", "take_inventory", "tally"]


@dataclass
class Inventory:
    """The inputs to read and the entries left, for one ingest.

    Attributes:
        items: The inputs, in listing order.
        skipped: Relative path -> ``slug: why``, for every entry that is no input's.
        members: Input (relative path) -> the relative paths of the files it is made of.
        entries: How many files and links are under the input folder (synth: its items).
    """

    items: list[SourceItem]
    skipped: dict[str, str] = field(default_factory=dict)
    members: dict[str, list[str]] = field(default_factory=dict)
    entries: int = 0

    def paths(self) -> list[str]:
        """Every relative path an output row can stand for: inputs, their files, skipped."""
        found = {it.rel_path for it in self.items} | set(self.skipped)
        for files in self.members.values():
            found.update(files)
        return sorted(found)


def _labels_table(cfg: IngestConfig) -> Path | None:
    if cfg.source not in ("nifti", "dicom"):
        return None
    return (Path(cfg.labels_csv) if cfg.labels_csv else Path(cfg.input) / "labels.csv").resolve()


def _skip_reason(path: Path, reader: ModuleType, source: str, table: Path | None) -> str:
    """Why a file of the tree that no input is made of is not read (names nothing of it)."""
    if table is not None and path.resolve() == table:
        return "labels_table: read as the labels table, not as an image"
    suffixes = reader.SUFFIXES
    if suffixes is not None and not path.name.lower().endswith(tuple(suffixes)):
        return f"unsupported_extension: the {source} reader reads only {', '.join(suffixes)} files"
    return f"outside_layout: the {source} reader reads inputs from {reader.LAYOUT}"


def _list(cfg: IngestConfig, tree: Tree) -> list[SourceItem]:
    root = Path(cfg.input)
    reader = reader_for(cfg.source)
    class_map = cfg.class_map or None
    if cfg.source in ("kaggle", "folder", "figshare"):
        return reader.list_items(root, cfg.classes, class_map=class_map, tree=tree)
    return reader.list_items(
        root,
        cfg.classes,
        labels_csv=Path(cfg.labels_csv) if cfg.labels_csv else None,
        class_map=class_map,
        max_slices_per_volume=cfg.max_slices_per_volume,
        tree=tree,
    )


def _members(item: SourceItem) -> list[str]:
    files = getattr(item, "files", None)
    if files is None:
        return [item.rel_path]
    return [f"{item.rel_path}/{name}" for name in files]


def take_inventory(cfg: IngestConfig) -> Inventory:
    """Walk the input folder once and list the inputs; account for every other entry.

    Raises:
        ConfigError: If the input is no folder (or is a saved config's keyed placeholder).
        SourceError: For a layout problem (see the readers).
    """
    if cfg.source == "synth":
        items = synth_items(cfg.synth)
        members = {it.rel_path: [it.rel_path] for it in items}
        return Inventory(items, members=members, entries=len(items))
    if cfg.input.startswith("hmac:"):
        raise ConfigError(
            "input: a shard set's config.yaml keeps only a keyed hash of the input folder "
            "(no path leaves this machine); pass the folder again (input=FOLDER)"
        )
    root = Path(cfg.input)
    if not root.is_dir():
        raise ConfigError(f"input: {root} is not a folder")
    tree = walk_tree(root, exclude=[Path(cfg.out)] if cfg.out else [])
    items = _list(cfg, tree)
    members = {it.rel_path: _members(it) for it in items}
    covered = {rel for files in members.values() for rel in files}
    reader, table = reader_for(cfg.source), _labels_table(cfg)
    skipped = dict(tree.skipped)
    for path in tree.files:
        rel = tree.rel(path)
        if rel not in covered:
            skipped[rel] = _skip_reason(path, reader, cfg.source, table)
    return Inventory(items, dict(sorted(skipped.items())), members, tree.entries())


def ids_of(inv: Inventory, source: str, make_id: Callable[[str], str]) -> dict[str, str]:
    """Relative path -> id for every path of the inventory (``make_id(rel)``; synth: public)."""
    fn = public_id if source == "synth" else make_id
    return {rel: fn(rel) for rel in inv.paths()}


def tally(inv: Inventory, ids: Mapping[str, str], rows: Iterable[ManifestRow]) -> dict[str, int]:
    """Outcome per entry of the tree: ``in`` (entries found) and a count per status.

    An input's files share its outcome (``ok`` if any of its slices is stored, else
    ``duplicate_removed`` if one was, else ``quarantined``) unless the reader passed a file
    over, which then has a row and an outcome of its own; skipped entries count as
    ``skipped``.

    Args:
        inv: The inventory.
        ids: Relative path -> input id (:func:`ids_of`).
        rows: The set's manifest rows.

    Returns:
        ``{"in": n, "ok": ..., "quarantined": ..., "skipped": ..., ...}``.
    """
    statuses: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        statuses[row.input_id].add(row.status)
    counts: Counter = Counter({"in": inv.entries, "skipped": len(inv.skipped)})
    for item in inv.items:
        own = statuses.get(ids[item.rel_path], set())
        main = next((s for s in ("ok", "duplicate_removed") if s in own), "quarantined")
        for rel in inv.members[item.rel_path]:
            passed = statuses.get(ids[rel]) if rel != item.rel_path else None
            counts[min(passed) if passed else main] += 1
    return dict(counts)
