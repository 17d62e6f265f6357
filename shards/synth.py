"""The built-in synthetic data set: axial slices of the MNI152 template with simulated tumours.

Each sample is one axial slice of nilearn's MNI152 2009c T1 template (1 mm, skull stripped,
shipped inside nilearn's wheel, so nothing is downloaded), warped by a random affine plus a
smooth elastic field, given a random contrast curve, bias field and Rician noise, and, for the
tumour classes, a simulated lesion:

- ``glioma``: an irregular intra-axial mass in one hemisphere with a heterogeneous enhancing
  rim, often a necrotic core, and finger-like oedema around it;
- ``meningioma``: a round, homogeneous, bright extra-axial mass sitting on the brain surface
  (dural based, with a short dural tail) that indents the brain;
- ``pituitary``: a small sellar mass on the midline at the skull base (inferior slices only);
- ``notumor``: no lesion.

Samples are grouped into synthetic subjects of ``slices_per_subject`` consecutive indices.
A subject has one class and one anatomy (deformation, contrast, bias field, lesion shape);
its slices are nearby axial levels through the same 3-D lesion. What a subject shares is drawn
from ``default_rng([seed, subject, stream])``, what a slice owns (its level, texture, noise)
from ``default_rng([seed, index])``, so a sample is a pure function of ``(config, index)``.
Fine texture (the glioma's heterogeneity) and small lesions are what separate the classes at
low ``lesion_size`` / ``lesion_contrast``, which is what makes image resolution matter.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from shards.sources.base import Slice, SourceItem
from srmri.config import require

__all__ = [
    "SYNTH_CLASSES",
    "SynthConfig",
    "SynthRender",
    "load_synth_item",
    "render_synth",
    "synth_items",
]

SYNTH_CLASSES: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")

_TEMPLATE_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
# Landmarks in the template's axial slices as this module orients them (rows run from
# anterior to posterior, columns are voxel x): the midline (MNI x = 0) and the suprasellar
# cistern / sella region, found by looking at the template.
_MIDLINE_COL = 98.0
_SELLA_ROW = (96.0, 106.0)
_SELLA_LEVELS = (43, 50)
_BRAIN_THRESHOLD = 0.08  # template intensity (0..1) above which a voxel is brain
# Axial levels (template voxel z) where each class's subject is centred.
_LEVELS = {
    "glioma": (58, 118),
    "meningioma": (60, 125),
    "notumor": (40, 125),
    "pituitary": _SELLA_LEVELS,
}
# Streams of a subject's random draws (third seed word; never 0, see _subject_rng).
_ANATOMY, _LESION, _LABELS = 1, 2, 3


@dataclass
class SynthConfig:
    """Settings of the synthetic data set.

    Attributes:
        n: Number of slices (samples).
        seed: Seed of every random draw (>= 0); the same seed gives bit-identical images.
        slices_per_subject: Consecutive samples that share a synthetic subject (patient group,
            class and anatomy).
        lesion_size: Multiplier of the default lesion radius (8-14 mm; pituitary 5-9 mm).
        lesion_contrast: Multiplier of the default lesion contrast (0: lesion invisible).
        noise: Rician noise sigma relative to the slice's maximum intensity.
        bias_field: Strength of the smooth multiplicative bias field (0.2: peaks of about
            +-20 %).
        deformation: Strength of the random affine and elastic deformation (0: none).
        classes: Class names, label = position in this list; each one of ``SYNTH_CLASSES``.
    """

    n: int = 400
    seed: int = 0
    slices_per_subject: int = 4
    lesion_size: float = 1.0
    lesion_contrast: float = 1.0
    noise: float = 0.02
    bias_field: float = 0.2
    deformation: float = 1.0
    classes: list[str] = field(default_factory=lambda: list(SYNTH_CLASSES))

    def check(self) -> None:
        """Raise ConfigError for values that are well typed but unusable."""
        require(self.n > 0, "synth.n", f"must be at least 1, got {self.n}")
        require(self.seed >= 0, "synth.seed", f"must be >= 0, got {self.seed}")
        require(
            self.slices_per_subject >= 1,
            "synth.slices_per_subject",
            f"must be at least 1, got {self.slices_per_subject}",
        )
        require(
            0 < self.lesion_size <= 3,
            "synth.lesion_size",
            f"must be in (0, 3] (larger lesions leave the brain), got {self.lesion_size}",
        )
        for key in ("lesion_contrast", "noise", "bias_field", "deformation"):
            value = getattr(self, key)
            require(value >= 0, f"synth.{key}", f"must be >= 0, got {value}")
        require(self.noise <= 1, "synth.noise", f"must be <= 1, got {self.noise}")
        require(len(self.classes) > 0, "synth.classes", "must name at least one class")
        unknown = [c for c in self.classes if c not in SYNTH_CLASSES]
        require(
            not unknown,
            "synth.classes",
            f"unknown class(es) {unknown}; known: {', '.join(SYNTH_CLASSES)}",
        )
        require(
            len(set(self.classes)) == len(self.classes),
            "synth.classes",
            f"lists a class twice: {self.classes}",
        )


@dataclass
class SynthRender:
    """One rendered sample and what the tests need to know about it.

    Attributes:
        image: 2-D float32 image, anterior up, background near 0.
        lesion_mask: Boolean mask of the tumour itself (all False for ``notumor`` or when
            rendered with the lesion off).
        level: Axial level (template voxel z) of the slice.
        kind: Class name of the sample.
    """

    image: np.ndarray
    lesion_mask: np.ndarray
    level: int
    kind: str


@dataclass(frozen=True)
class _Geometry:
    """A template axial level: its filled brain mask, depth inside it, and centroid."""

    mask: np.ndarray
    depth: np.ndarray
    centroid: tuple[float, float]


@dataclass(frozen=True)
class _Anatomy:
    """What a subject's slices share: the warp, the contrast curve and the bias field."""

    matrix: np.ndarray  # 2x2, output offset from centre -> template offset
    shift: np.ndarray  # (2,) template pixels
    elastic: np.ndarray  # (2, H, W) template pixels
    gamma: float
    bias: np.ndarray  # (H, W) multiplicative


