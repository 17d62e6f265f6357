"""Reader for any class-per-folder tree: ``root/<class>/**/*.{png,jpg,jpeg,tif,tiff}``.

Also home of the class-name resolution every labelled reader shares: folder (or table) names
are mapped through an optional ``class_map`` and must then be one of the known classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from shards.sources.base import Slice, SourceError, SourceItem
from shards.sources.images import is_image_file, read_image_file

__all__ = ["class_index", "class_names", "list_items", "load_item", "resolve_class_map"]

SOURCE = "folder"


def resolve_class_map(
    classes: Sequence[str], class_map: Mapping[str, str] | None, where: Path
) -> dict[str, str]:
    """Check a ``{name in the data: known class}`` map and return it as a plain dict.

    Raises:
        SourceError: If a target is not one of ``classes``.
    """
    mapping = dict(class_map or {})
    bad = {src: dst for src, dst in mapping.items() if dst not in classes}
    if bad:
        pairs = ", ".join(f"{src}={dst}" for src, dst in sorted(bad.items()))
        raise SourceError(
            f"{where}: class map targets {pairs} are not known classes "
            f"(known: {', '.join(classes)})"
        )
    return mapping


def class_index(
    name: str, classes: Sequence[str], mapping: Mapping[str, str], what: str, where: str
) -> int:
    """Index of ``name`` (after mapping) in ``classes``.

    Args:
        name: Class name as found in the data (folder name or table cell).
        classes: Known class names, in label order.
        mapping: Resolved class map (see :func:`resolve_class_map`).
        what: What the name is, for the error ("class folder", "label").
        where: Where it was found (a path, or a table row), for the error.

    Raises:
        SourceError: Naming the unknown class, where it was found and the known classes.
    """
    target = mapping.get(name, name)
    if target not in classes:
        raise SourceError(
            f"unknown {what} {name!r} at {where}; known classes: {', '.join(classes)} "
            f"(map it with --classes {name}=KNOWN_CLASS)"
        )
    return list(classes).index(target)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_names(
    root: Path, classes: Sequence[str], class_map: Mapping[str, str] | None = None
) -> list[str]:
    """The class names a folder tree is read with: ``classes`` if given, else found ones.

    With an empty ``classes``, the names are the sorted (mapped) folder names under ``root``.
    """
    if classes:
        return list(classes)
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: input folder does not exist")
    mapping = dict(class_map or {})
    return sorted({mapping.get(d.name, d.name) for d in _class_dirs(root)})


def images_under(folder: Path) -> Iterable[Path]:
    """Image files anywhere under ``folder`` (hidden files and folders skipped), unsorted."""
    for path in folder.rglob("*"):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if is_image_file(path):
            yield path


def list_items(
    root: Path,
    classes: Sequence[str],
    *,
    class_map: Mapping[str, str] | None = None,
) -> list[SourceItem]:
    """List every image of a class-per-folder tree, sorted by relative path.

    Args:
        root: Folder whose sub-folders are classes (images may sit in nested folders).
        classes: Known class names in label order; empty: the sorted folder names.
        class_map: Folder name to class name, for folders named otherwise.

    Returns:
        One item per image file; ``label`` is the class index.

    Raises:
        SourceError: If ``root`` is missing or a folder is not a known class.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: input folder does not exist")
    names = class_names(root, classes, class_map)
    mapping = resolve_class_map(names, class_map, root)
    items: list[SourceItem] = []
    for class_dir in _class_dirs(root):
        label = class_index(class_dir.name, names, mapping, "class folder", str(class_dir))
        for path in images_under(class_dir):
            rel = path.relative_to(root).as_posix()
            items.append(SourceItem(SOURCE, str(path), rel, label))
    return sorted(items, key=lambda item: item.rel_path)


def load_item(item: SourceItem) -> list[Slice]:
    """Read one image file as a single slice (raises QuarantineError if it cannot)."""
    return [Slice(read_image_file(Path(item.path)))]
