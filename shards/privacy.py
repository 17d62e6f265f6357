"""Pseudonymisation: identifiers and input paths become keyed hashes; reasons lose the names.

The key is a local secret file created once (mode 0600). Without the key, a hash cannot be
tied back to a patient or to a file name by trying candidates, unlike a plain hash.

Where the line is: nothing a shard set holds (shards, ``manifest.parquet``, ``index.json``,
``config.yaml``) and nothing ingest logs names a path component of the input tree. The one
bridge back to real paths is a local file beside the key (see :mod:`shards.locate`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

from srmri.atomic import write_bytes_once

__all__ = [
    "default_secret_path",
    "input_id",
    "keyed_token",
    "load_secret",
    "pseudonymize",
    "redact",
    "write_private",
]

# What a name removed from a message becomes.
REDACTED = "<path>"
# Redacted details that still hold a name fragment are replaced by this (privacy first).
WITHHELD = "(detail withheld: it would name the input)"


def default_secret_path() -> Path:
    """``$SRMRI_SECRET_FILE`` if set, else ``~/.config/srmri/secret.key``."""
    env = os.environ.get("SRMRI_SECRET_FILE")
    return Path(env) if env else Path.home() / ".config" / "srmri" / "secret.key"


def load_secret(path: str | Path | None = None) -> bytes:
    """Read the pseudonymisation key, creating it (32 random bytes, mode 0600) on first use.

    Args:
        path: Key file; default :func:`default_secret_path`.

    Returns:
        The key bytes.
    """
    p = Path(path) if path else default_secret_path()
    if p.is_file():
        key = p.read_bytes()
        if len(key) < 16:
            raise ValueError(f"{p}: secret key file is too short ({len(key)} bytes); delete it")
        return key
    # Never replaces a key another process created meanwhile: both then use the same key.
    write_bytes_once(p, secrets.token_bytes(32), mode=0o600)
    return p.read_bytes()


def pseudonymize(identifier: str, secret: bytes) -> str:
    """Keyed hash (HMAC-SHA256, 16 hex digits) of a patient identifier, prefixed ``p``."""
    digest = hmac.new(secret, identifier.strip().encode(), hashlib.sha256).hexdigest()
    return "p" + digest[:16]


def input_id(rel_path: str, secret: bytes) -> str:
    """The keyed id (16 hex digits) of an input tree entry, from its path relative to the root.

    A name of any encoding works: ``os.fsencode`` gives back the bytes on disk (a non-UTF-8
    name is held as surrogate escapes). The domain prefix keeps these ids apart from patient
    pseudonyms made with the same key.
    """
    message = b"srmri-input\0" + os.fsencode(rel_path)
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:16]


def keyed_token(text: str, secret: bytes) -> str:
    """``hmac:<16 hex>`` for a local path kept in a shared file (a config's ``input``)."""
    return "hmac:" + input_id(text, secret)


def _tokens(names: Iterable[str]) -> set[str]:
    """Word pieces (4+ characters) of the names, lower-cased: what must not survive redaction."""
    found: set[str] = set()
    for name in names:
        found.update(t for t in re.split(r"[^0-9a-z]+", name.lower()) if len(t) >= 4)
    return found


def redact(reason: str, paths: Iterable[str], names: Iterable[str]) -> str:
    """A quarantine reason with every path and name of the input taken out.

    Readers name the file in their messages (useful on a terminal, and to ``trainer predict``),
    and library errors may quote a path in any form; a manifest row needs neither, since its
    key already says which input it is. The slug (before ``": "``) is kept; in the detail each
    path and name becomes ``<path>``; a detail still holding a piece of a name is withheld.

    Args:
        reason: ``slug: detail`` as a reader raised it.
        paths: Full paths of the input (absolute, resolved, relative to the root).
        names: Single names: the path components of the input and of the files it holds.

    Returns:
        The reason, printable as UTF-8 (a non-UTF-8 byte shows as a backslash escape).
    """
    slug, sep, detail = reason.partition(": ")
    every = [p for p in {*paths, *names} if p]
    # Longest first, so a path goes whole before its components; repr() forms cover quoting.
    for text in sorted({*every, *(repr(p)[1:-1] for p in every)}, key=len, reverse=True):
        detail = re.sub(rf"(?<![^\W_]){re.escape(text)}(?![^\W_])", REDACTED, detail)
    lowered = detail.lower()
    pieces = _tokens(n for n in names if n)  # not of the paths: /home, /data name no one
    if any(re.search(rf"(?<![0-9a-z]){re.escape(t)}(?![0-9a-z])", lowered) for t in pieces):
        detail = WITHHELD
    text = f"{slug}{sep}{detail}" if sep else slug
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def write_private(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, readable by its owner only (mode 0600).

    The temp file is created with mode 0600 before any byte is written, so the content is
    never readable by others, not even for a moment; its folder is made with mode 0700.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)  # an existing temp file keeps its mode: set it
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