@dataclass(frozen=True)
class _Lesion:
    """A subject's 3-D lesion in template coordinates (row, col, level); radius 0: none."""

    kind: str
    level: int  # axial level of the lesion centre (the subject's level for notumor)
    harmonics: np.ndarray  # (3, K, 2) amplitude, phase of outline bumps: mass, core, oedema
    centre: tuple[float, float] = (0.0, 0.0)
    radius: float = 0.0  # 3-D radius in template pixels (mm)
    push: float = 0.0  # fraction of the radius cleared of tissue by mass effect (0..1)
    necrosis: float = 0.0  # necrotic core radius as a fraction of the mass radius; 0: none
    oedema: float = 0.0  # oedema radius as a fraction of the mass radius; 0: none
    brightness: float = 0.0  # target intensity of the solid tumour (template scale 0..1)
    texture: float = 0.0  # amplitude of the fine heterogeneous texture
    normal: tuple[float, float] = (0.0, 0.0)  # meningioma: outward normal at the attachment
    attachment: tuple[float, float] = (0.0, 0.0)  # meningioma: attachment on the surface
    curvature: float = 20.0  # meningioma: radius of the brain surface at the attachment


@lru_cache(maxsize=1)
def _template() -> np.ndarray:
    """The template as (level, row, col) float32 in [0, 1], axial slices with anterior up.

    Loaded once per process. Reads the file inside nilearn's wheel; falls back to nilearn's
    loader where a nilearn version stores it elsewhere.
    """
    import nibabel as nib

    # Find the file without importing nilearn.datasets, which pulls in seconds of imports.
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise RuntimeError("synth: nilearn is not installed; it ships the MNI152 template")
    path = Path(spec.origin).parent / "datasets" / "data" / _TEMPLATE_FILE
    if path.is_file():
        data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    else:
        from nilearn.datasets import load_mni152_template

        data = load_mni152_template(resolution=1).get_fdata(dtype=np.float32)
    if data.ndim != 3 or not np.isfinite(data).all() or data.max() <= 0:
        raise RuntimeError(f"{path}: the MNI152 template is not a finite, non-empty 3-D volume")
    # (x, y, z) -> rot90 puts y (posterior->anterior) on rows reversed: anterior at the top.
    vol = np.rot90(data, k=1, axes=(0, 1)).transpose(2, 0, 1)
    return np.ascontiguousarray(vol / data.max(), dtype=np.float32)


