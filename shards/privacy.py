"""Pseudonymisation: patient identifiers become keyed hashes used only for grouping.

The key is a local secret file created once (mode 0600). Without the key, a hash cannot be
tied back to a patient by trying candidate identifiers, unlike a plain hash.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from srmri.atomic import write_bytes_once

__all__ = ["default_secret_path", "load_secret", "pseudonymize"]


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
