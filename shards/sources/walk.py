"""One walk of an input tree that every reader lists from, so every entry is accounted for.

The walk follows symbolic links whose target lies inside the tree (a symlinked sub-folder of
images is read like any other) and records, with the reason, each entry it does not go into:
hidden files and folders, links that point outside the tree, dangling or looping links, and
entries that are neither file nor folder. Readers then pick their inputs from ``files``;
whatever no reader takes gets a ``skipped`` row of its own (see :mod:`shards.inventory`).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Tree", "rel_path", "walk_tree"]


def rel_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with forward slashes (any encoding: surrogates kept)."""
    return Path(path).relative_to(root).as_posix()


@dataclass
class Tree:
    """What is under an input folder.

    Attributes:
        root: The input folder, as given.
        files: Every regular file reached (through in-tree links too), by path under ``root``.
        dirs: Every folder reached, ``root`` excluded.
        skipped: Relative path -> ``slug: why`` for each entry not gone into.
    """

    root: Path
    files: list[Path] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    _by_parent: tuple[dict, dict] | None = field(default=None, repr=False, compare=False)

    def rel(self, path: Path) -> str:
        """``path`` relative to the root (see :func:`rel_path`)."""
        return rel_path(path, self.root)

    def files_under(self, folder: Path, suffixes: Sequence[str] | None = None) -> list[Path]:
        """Files anywhere under ``folder`` (optionally only names ending in ``suffixes``)."""
        prefix = f"{self.rel(folder)}/" if Path(folder) != self.root else ""
        ends = tuple(s.lower() for s in suffixes) if suffixes is not None else None
        return [
            p
            for p in self.files
            if self.rel(p).startswith(prefix) and (ends is None or p.name.lower().endswith(ends))
        ]

    def files_in(self, folder: Path) -> list[Path]:
        """Files directly inside ``folder``, sorted by name."""
        return self._children()[0].get(Path(folder), [])

    def subdirs(self, folder: Path) -> list[Path]:
        """Folders directly inside ``folder``, sorted by name."""
        return self._children()[1].get(Path(folder), [])

    def _children(self) -> tuple[dict[Path, list[Path]], dict[Path, list[Path]]]:
        """Files and folders by parent (built once: a tree can hold 100k files)."""
        if self._by_parent is None:
            files: dict[Path, list[Path]] = {}
            dirs: dict[Path, list[Path]] = {}
            for table, paths in ((files, self.files), (dirs, self.dirs)):
                for path in sorted(paths, key=lambda p: p.name):
                    table.setdefault(path.parent, []).append(path)
            self._by_parent = (files, dirs)
        return self._by_parent

    def entries(self) -> int:
        """How many entries are accounted for: files reached plus entries skipped."""
        return len(self.files) + len(self.skipped)


def _inside(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _link_problem(path: Path, real_root: str, ancestors: Sequence[str]) -> str:
    """Why a symbolic link is not followed ("" if it is)."""
    try:
        target_is_dir = path.is_dir()
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "link_loop: the link leads back to itself"
        if exc.errno == errno.ENOENT:
            return "dangling_link: the link's target does not exist"
        return f"unreadable: cannot follow the link ({exc.strerror})"
    real = os.path.realpath(path)
    if not _inside(real, real_root):
        return "link_outside_tree: the link points outside the input folder"
    if target_is_dir and real in ancestors:
        return "link_loop: the link points to a folder that holds it"
    return ""


def walk_tree(root: Path, exclude: Sequence[Path] = ()) -> Tree:
    """Walk ``root`` (see the module docstring); entries are visited in name order.

    Args:
        root: The input folder.
        exclude: Folders not to go into (e.g. an output folder inside the input).

    Returns:
        The :class:`Tree`.
    """
    root = Path(root)
    tree = Tree(root)
    real_root = os.path.realpath(root)
    excluded = {os.path.realpath(p) for p in exclude}

    def visit(folder: Path, ancestors: tuple[str, ...]) -> None:
        try:
            with os.scandir(folder) as it:
                names = sorted(entry.name for entry in it)
        except OSError as exc:
            tree.skipped[tree.rel(folder)] = f"unreadable: cannot list the folder ({exc.strerror})"
            return
        for name in names:
            path = folder / name
            rel = tree.rel(path)
            if name.startswith("."):
                kind = "folder" if path.is_dir() and not path.is_symlink() else "file"
                tree.skipped[rel] = f"hidden: a hidden {kind} is not read"
                continue
            if path.is_symlink():
                problem = _link_problem(path, real_root, ancestors)
                if problem:
                    tree.skipped[rel] = problem
                    continue
            if path.is_dir():
                real = os.path.realpath(path)
                if real in excluded:
                    tree.skipped[rel] = "output_folder: the ingest's own output is not read"
                    continue
                tree.dirs.append(path)
                visit(path, (*ancestors, real))
            elif path.is_file():
                tree.files.append(path)
            else:
                tree.skipped[rel] = "not_a_file: a device, socket or pipe is not read"

    visit(root, (real_root,))
    return tree