@cache
def _geometry(level: int) -> _Geometry:
    """Brain mask (holes filled), its distance transform and centroid at one axial level."""
    mask = ndimage.binary_fill_holes(_template()[level] > _BRAIN_THRESHOLD)
    depth = ndimage.distance_transform_edt(mask).astype(np.float32)
    rows, cols = np.nonzero(mask)
    return _Geometry(mask, depth, (float(rows.mean()), float(cols.mean())))


@lru_cache(maxsize=4)
def _grid(shape: tuple[int, int]) -> np.ndarray:
    """Pixel coordinates (2, H, W) float32, cached because every render needs them."""
    return np.indices(shape, dtype=np.float32)


def _subject_rng(cfg: SynthConfig, subject: int, stream: int) -> np.random.Generator:
    # The stream word is never 0: SeedSequence ignores trailing zeros, so [s, i] and [s, i, 0]
    # would collide with the per-slice generator [seed, index].
    return np.random.default_rng([cfg.seed, subject, stream])


@lru_cache(maxsize=16)
def _basis(length: int, grid: int) -> np.ndarray:
    """(length, grid) weights of ``grid`` Gaussian bumps spread over ``length`` pixels.

    Rows sum to 1, so a field made from values in [-1, 1] stays in [-1, 1].
    """
    centres = np.linspace(0.0, length - 1.0, grid)
    width = 0.6 * (length - 1.0) / max(grid - 1, 1)
    x = np.arange(length, dtype=np.float64)[:, None]
    weights = np.exp(-0.5 * ((x - centres[None, :]) / width) ** 2)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], grid: int) -> np.ndarray:
    """A smooth random field with values in [-1, 1]: random values on a coarse grid, blended.

    Two small matrix products instead of a spline zoom: the same smoothness at a tenth of the
    cost, which matters as every slice rebuilds its subject's fields.
    """
    coarse = rng.uniform(-1.0, 1.0, size=(grid, grid)).astype(np.float32)
    return _basis(shape[0], grid) @ coarse @ _basis(shape[1], grid).T


def _draw_anatomy(cfg: SynthConfig, subject: int, shape: tuple[int, int]) -> _Anatomy:
    """The subject's warp, contrast curve and bias field."""
    rng = _subject_rng(cfg, subject, _ANATOMY)
    d = cfg.deformation
    angle = math.radians(rng.uniform(-8.0, 8.0) * d)
    scale = np.exp(rng.uniform(-0.06, 0.06) * d + rng.uniform(-0.03, 0.03, size=2) * d)
    shear = rng.uniform(-0.05, 0.05) * d
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    matrix = rotation @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag(scale)
    shift = rng.uniform(-5.0, 5.0, size=2) * d
    # Blended fields have std ~0.3 and peaks ~0.65: elastic shifts of ~2 px, up to ~4 px,
    # and a bias field whose peaks reach about +-bias_field.
    elastic = np.stack([_smooth_field(rng, shape, 5) for _ in range(2)]) * (6.0 * d)
    gamma = float(np.exp(rng.uniform(-0.2, 0.2)))
    bias = np.exp(cfg.bias_field * 1.5 * _smooth_field(rng, shape, 4))
    return _Anatomy(matrix.astype(np.float32), shift.astype(np.float32), elastic, gamma, bias)


