"""The labels of one split: per-class sample counts and each sample's label, in shard order.

Two readers of what a split holds, class by class:

* :func:`split_class_counts`, the samples of each class, from the counts ``index.json``
  records (``counts.samples.<split>``, written by ingest and copied by enhance); a set whose
  index records none (one written by hand, or before the counts existed) has its labels read.
* :func:`read_split_labels`, every sample's label in stream order, one array per shard, read
  from the shards' ``.cls`` members alone. The balanced sampler (:mod:`shards.plan`) draws
  from them. A local shard costs a walk over its tar headers (~10 us a sample: 10 s for a
  million samples); an http(s) set is streamed once, since a tar has no index to seek with.

Both check what they find against the index: a count or label that disagrees with it is an
error naming the file and the problem, never a silently skewed draw or weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shards.format import INDEX_NAME, DatasetIndex, join_url
from shards.http_stream import HttpSettings
from shards.shard_reader import Checksums, iter_shard

__all__ = ["check_labels", "read_split_labels", "split_class_counts"]

_CLS_ONLY = frozenset({"cls"})


def read_split_labels(
    root: str,
    index: DatasetIndex,
    split: str,
    http: HttpSettings | None = None,
    checksums: Checksums = "require",
) -> tuple[np.ndarray, ...]:
    """Each sample's label, one ``int64`` array per shard of ``split`` (index order).

    Args:
        root: The shard set's folder or URL prefix.
        index: Its index.
        split: The split.
        http: Timeouts and retries of an http(s) set (default :class:`HttpSettings`).
        checksums: How the ``.cls`` members are checked against their sample's checksum.

    Returns:
        The labels of each shard, in the order its samples are stored.

    Raises:
        ValueError: If a shard holds another number of samples than the index says, a label
            that is not an integer or not one of the set's classes, or (checked against the
            index's recorded counts, when it has them) other per-class counts.
        shards.checksum.CorruptSampleError: If a ``.cls`` member does not match its checksum.
    """
    http = http or HttpSettings()
    out = []
    for shard in index.split_shards(split):
        url = join_url(root, shard.name)
        labels = []
        for key, parts in iter_shard(url, 0, _CLS_ONLY, checksums=checksums, http=http):
            labels.append(_label(url, key, parts, len(index.classes)))
        if len(labels) != shard.count:
            raise ValueError(
                f"{url}: holds {len(labels)} samples but {INDEX_NAME} says {shard.count}; the "
                "shard set is damaged (run `python -m shards verify`)"
            )
        out.append(np.asarray(labels, dtype=np.int64))
    recorded = _recorded_counts(root, index, split)
    if recorded is not None and out:
        found = np.bincount(np.concatenate(out), minlength=len(index.classes)).tolist()
        check_labels(root, index, split, found, recorded)
    return tuple(out)


def split_class_counts(
    root: str, index: DatasetIndex, split: str, http: HttpSettings | None = None
) -> list[int]:
    """Samples of each class of ``index.classes`` (in that order) in ``split``.

    Args:
        root: The shard set's folder or URL prefix (read only when the index records no
            per-class counts).
        index: Its index.
        split: The split.
        http: Timeouts and retries of an http(s) set.

    Returns:
        One count per class, zero for a class the split does not hold.

    Raises:
        ValueError: If the recorded counts do not add up to the split's samples, or the
            shards do not hold what the index says (see :func:`read_split_labels`).
    """
    recorded = _recorded_counts(root, index, split)
    if recorded is not None:
        return recorded
    labels = read_split_labels(root, index, split, http)
    if not labels:
        return [0] * len(index.classes)
    return np.bincount(np.concatenate(labels), minlength=len(index.classes)).tolist()


def check_labels(
    root: str, index: DatasetIndex, split: str, found: Sequence[int], recorded: Sequence[int]
) -> None:
    """Raise ValueError naming the index when the labels read disagree with its counts."""
    if list(found) != list(recorded):
        diff = {c: (r, f) for c, r, f in zip(index.classes, recorded, found, strict=True) if r != f}
        raise ValueError(
            f"{join_url(root, INDEX_NAME)}: records other per-class counts of split {split!r} "
            f"than its shards hold (class: recorded, found): {diff}; the shard set is damaged "
            "(run `python -m shards verify`)"
        )


def _recorded_counts(root: str, index: DatasetIndex, split: str) -> list[int] | None:
    """The per-class counts the index records for ``split``, or None when it records none."""
    samples = index.counts.get("samples") if isinstance(index.counts, dict) else None
    per_class = samples.get(split) if isinstance(samples, dict) else None
    if not isinstance(per_class, dict):
        return None  # recorded by no ingest (a set written by hand): read the labels
    where = join_url(root, INDEX_NAME)
    unknown = sorted(set(per_class) - set(index.classes))
    if unknown:
        raise ValueError(
            f"{where}: counts.samples.{split} names classes {unknown} that are not among its "
            f"classes {index.classes}; the index is damaged"
        )
    counts = [int(per_class.get(c, 0)) for c in index.classes]
    if sum(counts) != index.num_samples(split):
        raise ValueError(
            f"{where}: counts.samples.{split} adds up to {sum(counts)} samples but the split's "
            f"shards hold {index.num_samples(split)}; the index is damaged"
        )
    return counts


def _label(url: str, key: str, parts: dict[str, bytes], n_classes: int) -> int:
    """The sample's class index, checked to be one of the set's ``n_classes`` classes."""
    if "cls" not in parts:
        raise ValueError(f"{url}: sample {key!r} has no .cls member")
    raw = bytes(parts["cls"])
    try:
        label = int(raw)
    except ValueError:
        raise ValueError(f"{url}: sample {key!r}: .cls {raw[:20]!r} is not an integer") from None
    if not 0 <= label < n_classes:
        raise ValueError(
            f"{url}: sample {key!r} has label {label}, but the set has {n_classes} classes"
        )
    return label
