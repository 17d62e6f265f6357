"""A minimal reader of the tar members of a shard: names and payloads, nothing else.

``tarfile`` spends ~1 ms per sample parsing the pax headers ``webdataset.TarWriter`` puts
before every member it writes with a float mtime, more than the loader's whole per-sample
budget, while the member names and sizes are all a shard reader needs; this reader (ustar,
pax and GNU long names) measured 64 us per sample against 304 us for webdataset's
``tar_file_iterator`` (BENCHMARKS.md, issue 2).

A shard in memory (mapped) is walked by :func:`mapped_members`, which reads only the headers
and leaves the payloads where they are: a plain ustar header is unpacked with one ``struct``
call and its size and checksum fields are looked up rather than parsed again, which took the
walk from 27 to 9-14 us per sample of four members (a shard held in memory, issue 13), 3-5%
of what the loader spends on a sample. A member index written beside each shard would save
most of that (checking one against the headers it describes, gathered and hashed, measured
0.7 us a sample), but it is a second file per shard that ingest, enhance, copies of a set and
http sets would all have to keep in step with the shard, for a few percent: not done.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["mapped_members", "tar_members"]

_ZERO_BLOCK = bytes(512)
_SPACES = 8 * ord(" ")
_ADLER_MOD = 65521
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
# name, size, checksum, type, magic, prefix: the fields a plain ustar header is read for
_USTAR = struct.Struct("100s24x12s12x8sc100x6s82x155s")
# Field bytes -> value: parsing an octal field measured ~1 us, a look-up ~0.05 us; a shard set
# has few distinct sizes (its payloads share a shape) and checksum fields. Bounded, cleared when
# full.
_SIZES: dict[bytes, int] = {}
_SUM_OFFSETS: dict[bytes, int] = {}
_REMEMBERED = 4096


def tar_members(stream: Any, url: str, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` of the regular files of a tar stream that ``want`` selects.

    Members not wanted are skipped (seeked over on seekable streams) without being read into
    memory.

    Args:
        stream: A binary file object (``read``; ``seek`` used when ``seekable()``).
        url: Where the stream comes from, for error messages.
        want: Called with each regular member's name; False skips its data.

    Yields:
        ``(name, payload bytes)`` of each wanted member, in tar order.

    Raises:
        ValueError: On a damaged or truncated tar.
    """
    seekable = getattr(stream, "seekable", lambda: False)()
    read, pax = stream.read, {}
    while len(header := read(512)) == 512 and header != _ZERO_BLOCK:
        kind, size, fname, pax = _parse(header, pax, url)
        padded = (size + 511) & ~511
        if kind in (b"x", b"L"):  # about the next member
            pax = _extended(kind, read(padded)[:size])
            continue
        if kind in _REGULAR and want(fname):
            data = read(size)
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


def mapped_members(buf: Any, url: str) -> Iterator[tuple[str, int, int]]:
    """Yield ``(name, offset, size)`` of the regular files of a tar held in memory.

    Nothing is read but the headers: the caller slices the payloads it wants out of ``buf``.
    Plain ustar headers (what the shard writers make) are read by a fast path; others go
    through the general parser (see the module docstring).

    Args:
        buf: The whole tar (``bytes``, an ``mmap``, ...): ``len()`` and the buffer protocol.
        url: Where it comes from, for error messages.

    Yields:
        ``(name, offset of the payload in buf, payload size)``, in tar order.

    Raises:
        ValueError: On a damaged or truncated tar.
    """
    view = memoryview(buf)
    pos, end, pax, unpack = 0, len(view), {}, _USTAR.unpack_from
    while pos + 512 <= end:
        name, size_field, sum_field, kind, magic, prefix = unpack(view, pos)
        block = view[pos : pos + 512]
        if not name[0] and block == _ZERO_BLOCK:
            return
        if pax or (prefix[0] and magic[:5] == b"ustar") or kind in (b"x", b"L"):
            kind, size, fname, pax = _parse(bytes(block), pax, url)
        else:  # the common case, inlined: field values are looked up, not parsed again
            offset = _SUM_OFFSETS.get(sum_field)
            if offset is None:
                offset = _sum_offset(sum_field, url)
            if ((zlib.adler32(block) & 0xFFFF) + offset) % _ADLER_MOD:
                raise ValueError(f"{url}: bad tar header checksum; the shard is damaged")
            size = _SIZES.get(size_field)
            if size is None:
                if len(_SIZES) >= _REMEMBERED:
                    _SIZES.clear()
                size = _SIZES.setdefault(size_field, _octal(size_field, url))
            fname = name.rstrip(b"\0").decode()
        pos += 512
        if pos + size > end:
            raise ValueError(f"{url}: truncated in {fname or 'a header'}; the shard is damaged")
        if kind in (b"x", b"L"):  # about the next member
            pax = _extended(kind, bytes(view[pos : pos + size]))
        elif kind in _REGULAR:
            yield fname, pos, size
        pos += (size + 511) & ~511
    raise ValueError(f"{url}: truncated (no end-of-archive block); the shard is damaged")


def _parse(header: bytes, pax: dict[bytes, bytes], url: str) -> tuple[bytes, int, str, dict]:
    """``(kind, size, name, pax left for the next member)`` of a checked header block.

    ``name`` is empty for a pax or GNU long-name header (which describe the next member).
    """
    _check_sum(header, header[148:156], url)
    kind = header[156:157]
    if kind in (b"x", b"L"):
        return kind, _octal(header[124:136], url), "", pax
    if pax:
        size = int(pax[b"size"]) if b"size" in pax else _octal(header[124:136], url)
        name = pax.get(b"path") or header[:100].rstrip(b"\0")
    else:
        size = _octal(header[124:136], url)
        name = header[:100].rstrip(b"\0")
        if header[345] and header[257:262] == b"ustar":
            name = header[345:500].rstrip(b"\0") + b"/" + name
    return kind, size, name.decode(), {}


def _extended(kind: bytes, data: bytes) -> dict[bytes, bytes]:
    """What a pax header (``x``) or GNU long name (``L``) says about the next member."""
    return _pax_records(data) if kind == b"x" else {b"path": data.rstrip(b"\0")}


def _check_sum(block: Any, field: bytes, url: str) -> None:
    """Check a header block's checksum ``field`` (the byte sum with the field read as spaces).

    ``sum(header)`` costs ~8 us a block in CPython, four blocks a sample; adler32's low half is
    ``1 + sum mod 65521`` and costs ~0.3 us. A block's sum is below 2 * 65521, so comparing
    modulo 65521 only misses a damage that moves the sum by exactly 65521.
    """
    if ((zlib.adler32(block) & 0xFFFF) + _sum_offset(field, url)) % _ADLER_MOD:
        raise ValueError(f"{url}: bad tar header checksum; the shard is damaged")


def _sum_offset(field: bytes, url: str) -> int:
    """What :func:`_check_sum` adds to adler32's low half: 0 modulo 65521 when the sum holds.

    Remembered per field value (a few hundred distinct ones in a shard set).
    """
    try:
        recorded = int(field.strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise ValueError(f"{url}: bad tar header field {field!r}; not a tar shard") from None
    if len(_SUM_OFFSETS) >= _REMEMBERED:
        _SUM_OFFSETS.clear()
    return _SUM_OFFSETS.setdefault(field, _SPACES - 1 - sum(field) - recorded)


def _octal(field: bytes, url: str) -> int:
    """A header's size field: octal digits, or GNU base-256 for sizes of 8 GiB and more."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise ValueError(f"{url}: bad tar header size {field!r}; not a tar shard") from None


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