def _hemisphere_site(
    rng: np.random.Generator, geometry: _Geometry, radius: float
) -> tuple[float, float]:
    """A glioma centre: deep enough for the mass to stay in the brain, off the midline."""
    rows, cols = np.indices(geometry.mask.shape)
    lateral = np.abs(cols - _MIDLINE_COL) >= 0.6 * radius + 4
    for need in (0.9 * radius + 3, 0.6 * radius + 2, 0.3 * radius + 1):
        candidates = np.flatnonzero((geometry.depth >= need) & lateral)
        if candidates.size:
            pick = candidates[rng.integers(candidates.size)]
            return float(rows.flat[pick]), float(cols.flat[pick])
    pick = int(np.argmax(np.where(lateral, geometry.depth, 0)))
    return float(rows.flat[pick]), float(cols.flat[pick])


def _surface_site(
    rng: np.random.Generator, geometry: _Geometry
) -> tuple[tuple[float, float], tuple[float, float], float]:
    """A point on the outer brain surface, its outward normal and the local surface radius."""
    phi = rng.uniform(0.0, 2.0 * math.pi)
    normal = (math.sin(phi), math.cos(phi))
    steps = np.arange(0.0, 200.0, 0.5)
    r = np.rint(geometry.centroid[0] + steps * normal[0]).astype(int)
    c = np.rint(geometry.centroid[1] + steps * normal[1]).astype(int)
    h, w = geometry.mask.shape
    inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    hits = np.flatnonzero(inside)
    hits = hits[geometry.mask[r[hits], c[hits]]]
    reach = float(steps[hits[-1]]) if hits.size else 0.0
    attachment = (
        geometry.centroid[0] + reach * normal[0],
        geometry.centroid[1] + reach * normal[1],
    )
    return attachment, normal, max(reach, 20.0)


def _draw_lesion(cfg: SynthConfig, subject: int, kind: str) -> _Lesion:
    """The subject's 3-D lesion (shape, place, intensity) for its class."""
    rng = _subject_rng(cfg, subject, _LESION)
    # Draw the shared numbers for every class, so each class sees the same stream layout.
    low, high = _LEVELS[kind]
    level = int(rng.integers(low, high + 1))
    radius = rng.uniform(8.0, 14.0) * cfg.lesion_size
    small_radius = rng.uniform(5.0, 9.0) * cfg.lesion_size
    harmonics = np.stack(
        [rng.uniform(0.0, 1.0, size=(3, 6)), rng.uniform(0.0, 2.0 * math.pi, size=(3, 6))], -1
    )
    u = rng.uniform(0.0, 1.0, size=8)
    if kind == "notumor":
        return _Lesion(kind, level, harmonics)
    if kind == "glioma":
        # Irregular outline: bumps of order 2..5, together up to ~45 % of the radius.
        harmonics[..., 0] *= np.array([0, 0, 0.18, 0.12, 0.08, 0.06])
        harmonics[2, :, 0] *= 1.6  # oedema spreads in fingers along white matter
        return _Lesion(
            kind,
            level,
            harmonics,
            centre=_hemisphere_site(rng, _geometry(level), radius),
            radius=radius,
            push=0.5,
            necrosis=0.35 + 0.25 * u[0] if u[1] < 0.75 else 0.0,
            oedema=1.5 + 0.7 * u[2],
            brightness=0.85 + 0.1 * u[3],
            texture=0.12,
        )
    if kind == "meningioma":
        harmonics[..., 0] *= np.array([0, 0, 0.05, 0.02, 0, 0])  # round, smooth
        attachment, normal, curvature = _surface_site(rng, _geometry(level))
        # The skull does not move, so the mass lies mostly inside the old brain outline, its
        # outer edge at the dura (the surface) or a little beyond, and pushes the brain in.
        out = -radius * (0.35 + 0.4 * u[0])
        return _Lesion(
            kind,
            level,
            harmonics,
            centre=(attachment[0] + out * normal[0], attachment[1] + out * normal[1]),
            radius=radius,
            push=0.95,
            brightness=0.82 + 0.1 * u[3],
            texture=0.015,
            normal=normal,
            attachment=attachment,
            curvature=curvature,
        )
    # pituitary: small, midline, in the sellar / suprasellar region of the inferior slices.
    harmonics[..., 0] *= np.array([0, 0, 0.06, 0.04, 0, 0])
    row = _SELLA_ROW[0] + (_SELLA_ROW[1] - _SELLA_ROW[0]) * u[4]
    return _Lesion(
        kind,
        level,
        harmonics,
        centre=(row, _MIDLINE_COL + 2.0 * u[5] - 1.0),
        radius=small_radius,
        push=0.8,
        necrosis=0.3 if u[6] < 0.3 else 0.0,  # a cystic centre
        brightness=0.72 + 0.12 * u[3],
        texture=0.03,
    )


