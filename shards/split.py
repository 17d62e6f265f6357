"""Seeded train/val/test assignment, stratified by class and grouped by patient."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from srmri.config import require

__all__ = ["SplitConfig", "assign_splits", "empty_splits", "keys_hash"]


@dataclass
class SplitConfig:
    """Split fractions (of all usable samples) and the seed.

    ``test_fraction`` is ignored for sources whose layout fixes the test split (Kaggle).
    """

    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0

    def check(self) -> None:
        require(0 <= self.val_fraction < 1, "split.val_fraction", "must be in [0, 1)")
        require(0 <= self.test_fraction < 1, "split.test_fraction", "must be in [0, 1)")
        require(
            self.val_fraction + self.test_fraction < 1,
            "split.val_fraction",
            "val_fraction + test_fraction must leave some training data",
        )


def assign_splits(
    labels: Sequence[int],
    groups: Sequence[str],
    fixed: Sequence[str | None],
    cfg: SplitConfig,
    content: Sequence[str],
) -> list[str]:
    """Assign each sample to train/val/test, keeping every group in one split.

    The seeded order of the groups starts from their content (the least ``content`` value of
    each group's samples), never from their names: a group's name is a keyed hash of a patient
    id, so ordering by it would give another split, hence other numbers, under another
    machine's secret key. The same inputs and seed give the same split everywhere.

    Groups are placed greedily (largest first, ties in seeded random order) into the split
    whose per-class quota is relatively furthest from being met (ties: train, val, test),
    which stratifies by class. With few groups that can leave a split empty although another
    has several groups: the smallest group of the split with the most groups then moves
    there, the test split served first. A split still empty (fewer groups than splits) is for
    the caller to report (:func:`empty_splits`).

    Args:
        labels: Class index per sample.
        groups: Group (pseudonymised patient, or duplicate cluster) per sample.
        fixed: A split fixed by the source layout (e.g. ``"test"``) or None per sample.
        cfg: Fractions and seed.
        content: A content hash per sample (the sha256 of its stored pixels).

    Returns:
        Split name per sample.
    """
    out: list[str] = [f or "" for f in fixed]
    free = [i for i, f in enumerate(fixed) if not f]
    has_fixed_test = any(f == "test" for f in fixed)
    fractions = {"train": 1.0 - cfg.val_fraction, "val": cfg.val_fraction}
    if not has_fixed_test:
        fractions["train"] -= cfg.test_fraction
        fractions["test"] = cfg.test_fraction

    members: dict[str, list[int]] = defaultdict(list)
    for i in free:
        members[groups[i]].append(i)
    class_total = Counter(labels[i] for i in free)
    target = {s: {c: f * n for c, n in class_total.items()} for s, f in fractions.items()}
    have = {s: Counter() for s in fractions}

    rng = np.random.default_rng(cfg.seed)
    first = {g: min(content[i] for i in idx) for g, idx in members.items()}
    names = sorted(members, key=lambda g: (first[g], g))  # name only between equal contents
    order = [names[k] for k in rng.permutation(len(names))]
    order.sort(key=lambda g: -len(members[g]))  # stable: ties keep the seeded order
    for g in order:
        counts = Counter(labels[i] for i in members[g])

        def need(split: str, counts: Counter = counts) -> float:
            # Relative shortfall, so small splits also get every class when groups are coarse.
            return sum(
                (target[split][c] - have[split][c]) / max(target[split][c], 1e-9) * n
                for c, n in counts.items()
            )

        best = max(fractions, key=need)
        have[best].update(counts)
        for i in members[g]:
            out[i] = best
    _fill_empty(out, members, order, [s for s in ("test", "val") if fractions.get(s, 0) > 0])
    return out


def _fill_empty(
    out: list[str], members: dict[str, list[int]], order: list[str], wanted: list[str]
) -> None:
    """Move one group into each split of ``wanted`` left empty, from a split with several."""
    for split in wanted:
        placed: dict[str, list[str]] = defaultdict(list)
        for g in order:
            placed[out[members[g][0]]].append(g)
        if placed[split]:
            continue
        donor = max(placed, key=lambda s: len(placed[s]))
        if len(placed[donor]) < 2:
            return  # every split holds at most one group: nothing can move
        smallest = min(placed[donor], key=lambda g: len(members[g]))  # ties: seeded order
        for i in members[smallest]:
            out[i] = split


def empty_splits(splits: Sequence[str], fixed: Sequence[str | None], cfg: SplitConfig) -> list[str]:
    """The splits the config asks for that hold no sample (train, val, test order).

    Args:
        splits: Split name per usable sample (:func:`assign_splits`).
        fixed: Split fixed by the layout per sample (a fixed test split is always asked for).
        cfg: Fractions: a split with fraction 0 is not asked for.
    """
    asked = ["train"]
    if cfg.val_fraction > 0:
        asked.append("val")
    if cfg.test_fraction > 0 or "test" in fixed:
        asked.append("test")
    present = set(splits)
    return [s for s in asked if s not in present]


def keys_hash(keys: Sequence[str]) -> str:
    """sha256 of the sorted key list: recorded for the test split to prove it never moved."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()
