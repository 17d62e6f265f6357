"""Files that are either absent or whole: write beside the target, then rename over it.

A reader (a resumed run, a second rank, a user's ``cat``) never sees half a file: the bytes go to
a hidden temp file in the same folder (so the rename stays on one file system, where it is
atomic) that is renamed onto the target only after it is complete, and removed if writing fails.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_bytes", "write_bytes_once", "write_json", "write_text"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces ``path``, on error it is removed.

    Args:
        path: The file to create or replace; its parent folder is created.

    Yields:
        A hidden sibling path, unique to this process, for the caller to write.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_bytes_once(path: str | Path, data: bytes, *, mode: int = 0o644) -> bool:
    """Create ``path`` holding ``data`` unless it already exists; an existing file is kept.

    The temp file is created with ``mode`` (before any byte is written, so a private key is
    never readable by others) and hard-linked onto the target: the link is atomic and fails if
    the target exists, so of two processes racing to create the file exactly one wins and both
    then read the same, whole content.

    Args:
        path: The file to create; its parent folder is created.
        data: Its content.
        mode: Permission bits of the new file (the umask still applies).

    Returns:
        True if this call created the file, False if it existed already.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.link(tmp, target)
    except FileExistsError:  # another process created it meanwhile: keep theirs
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any, indent: int | None = 1) -> Path:
    """Write ``data`` as JSON to ``path`` atomically; returns the path."""
    return write_text(path, json.dumps(data, indent=indent))