def _outline(theta: np.ndarray, harmonics: np.ndarray) -> np.ndarray:
    """Radius multiplier 1 + sum_k a_k cos(k theta + phase_k) for the bumps that are on."""
    out = np.ones_like(theta)
    for k, (amp, phase) in enumerate(harmonics):
        if amp > 0:
            out += amp * np.cos(k * theta + phase)
    return out


def _edge(distance: np.ndarray, width: float) -> np.ndarray:
    """1 inside (distance < 0), 0 outside, a linear ramp ``width`` pixels wide between."""
    return np.clip(0.5 - distance / width, 0.0, 1.0)


def _push(coords: np.ndarray, lesion: _Lesion, radius: float) -> np.ndarray:
    """Mass effect: clear tissue out of a disc around the lesion centre, pushing it outward.

    Output pixel at distance d from the centre shows the tissue from distance d' with
    d'^2 = d^2 - (k r)^2 t(d), t = 1 inside the displaced disc (radius k r) falling to 0 at
    2.5 r. As t never increases, d' grows with d: tissue is moved, never folded, and nothing
    beyond 2.5 r moves (the effect stays local). k = ``lesion.push``: about 1 for a mass that
    displaces (meningioma), less for one that infiltrates (glioma).
    """
    cleared, reach = lesion.push * radius, 2.5 * radius
    offset = coords - np.array(lesion.centre, dtype=np.float32)[:, None, None]
    d2 = offset[0] ** 2 + offset[1] ** 2
    taper = np.clip((reach - np.sqrt(d2)) / (reach - cleared), 0.0, 1.0) ** 2
    shrink = np.sqrt(np.clip(d2 - cleared**2 * taper, 0.0, None) / np.maximum(d2, 1e-6))
    return coords - offset * (1.0 - shrink)


