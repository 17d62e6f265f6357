"""Reader for the Kaggle "Brain Tumor MRI Dataset" layout.

``root/Training/<class>/*.jpg`` and ``root/Testing/<class>/*.jpg`` (PNG too), classes glioma,
meningioma, notumor and pituitary by default. ``Testing/`` fixes the test split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from shards.sources.base import Slice, SourceError, SourceItem
from shards.sources.folder import class_index, resolve_class_map
from shards.sources.images import IMAGE_SUFFIXES, read_image_file
from shards.sources.walk import Tree, walk_tree

__all__ = ["DEFAULT_CLASSES", "LAYOUT", "SPLIT_FOLDERS", "SUFFIXES", "list_items", "load_item"]

SOURCE = "kaggle"
SUFFIXES = IMAGE_SUFFIXES
LAYOUT = "Training/<class>/ or Testing/<class>/"
DEFAULT_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
# Folder name -> split hint; Training is split into train/val later, by the caller.
SPLIT_FOLDERS: dict[str, str | None] = {"Training": None, "Testing": "test"}


def list_items(
    root: Path,
    classes: Sequence[str],
    *,
    class_map: Mapping[str, str] | None = None,
    tree: Tree | None = None,
) -> list[SourceItem]:
    """List the images of a Kaggle tree, sorted by relative path.

    Args:
        root: Folder holding ``Training/`` (required) and ``Testing/`` (optional).
        classes: Known class names in label order; empty means :data:`DEFAULT_CLASSES`.
        class_map: Folder name to class name (e.g. ``{"no_tumor": "notumor"}``).
        tree: The walk of ``root`` (:func:`~shards.sources.walk.walk_tree`), if already made.

    Returns:
        One item per image; ``split_hint`` is ``"test"`` under ``Testing/``.

    Raises:
        SourceError: If ``Training/`` is missing, or a class folder is not a known class.
    """
    root = Path(root)
    names = list(classes) or list(DEFAULT_CLASSES)
    mapping = resolve_class_map(names, class_map, root)
    if not (root / "Training").is_dir():
        raise SourceError(
            f"{root / 'Training'}: missing; a Kaggle tree has Training/<class>/ "
            "and Testing/<class>/ folders"
        )
    tree = tree or walk_tree(root)
    items: list[SourceItem] = []
    for split_dir, hint in SPLIT_FOLDERS.items():
        base = root / split_dir
        if base not in tree.dirs:
            continue
        for class_dir in tree.subdirs(base):
            where = f"{split_dir}/{class_dir.name} in {root}"
            label = class_index(class_dir.name, names, mapping, "class folder", where)
            for path in tree.files_under(class_dir, SUFFIXES):
                items.append(SourceItem(SOURCE, str(path), tree.rel(path), label, split_hint=hint))
    return sorted(items, key=lambda item: item.rel_path)


def load_item(item: SourceItem) -> list[Slice]:
    """Read one JPEG/PNG as a single slice (raises QuarantineError if it cannot)."""
    return [Slice(read_image_file(Path(item.path)))]
