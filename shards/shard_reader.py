"""Reading one shard, local or over http(s), as ``(key, {suffix: bytes})`` samples, checked.

Every sample's payloads are checked against the digests of its ``.xxh3`` member
(:mod:`shards.checksum`) as the sample is read, so a flipped byte or a changed label is an
error naming the shard and the key, not a silently altered sample.
"""

from __future__ import annotations

import io
import mmap
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

from shards.checksum import CHECKSUM_SUFFIX, check_sample
from shards.http_stream import HttpSettings, HttpStream
from shards.tar_reader import mapped_members, tar_members

__all__ = ["Checksums", "iter_shard", "open_shard"]

# "require": a sample without a checksum is damaged (sets whose index records checksums);
# "if-present": check the samples that carry one (any set, older ones too); "off": no check.
Checksums = Literal["require", "if-present", "off"]
DEFAULT_SUFFIXES = frozenset({"npy", "cls"})
_HTTP_DEFAULT = HttpSettings()


class MappedShard:
    """A local shard mapped into memory: payloads come out as views of the page cache.

    Reading a 131 KB ``.npy`` payload into a new buffer cost ~35 us a sample (a third of what
    the loader spends on reading); a view of a copy-on-write mapping costs nothing, and the
    arrays made from it are writable without writing to the file. The mapping stays alive as
    long as any view of it does.

    Attributes:
        map: The mapping (slices of it are ``bytes`` copies).
        view: A memoryview of it (slices of it are views).
    """

    def __init__(self, fh: Any) -> None:
        self.map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        self.view = memoryview(self.map)

    def close(self) -> None:
        self.view.release()  # views handed out stay valid; the mapping goes with the last


def open_shard(url: str, http: HttpSettings = _HTTP_DEFAULT) -> Any:
    """A binary stream of a shard at a local path (mapped) or an http(s) URL.

    Raises:
        OSError: Naming the URL, if it cannot be opened.
    """
    if url.startswith(("http://", "https://")):
        return HttpStream(url, http)  # its errors name the URL and what to do
    try:
        with open(url, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return io.BytesIO(b"")  # nothing to map: the tar reader reports it truncated
            return MappedShard(fh)
    except OSError as exc:
        raise OSError(f"{url}: cannot open shard ({exc.strerror or exc})") from exc


def iter_shard(
    url: str,
    skip: int = 0,
    suffixes: frozenset[str] = DEFAULT_SUFFIXES,
    *,
    checksums: Checksums = "if-present",
    http: HttpSettings = _HTTP_DEFAULT,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {suffix: bytes})`` of one shard's samples after the first ``skip``.

    Skipped samples are never read into memory: the member selection counts keys as the tar
    stream passes and rejects their members before their data is read.

    Args:
        url: Local path or http(s) URL of a tar shard.
        skip: Samples to pass over without reading (or checking) their data.
        suffixes: Which members of each sample to return (default ``npy`` and ``cls``).
        checksums: How the returned members are checked (see :data:`Checksums`).
        http: Timeouts and retries of an http(s) shard.

    Raises:
        shards.checksum.CorruptSampleError: If a returned member does not match its checksum.
        ValueError: If the tar is damaged.
        OSError: If the shard cannot be read (naming the URL).
    """
    read = suffixes if checksums == "off" else suffixes | {CHECKSUM_SUFFIX}
    stream = open_shard(url, http)
    try:
        if isinstance(stream, MappedShard):
            samples = _mapped_samples(stream, url, skip, read)
        else:
            samples = _streamed_samples(stream, url, skip, read)
        for key, parts in samples:
            yield key, _checked(url, key, parts, checksums, suffixes)
    finally:
        stream.close()


def _sample_key(fname: str) -> int:
    """Where the key of member ``fname`` ends (-1: no key, the member is ignored).

    webdataset's convention: the key is the name up to the first dot of its basename.
    """
    return fname.find(".", fname.rfind("/") + 1)


def _mapped_samples(
    shard: MappedShard, url: str, skip: int, read: frozenset[str]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The samples of a mapped shard after the first ``skip``: members sliced, not read."""
    count, key, parts = 0, None, {}
    sliced, view = shard.map, shard.view
    for fname, offset, size in mapped_members(sliced, url):
        dot = _sample_key(fname)
        if dot < 0:
            continue
        if fname[:dot] != key:
            if parts:
                yield key, parts  # type: ignore[misc]
            count, key, parts = count + 1, fname[:dot], {}
        suffix = fname[dot + 1 :]
        if count > skip and suffix in read:
            # Only the image stays a view (np.frombuffer takes it); the small members are
            # bytes, which int() and json.loads take.
            end = offset + size
            parts[suffix] = view[offset:end] if suffix == "npy" else sliced[offset:end]
    if parts:
        yield key, parts  # type: ignore[misc]


def _streamed_samples(
    stream: Any, url: str, skip: int, read: frozenset[str]
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of a tar stream (http) after the first ``skip``, whose data is never read."""
    state: list[Any] = [0, None, ""]  # samples started so far, current key, current suffix

    def want(fname: str) -> bool:
        dot = _sample_key(fname)
        if dot < 0:
            return False
        key = fname[:dot]
        if key != state[1]:
            state[0] += 1
            state[1] = key
        state[2] = fname[dot + 1 :]
        return state[0] > skip and state[2] in read

    key: str | None = None
    parts: dict[str, bytes] = {}
    # tar_members yields each member right after `want` accepted it, so `state` is its own.
    for data in _payloads(stream, url, want):
        if state[1] != key:
            if key is not None:
                yield key, parts
            key, parts = state[1], {}
        parts[state[2]] = data
    if key is not None:
        yield key, parts


def _payloads(stream: Any, url: str, want: Callable[[str], bool]) -> Iterator[bytes]:
    """The payloads :func:`shards.tar_reader.tar_members` yields, read errors naming ``url``."""
    try:
        for _, data in tar_members(stream, url, want):
            yield data
    except OSError as exc:
        if str(exc).startswith(url):
            raise
        raise OSError(f"{url}: cannot read shard ({exc})") from exc


def _checked(
    url: str, key: str, parts: dict[str, bytes], checksums: Checksums, suffixes: frozenset[str]
) -> dict[str, bytes]:
    """``parts`` after checking them, without the checksum member unless it was asked for."""
    if checksums != "off":
        check_sample(url, key, parts, required=checksums == "require")
        if CHECKSUM_SUFFIX not in suffixes:
            parts.pop(CHECKSUM_SUFFIX, None)
    return parts