def _paint(
    image: np.ndarray,
    coords: np.ndarray,
    pulled: np.ndarray,
    *,
    lesion: _Lesion,
    radius: float,
    fine: np.ndarray,
    contrast: float,
) -> np.ndarray:
    """Draw the lesion into ``image`` in place; returns its alpha (how much is tumour).

    Args:
        image: The slice (before contrast curve and bias), drawn into in place.
        coords: Template coordinates of each pixel before the mass effect, ``[2,H,W]``.
        pulled: The same after the mass effect (:func:`_push`), ``[2,H,W]``.
        lesion: The subject's lesion.
        radius: The lesion's radius in this slice (its 3-D radius cut at the slice's level).
        fine: Unit-variance fine texture of the slice, ``[H,W]``.
        contrast: Multiplier of the lesion's contrast (``lesion_contrast``).
    """
    offset = coords - np.array(lesion.centre, dtype=np.float32)[:, None, None]
    dist = np.hypot(offset[0], offset[1])
    alpha = np.zeros_like(image)
    reach = radius * (1.3 + 1.8 * max(lesion.oedema, 1.0))
    box = np.nonzero(dist < reach)
    if box[0].size == 0:
        return alpha
    # Work on the bounding box of the lesion's reach only (speed).
    win = (slice(box[0].min(), box[0].max() + 1), slice(box[1].min(), box[1].max() + 1))
    d, img, tex = dist[win], image[win], fine[win]
    theta = np.arctan2(offset[0][win], offset[1][win])
    boundary = d - radius * _outline(theta, lesion.harmonics[0])
    if lesion.kind == "glioma":
        boundary += 1.2 * tex  # infiltrative, ragged margin
    mass = _edge(boundary, 1.5)
    target = lesion.brightness + lesion.texture * tex
    if lesion.kind == "glioma":
        # Oedema: T1-dark, fading out with distance; only where there is tissue.
        ratio = d / (radius * lesion.oedema * _outline(theta, lesion.harmonics[2]))
        img *= 1.0 - min(contrast, 2.0) * 0.45 * np.clip(1.0 - ratio, 0.0, 1.0) ** 0.5
        # Heterogeneous enhancement: brightest in a rim, darker in the middle.
        rim = np.clip(d / radius, 0.0, 1.0)
        target = target - 0.15 * (1.0 - rim) + 0.05 * tex * tex
    if lesion.necrosis > 0:
        core_edge = radius * lesion.necrosis * _outline(theta, lesion.harmonics[1])
        core = _edge(d - core_edge, 1.5)
        target = target * (1.0 - core) + (0.22 + 0.04 * tex) * core
    if lesion.kind == "meningioma":
        # Dural tail: a thin bright strip along the (displaced) brain surface either side.
        rel = pulled[(slice(None), *win)] - np.array(lesion.attachment, np.float32)[:, None, None]
        along = rel[0] * -lesion.normal[1] + rel[1] * lesion.normal[0]
        across = rel[0] * lesion.normal[0] + rel[1] * lesion.normal[1]
        across = across + along**2 / (2.0 * lesion.curvature)  # follow the surface's curve
        tail = np.exp(-((across / 1.2) ** 2)) * np.clip(1.0 - np.abs(along) / (1.8 * radius), 0, 1)
        mass = np.maximum(mass, 0.7 * tail * (np.abs(along) > 0.5 * radius))
    img += np.clip(contrast * mass, 0.0, None) * (target - img)
    np.clip(img, 0.0, None, out=img)
    alpha[win] = mass
    return alpha


