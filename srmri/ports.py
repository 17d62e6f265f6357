"""Free TCP ports for a rendezvous on this machine; torch-free, so any process may import it."""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for a rendezvous on this machine).

    Args:
        host: The address to bind.

    Returns:
        The port number.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
