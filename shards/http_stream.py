"""Streaming GETs of shards and indexes over http(s): timeouts, bounded retries, resumption.

A shard is read as one stream, never downloaded whole into memory. A connection that stalls
(no byte for ``read_timeout`` seconds), breaks or ends early is opened again at the byte
reached (an HTTP ``Range`` request; a server that ignores it sends the whole file again and
the bytes already read are skipped), after ``backoff`` seconds, doubled each time, at most
``retries`` times per stream. After that the read fails with an error naming the URL and what
to do. ``http.client`` rather than ``webdataset.gopen`` (curl in a subprocess), which had no
read timeout (a stalled server hung training for minutes) and reported a dead server as
``curl ... exit 7``.
"""

from __future__ import annotations

import http.client
import re
import time
import urllib.parse
from dataclasses import dataclass

__all__ = ["HttpSettings", "HttpStream", "read_url"]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class HttpSettings:
    """How http(s) shards are read.

    Attributes:
        connect_timeout: Seconds to wait for a connection.
        read_timeout: Seconds to wait for the next byte of a response before retrying.
        retries: Times one stream may be re-opened after a failure before the read fails.
        backoff: Seconds before the first retry; doubled before each further one.
    """

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0


class _Retryable(Exception):
    """A failure worth another attempt (stall, refused or broken connection, HTTP 5xx)."""


class HttpStream:
    """A binary, read-only, non-seekable stream of one URL's body; see the module docstring.

    Args:
        url: An http:// or https:// URL.
        settings: Timeouts and retries.

    Raises:
        OSError: When the server cannot be reached, answers with an error, or keeps failing
            after ``settings.retries`` retries (from the constructor or from :meth:`read`).
    """

    def __init__(self, url: str, settings: HttpSettings) -> None:
        self.url = url
        self.settings = settings
        self.pos = 0  # bytes handed out so far
        self.length: int | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._resp: http.client.HTTPResponse | None = None
        self._failures = 0
        try:
            self._open()
        except _Retryable as exc:
            self._recover(exc)

    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all the rest for ``n < 0``); fewer only at the end of the body."""
        parts: list[bytes] = []
        want = n if n >= 0 else (1 << 62)
        while want > 0 and (self.length is None or self.pos < self.length):
            got = self._read_retrying(min(want, _CHUNK))
            if not got:
                break
            parts.append(got)
            self.pos += len(got)
            want -= len(got)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._resp = None

    def _read_some(self, n: int) -> bytes:
        assert self._resp is not None
        try:
            got = self._resp.read(n)
        except (OSError, http.client.HTTPException) as exc:  # timeouts are OSErrors too
            raise _Retryable(_describe(exc, "data", self.settings.read_timeout)) from exc
        if not got and self.length is not None and self.pos < self.length:
            raise _Retryable(f"connection closed after {self.pos} of {self.length} bytes")
        return got

    def _open(self) -> None:
        """(Re-)open the GET at ``self.pos``."""
        self.close()
        s = self.settings
        parts = urllib.parse.urlsplit(self.url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.netloc, timeout=s.connect_timeout)
        self._conn = conn
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("GET", path, headers={"Range": f"bytes={self.pos}-"} if self.pos else {})
            if conn.sock is not None:
                conn.sock.settimeout(s.read_timeout)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise _Retryable(
                _describe(exc, "answer", max(s.connect_timeout, s.read_timeout))
            ) from exc
        if resp.status >= 500:
            raise _Retryable(f"HTTP {resp.status} {resp.reason}")
        if resp.status not in (200, 206):
            raise OSError(f"{self.url}: HTTP {resp.status} {resp.reason}")
        self._resp = resp
        start, total = _range_of(resp)
        self.length = total
        if start > self.pos:
            raise _Retryable(f"asked for bytes from {self.pos}, the server sent from {start}")
        self._skip(self.pos - start)  # a 200 to a Range request: skip what was already read

    def _skip(self, n: int) -> None:
        while n > 0:
            got = self._read_some(min(n, _CHUNK))
            if not got:
                raise _Retryable("the body ended before the byte to resume from")
            n -= len(got)

    def _read_retrying(self, n: int) -> bytes:
        """Up to ``n`` bytes; after a retryable failure, re-open at ``self.pos`` and read again."""
        while True:
            try:
                return self._read_some(n)
            except _Retryable as exc:
                self._recover(exc)

    def _recover(self, exc: _Retryable) -> None:
        """Re-open at ``self.pos`` after ``exc``, backing off; OSError once out of retries."""
        while True:
            if self._failures >= self.settings.retries:
                self.close()
                raise OSError(_give_up(self.url, self._failures, exc)) from exc
            time.sleep(self.settings.backoff * 2**self._failures)
            self._failures += 1
            try:
                self._open()
                return
            except _Retryable as again:
                exc = again


def _range_of(resp: http.client.HTTPResponse) -> tuple[int, int | None]:
    """``(first byte, total length)`` of a response body (total None when unknown)."""
    if resp.status == 206:
        spec = resp.getheader("Content-Range") or ""
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", spec.strip())
        if match is None:
            raise _Retryable(f"unreadable Content-Range {spec!r}")
        total = match.group(2)
        return int(match.group(1)), int(total) if total.isdigit() else None
    length = resp.getheader("Content-Length")
    return 0, int(length) if length is not None and length.isdigit() else None


def _describe(exc: BaseException, what: str, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no {what} within {timeout:g} s"
    return f"{type(exc).__name__}: {exc}"


def _give_up(url: str, failures: int, exc: BaseException) -> str:
    return (
        f"{url}: {exc}, after {failures} retries; the shard server stopped answering. Check "
        "that it is running and reachable from here (or copy the shard set to a local folder "
        "and point data.root at it), then resume the run from its last checkpoint; "
        "data.http_read_timeout and data.http_retries set how long a read may wait"
    )


def read_url(url: str, settings: HttpSettings) -> bytes:
    """The whole body of a small URL (an index), with the timeouts and retries of shards.

    Raises:
        OSError: As :class:`HttpStream`.
    """
    stream = HttpStream(url, settings)
    try:
        return stream.read()
    finally:
        stream.close()