def synth_items(cfg: SynthConfig) -> list[SourceItem]:
    """List the synthetic samples (no pixels made).

    Subjects (groups of ``slices_per_subject`` consecutive indices) get classes from a seeded
    shuffle of ``subject % len(classes)``, so classes are balanced (exactly when ``n`` is a
    multiple of ``slices_per_subject * len(classes)``, else within ``slices_per_subject``) and
    every slice of a subject has its subject's class.

    Args:
        cfg: The synthetic data set's settings.

    Returns:
        ``cfg.n`` items, ``rel_path`` ``synth/000000`` onwards, label = class index.
    """
    cfg.check()
    labels = _subject_labels(cfg)
    return [
        SourceItem(
            source="synth",
            path="",
            rel_path=f"synth/{i:06d}",
            label=int(labels[i // cfg.slices_per_subject]),
            synth_index=i,
        )
        for i in range(cfg.n)
    ]


def _subject_labels(cfg: SynthConfig) -> np.ndarray:
    """Each subject's class: per-class slice counts differ by at most ``slices_per_subject``."""
    subjects = -(-cfg.n // cfg.slices_per_subject)
    rng = _subject_rng(cfg, 0, _LABELS)
    # Round robin leaves the last (possibly partial) subject in a class that has one subject
    # more than the classes after it, so a partial subject never widens the gap. Shuffle the
    # other subjects, then rename the classes at random.
    labels = np.arange(subjects) % len(cfg.classes)
    labels[:-1] = rng.permutation(labels[:-1])
    return rng.permutation(len(cfg.classes))[labels]


def render_synth(cfg: SynthConfig, index: int, label: int, lesion: bool = True) -> SynthRender:
    """Render sample ``index`` of class ``cfg.classes[label]``.

    Args:
        cfg: The synthetic data set's settings.
        index: Sample index (its subject is ``index // cfg.slices_per_subject``).
        label: Class index into ``cfg.classes``.
        lesion: False renders the same subject, slice, deformation and noise without the
            lesion and its mass effect (for tests and figures).

    Returns:
        The image and its lesion mask, level and class name.
    """
    if not 0 <= label < len(cfg.classes):
        raise ValueError(f"synth: label {label} is not an index into classes {cfg.classes}")
    kind = cfg.classes[label]
    subject = index // cfg.slices_per_subject
    volume = _template()
    shape = (volume.shape[1], volume.shape[2])
    anatomy = _draw_anatomy(cfg, subject, shape)
    tumour = _draw_lesion(cfg, subject, kind)
    rng = np.random.default_rng([cfg.seed, index])
    # The slice's level: near the subject's, and through the lesion (|dz| <= 0.4 R keeps the
    # cut at least 92 % of the 3-D radius).
    reach = min(0.4 * tumour.radius, 4.0) if tumour.radius > 0 else 4.0
    dz = round(float(rng.uniform(-1.0, 1.0)) * reach)
    level = int(np.clip(tumour.level + dz, 0, volume.shape[0] - 1))
    radius = math.sqrt(max(tumour.radius**2 - dz**2, 0.0))
    fine = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 0.8)
    fine *= 1.0 / max(float(fine.std()), 1e-6)  # unit variance, ~2 px grain
    noise = rng.standard_normal((2, *shape), dtype=np.float32)

    grid = _grid(shape)
    centre = np.array([(shape[0] - 1) / 2, (shape[1] - 1) / 2], dtype=np.float32)[:, None, None]
    offset = (grid - centre).reshape(2, -1)
    coords = (anatomy.matrix @ offset).reshape(2, *shape) + centre
    coords += anatomy.shift[:, None, None] + anatomy.elastic
    painted = lesion and tumour.radius > 0
    pulled = _push(coords, tumour, radius) if painted and radius > 0 else coords
    image = ndimage.map_coordinates(
        volume[level], pulled, order=1, mode="constant", cval=0.0, output=np.float32
    )
    # Noise sigma from the lesion-free slice, so a lesion does not change the noise elsewhere.
    sigma = cfg.noise * float(image.max()) ** anatomy.gamma * float(anatomy.bias.max())
    mask = np.zeros(shape, dtype=bool)
    if painted and radius > 0:
        alpha = _paint(
            image,
            coords,
            pulled,
            lesion=tumour,
            radius=radius,
            fine=fine,
            contrast=cfg.lesion_contrast,
        )
        mask = alpha > 0.5
    image = np.power(image, anatomy.gamma, dtype=np.float32) * anatomy.bias
    image = np.hypot(image + sigma * noise[0], sigma * noise[1]).astype(np.float32)
    return SynthRender(image=image, lesion_mask=mask, level=level, kind=kind)


def load_synth_item(item: SourceItem, cfg: SynthConfig) -> list[Slice]:
    """Render one synthetic sample.

    Args:
        item: An item from :func:`synth_items` with the same ``cfg``.
        cfg: The synthetic data set's settings.

    Returns:
        Exactly one :class:`Slice`: the float32 image, ``index=None``, the subject as patient.
    """
    if item.synth_index is None or item.label is None:
        raise ValueError(f"synth: item {item.rel_path} has no synth_index or label")
    render = render_synth(cfg, item.synth_index, item.label)
    subject = item.synth_index // cfg.slices_per_subject
    return [Slice(image=render.image, index=None, patient=f"synth-subject-{subject}")]
