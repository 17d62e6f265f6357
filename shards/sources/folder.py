"""Reader for any class-per-folder tree: ``root/<class>/**/*.{png,jpg,jpeg,tif,tiff}``.

Also home of the class-name resolution every labelled reader shares: folder (or table) names
are mapped through an optional ``class_map`` and must then be one of the known classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from shards.sources.base import Slice, SourceError, SourceItem
from shards.sources.images import IMAGE_SUFFIXES, read_image_file
from shards.sources.walk import Tree, walk_tree

__all__ = [
    "LAYOUT",
    "SUFFIXES",
    "class_index",
    "class_names",
    "list_items",
    "load_item",
    "resolve_class_map",
]

SOURCE = "folder"
SUFFIXES = IMAGE_SUFFIXES
LAYOUT = "<class>/ folders (nested folders allowed)"


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


def class_names(
    root: Path,
    classes: Sequence[str],
    class_map: Mapping[str, str] | None = None,
    tree: Tree | None = None,
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
    tree = tree or walk_tree(root)
    return sorted({mapping.get(d.name, d.name) for d in tree.subdirs(root)})


def list_items(
    root: Path,
    classes: Sequence[str],
    *,
    class_map: Mapping[str, str] | None = None,
    tree: Tree | None = None,
) -> list[SourceItem]:
    """List every image of a class-per-folder tree, sorted by relative path.

    Args:
        root: Folder whose sub-folders are classes (images may sit in nested folders).
        classes: Known class names in label order; empty: the sorted folder names.
        class_map: Folder name to class name, for folders named otherwise.
        tree: The walk of ``root`` (:func:`~shards.sources.walk.walk_tree`), if already made.

    Returns:
        One item per image file; ``label`` is the class index.

    Raises:
        SourceError: If ``root`` is missing or a folder is not a known class.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: input folder does not exist")
    tree = tree or walk_tree(root)
    names = class_names(root, classes, class_map, tree)
    mapping = resolve_class_map(names, class_map, root)
    items: list[SourceItem] = []
    for class_dir in tree.subdirs(root):
        label = class_index(class_dir.name, names, mapping, "class folder", str(class_dir))
        for path in tree.files_under(class_dir, SUFFIXES):
            items.append(SourceItem(SOURCE, str(path), tree.rel(path), label))
    return sorted(items, key=lambda item: item.rel_path)


def load_item(item: SourceItem) -> list[Slice]:
    """Read one image file as a single slice (raises QuarantineError if it cannot)."""
    return [Slice(read_image_file(Path(item.path)))]
