"""The synthetic data set: determinism, balance, grouping and where each class's lesion lies.

Every test renders real slices of the MNI152 template shipped inside nilearn's wheel.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from shards.synth import SynthConfig, SynthRender, load_synth_item, render_synth, synth_items
from srmri.config import ConfigError, config_from_dict


def _samples(cfg: SynthConfig, kind: str, count: int) -> list[int]:
    """Indices of the first slice of ``count`` different subjects of class ``kind``."""
    label = cfg.classes.index(kind)
    found = [
        it.synth_index
        for it in synth_items(cfg)
        if it.label == label and it.synth_index % cfg.slices_per_subject == 0
    ]
    assert len(found) >= count, f"only {len(found)} subjects of class {kind}"
    return found[:count]


def _pair(cfg: SynthConfig, index: int) -> tuple[SynthRender, SynthRender]:
    """The sample rendered with and without its lesion (same subject, slice and noise)."""
    label = synth_items(cfg)[index].label
    assert label is not None
    return render_synth(cfg, index, label), render_synth(cfg, index, label, lesion=False)


def _brain(image: np.ndarray) -> np.ndarray:
    """The brain mask of a noise-free render: tissue above background, holes filled."""
    return ndimage.binary_fill_holes(image > 0.1 * image.max())


def test_same_seed_gives_identical_images_and_seeds_differ() -> None:
    cfg = SynthConfig(n=8, seed=5)
    first = [load_synth_item(it, cfg)[0].image for it in synth_items(cfg)]
    again = [load_synth_item(it, cfg)[0].image for it in synth_items(SynthConfig(n=8, seed=5))]
    other_cfg = SynthConfig(n=8, seed=6)
    other = [load_synth_item(it, other_cfg)[0].image for it in synth_items(other_cfg)]
    for a, b, c in zip(first, again, other):
        assert a.tobytes() == b.tobytes()
        assert a.shape != c.shape or not np.array_equal(a, c)
    # Different samples of one seed differ too (not one image repeated).
    assert not np.array_equal(first[0], first[1])


def test_slice_is_a_finite_2d_float32_image_with_the_subject_as_patient() -> None:
    cfg = SynthConfig(n=12, seed=1, slices_per_subject=3)
    for item in synth_items(cfg):
        slices = load_synth_item(item, cfg)
        assert len(slices) == 1
        s = slices[0]
        assert s.image.dtype == np.float32 and s.image.ndim == 2
        assert min(s.image.shape) >= 150
        assert np.isfinite(s.image).all() and s.image.std() > 0.05 * s.image.max()
        assert s.index is None and s.label is None
        assert s.patient == f"synth-subject-{item.synth_index // 3}"
        # The deformation keeps the brain in frame: the border is background (near 0).
        border = np.concatenate([s.image[:3].ravel(), s.image[-3:].ravel()])
        border = np.concatenate([border, s.image[:, :3].ravel(), s.image[:, -3:].ravel()])
        assert border.mean() < 0.08 * s.image.max()


def test_items_are_balanced_listed_and_grouped_by_subject() -> None:
    cfg = SynthConfig(n=400, seed=2)
    items = synth_items(cfg)
    assert [it.synth_index for it in items] == list(range(400))
    assert items[7].rel_path == "synth/000007" and items[7].source == "synth"
    assert all(it.path == "" and it.split_hint is None for it in items)
    assert Counter(it.label for it in items) == {0: 100, 1: 100, 2: 100, 3: 100}
    # A subject (patient group) has one class.
    for start in range(0, 400, 4):
        assert len({it.label for it in items[start : start + 4]}) == 1
    assert [it.label for it in synth_items(cfg)] == [it.label for it in items]
    other = [it.label for it in synth_items(SynthConfig(n=400, seed=3))]
    assert other != [it.label for it in items]
    # Counts stay within one subject of each other when n is not a multiple.
    for n, per in [(50, 3), (37, 4), (9, 5), (3, 4)]:
        cfg_odd = SynthConfig(n=n, slices_per_subject=per, seed=n)
        odd = Counter(it.label for it in synth_items(cfg_odd))
        counts = [odd.get(c, 0) for c in range(4)]
        assert max(counts) - min(counts) <= per and sum(counts) == n, (n, per, counts)
    two = Counter(it.label for it in synth_items(SynthConfig(n=24, classes=["notumor", "glioma"])))
    assert two == {0: 12, 1: 12}


def test_a_subjects_slices_are_nearby_levels_of_one_anatomy() -> None:
    cfg = SynthConfig(n=64, seed=4, noise=0.0)
    items = synth_items(cfg)
    for kind in ("glioma", "notumor", "pituitary"):
        start = _samples(cfg, kind, 1)[0]
        renders = [render_synth(cfg, i, items[i].label or 0) for i in range(start, start + 4)]
        levels = [r.level for r in renders]
        assert max(levels) - min(levels) <= 8, levels
        if kind == "pituitary":
            assert max(levels) <= 55  # inferior slices, at the skull base
        # Same deformation: brain outlines of neighbouring levels overlap closely.
        masks = [_brain(r.image) for r in renders]
        inter = (masks[0] & masks[1]).sum()
        assert inter / (masks[0] | masks[1]).sum() > 0.8


@pytest.mark.parametrize("kind", ["glioma", "meningioma", "pituitary"])
def test_each_lesion_changes_the_image_only_in_a_local_region(kind: str) -> None:
    cfg = SynthConfig(n=64, seed=7)
    for index in _samples(cfg, kind, 3):
        on, off = _pair(cfg, index)
        assert on.kind == kind and on.lesion_mask.sum() > 20 and not off.lesion_mask.any()
        diff = np.abs(on.image - off.image)
        assert diff.max() > 0.2 * off.image.max()
        rows, cols = np.nonzero(on.lesion_mask)
        radius = np.sqrt(on.lesion_mask.sum() / np.pi)
        yy, xx = np.indices(diff.shape)
        near = np.hypot(yy - rows.mean(), xx - cols.mean()) < 4.5 * radius + 3
        assert near.mean() < 0.35  # the region is local, not most of the image
        assert diff[near].sum() / diff.sum() > 0.97


def test_no_tumour_samples_have_no_lesion() -> None:
    cfg = SynthConfig(n=32, seed=7)
    for index in _samples(cfg, "notumor", 2):
        on, off = _pair(cfg, index)
        assert not on.lesion_mask.any() and np.array_equal(on.image, off.image)


def test_meningioma_sits_on_the_brain_surface_and_glioma_inside() -> None:
    cfg = SynthConfig(n=96, seed=8, noise=0.0)
    for index in _samples(cfg, "meningioma", 4):
        on, off = _pair(cfg, index)
        brain = _brain(off.image)
        inside = (on.lesion_mask & brain).sum() / on.lesion_mask.sum()
        assert 0.05 < inside < 0.95, inside  # straddles the brain edge: extra-axial
        edge = brain & ~ndimage.binary_erosion(brain)
        assert (ndimage.binary_dilation(on.lesion_mask, iterations=2) & edge).any()
    for index in _samples(cfg, "glioma", 4):
        on, off = _pair(cfg, index)
        inside = (on.lesion_mask & _brain(off.image)).sum() / on.lesion_mask.sum()
        assert inside > 0.97, inside  # intra-axial


def test_pituitary_lesion_is_small_midline_and_inferior() -> None:
    cfg = SynthConfig(n=96, seed=9, noise=0.0)
    areas = []
    for index in _samples(cfg, "pituitary", 4):
        on, off = _pair(cfg, index)
        brain = _brain(off.image)
        cols = np.nonzero(brain)[1]
        midline = (cols.min() + cols.max()) / 2
        assert abs(np.nonzero(on.lesion_mask)[1].mean() - midline) < 8
        assert on.level <= 55
        areas.append(on.lesion_mask.sum())
    glioma = [_pair(cfg, i)[0].lesion_mask.sum() for i in _samples(cfg, "glioma", 4)]
    assert np.mean(areas) < np.mean(glioma)


def _effect(cfg: SynthConfig, index: int) -> tuple[float, int]:
    on, off = _pair(cfg, index)
    return float(np.abs(on.image - off.image).sum()), int(on.lesion_mask.sum())


@pytest.mark.parametrize("kind", ["glioma", "meningioma", "pituitary"])
def test_lesion_size_and_contrast_scale_the_effect(kind: str) -> None:
    base = {"n": 32, "seed": 10, "noise": 0.0}
    index = _samples(SynthConfig(**base), kind, 1)[0]
    small = _effect(SynthConfig(**base, lesion_size=0.5), index)
    large = _effect(SynthConfig(**base, lesion_size=1.5), index)
    assert large[1] > 4 * small[1] and large[0] > 3 * small[0]
    faint = _effect(SynthConfig(**base, lesion_contrast=0.4), index)
    strong = _effect(SynthConfig(**base, lesion_contrast=1.6), index)
    assert faint[1] <= strong[1] and strong[0] > 1.5 * faint[0]


def test_glioma_has_more_fine_structure_than_meningioma() -> None:
    # Fine heterogeneity (rim, necrosis, texture) is what low resolution destroys: high-pass energy.
    cfg = SynthConfig(n=64, seed=11, noise=0.0)

    def grain(kind: str) -> float:
        values = []
        for index in _samples(cfg, kind, 3):
            on, _ = _pair(cfg, index)
            core = ndimage.binary_erosion(on.lesion_mask, iterations=2)
            high = on.image - ndimage.gaussian_filter(on.image, 2.0)
            values.append(float(high[core].std()))
        return float(np.mean(values))

    assert grain("glioma") > 2 * grain("meningioma")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"n": 0}, "synth.n"),
        ({"n": -3}, "synth.n"),
        ({"slices_per_subject": 0}, "synth.slices_per_subject"),
        ({"lesion_size": -1.0}, "synth.lesion_size"),
        ({"lesion_size": 0.0}, "synth.lesion_size"),
        ({"lesion_contrast": -0.5}, "synth.lesion_contrast"),
        ({"noise": -0.01}, "synth.noise"),
        ({"bias_field": -0.2}, "synth.bias_field"),
        ({"deformation": -1.0}, "synth.deformation"),
        ({"classes": ["glioma", "tumour"]}, "synth.classes"),
        ({"classes": ["glioma", "glioma"]}, "synth.classes"),
        ({"classes": []}, "synth.classes"),
    ],
)
def test_check_rejects_bad_settings(override: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        config_from_dict(SynthConfig, override)


def test_config_loads_from_a_mapping_and_bad_labels_are_refused() -> None:
    cfg = config_from_dict(SynthConfig, {"n": 8, "lesion_size": 0.5, "classes": ["glioma"]})
    assert cfg.n == 8 and cfg.lesion_size == 0.5
    assert {it.label for it in synth_items(cfg)} == {0}
    with pytest.raises(ValueError, match="label 1"):
        render_synth(cfg, 0, 1)
