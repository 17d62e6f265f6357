"""A minimal reader of the tar members of a shard: names and payloads, nothing else.

``tarfile`` spends ~1 ms per sample parsing the pax headers ``webdataset.TarWriter`` puts
before every member it writes with a float mtime, more than the loader's whole per-sample
budget, while the member names and sizes are all a shard reader needs; this reader (ustar,
pax and GNU long names) measured 64 us per sample against 304 us for webdataset's
``tar_file_iterator`` (BENCHMARKS.md, issue 2).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["tar_members"]

_ZERO_BLOCK = bytes(512)
_SPACES = 8 * ord(" ")
_ADLER_MOD = 65521


def tar_members(stream: Any, url: str, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` of the regular files of a tar stream that ``want`` selects.

    Members not wanted are skipped (seeked over on local files) without being read into
    memory.

    Args:
        stream: A binary file object (``read``; ``seek`` used when ``seekable()``; a
            ``take(n)`` method, if it has one, returns the next payload without copying it:
            see :class:`shards.shard_reader.MappedShard`).
        url: Where the stream comes from, for error messages.
        want: Called with each regular member's name; False skips its data.

    Yields:
        ``(name, payload)`` of each wanted member, in tar order: ``bytes``, or what ``take``
        returns.

    Raises:
        ValueError: On a damaged or truncated tar.
    """
    seekable = getattr(stream, "seekable", lambda: False)()
    take = getattr(stream, "take", None) or stream.read
    read, pax = stream.read, {}
    while len(header := read(512)) == 512 and header != _ZERO_BLOCK:
        _check_header(header, url)
        kind = header[156:157]
        if kind in (b"x", b"L"):  # pax extended header / GNU long name: about the next member
            size = _size(header, url)
            data = read((size + 511) & ~511)[:size]
            pax = _pax_records(data) if kind == b"x" else {b"path": data.rstrip(b"\0")}
            continue
        if pax:
            size = int(pax[b"size"]) if b"size" in pax else _size(header, url)
            name = pax.get(b"path") or header[:100].rstrip(b"\0")
            pax = {}
        else:  # the common case: a ustar header alone
            size = _size(header, url)
            name = header[:100].rstrip(b"\0")
            if header[345] and header[257:262] == b"ustar":
                name = header[345:500].rstrip(b"\0") + b"/" + name
        fname = name.decode()
        padded = (size + 511) & ~511
        if (kind == b"0" or kind == b"\0" or kind == b"7") and want(fname):
            data = take(size)
            if len(data) < size:
                raise ValueError(f"{url}: truncated in {fname}; the shard is damaged")
            padded -= size
            if padded and seekable:
                stream.seek(padded, 1)
            elif padded:
                read(padded)
            yield fname, data
        elif seekable:
            stream.seek(padded, 1)
        else:
            while padded > 0 and (got := len(read(min(padded, 1 << 20)))):
                padded -= got
    if header != _ZERO_BLOCK:  # tar writers end an archive with zero blocks
        raise ValueError(f"{url}: truncated (no end-of-archive block); the shard is damaged")


def _check_header(header: bytes, url: str) -> None:
    """Check a header block's checksum (the byte sum with its own field read as spaces).

    ``sum(header)`` costs ~8 us a block in CPython, four blocks a sample; adler32's low half is
    ``1 + sum mod 65521`` and costs ~0.3 us. A block's sum is below 2 * 65521, so comparing
    modulo 65521 only misses a damage that moves the sum by exactly 65521.
    """
    field = header[148:156]
    try:
        recorded = int(field.strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise ValueError(f"{url}: bad tar header field {field!r}; not a tar shard") from None
    if ((zlib.adler32(header) & 0xFFFF) - 1 - sum(field) + _SPACES - recorded) % _ADLER_MOD:
        raise ValueError(f"{url}: bad tar header checksum; the shard is damaged")


def _size(header: bytes, url: str) -> int:
    if header[124] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(header[125:136], "big")
    try:
        return int(header[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise ValueError(
            f"{url}: bad tar header size {header[124:136]!r}; not a tar shard"
        ) from None


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """Parse pax extended-header records ``"<len> <key>=<value>\\n"``."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        end = pos + int(data[pos:space])
        key, _, value = data[space + 1 : end - 1].partition(b"=")
        out[key] = value
        pos = end
    return out
