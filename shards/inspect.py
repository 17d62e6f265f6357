"""``shards inspect``: counts per split, class and QC status, and a contact sheet per class.

Nothing here names an input path: rows are known by key. ``python -m shards locate ROOT``
prints the real files of the rows that are not ``ok`` (see :mod:`shards.locate`).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from shards.format import decode_image, from_uint16, read_index
from shards.loader import iter_shard
from shards.writer import read_manifest_rows
from srmri.atomic import write_bytes

# read_manifest_rows lives beside the manifest's writer; it is also part of inspecting a set.
__all__ = ["contact_sheet", "count_table", "read_manifest_rows"]


def count_table(root: str | Path) -> str:
    """A plain-text table: usable samples per split and class, then QC outcomes."""
    rows = read_manifest_rows(root)
    classes = read_index(root).classes
    per = Counter((r.split, r.class_name) for r in rows if r.status == "ok")
    splits = [s for s in ("train", "val", "test") if any(k[0] == s for k in per)]
    width = max(10, *(len(c) for c in classes)) + 2
    lines = ["split".ljust(8) + "".join(c.rjust(width) for c in classes) + "total".rjust(8)]
    for s in splits:
        counts = [per[(s, c)] for c in classes]
        lines.append(
            s.ljust(8) + "".join(str(n).rjust(width) for n in counts) + str(sum(counts)).rjust(8)
        )
    status = Counter(r.status for r in rows)
    lines.append("")
    lines.append("status: " + ", ".join(f"{k} {v}" for k, v in sorted(status.items())))
    not_read = ("ok", "skipped")
    reasons = Counter(r.reason.split(":", 1)[0] for r in rows if r.status not in not_read)
    if reasons:
        lines.append("reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    skipped = Counter(r.reason.split(":", 1)[0] for r in rows if r.status == "skipped")
    if skipped:
        lines.append("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    dups = Counter(r.duplicate_kind for r in rows if r.duplicate_kind)
    if dups:
        leaks = sum(r.leakage for r in rows)
        lines.append(
            "duplicates: "
            + ", ".join(f"{k} {v}" for k, v in sorted(dups.items()))
            + f"; rows in a duplicate cluster that crosses splits (leakage): {leaks}"
        )
    if reasons or skipped:
        lines.append(
            f"their files (on the machine that made the set): python -m shards locate {root}"
        )
    return "\n".join(lines)


def _samples_per_class(root: Path, per_class: int, n_classes: int) -> dict[int, list]:
    found: dict[int, list] = {c: [] for c in range(n_classes)}
    wanted = frozenset({"npy", "cls", "json"})
    for info in read_index(root).shards:
        for _, sample in iter_shard(str(root / info.name), 0, wanted):
            label = int(sample["cls"])
            if len(found[label]) < per_class:
                meta = json.loads(sample["json"])
                found[label].append((from_uint16(decode_image(sample["npy"])), meta))
        if all(len(v) >= per_class for v in found.values()):
            break
    return found


def contact_sheet(root: str | Path, out: str | Path | None = None, per_class: int = 6) -> Path:
    """Write a PNG grid with up to ``per_class`` samples of every class; returns its path."""
    root = Path(root)
    classes = read_index(root).classes
    found = _samples_per_class(root, per_class, len(classes))
    fig, axes = plt.subplots(
        len(classes), per_class, figsize=(1.8 * per_class, 1.9 * len(classes)), squeeze=False
    )
    for c, name in enumerate(classes):
        for j in range(per_class):
            ax = axes[c][j]
            ax.axis("off")
            if j < len(found[c]):
                img, meta = found[c][j]
                ax.imshow(img, cmap="gray", vmin=0, vmax=1)
                ax.set_title(f"{meta.get('split', '')}", fontsize=7)
        axes[c][0].text(
            -0.08,
            0.5,
            name,
            transform=axes[c][0].transAxes,
            rotation=90,
            va="center",
            ha="right",
            fontsize=10,
        )
    fig.tight_layout()
    path = Path(out) if out else root / "contact_sheet.png"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return path
