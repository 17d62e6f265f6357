"""Builders of small real input trees in every source format (plain functions, no pytest).

Each builder writes real files with the format's own library (PIL, h5py, nibabel, pydicom)
under a folder it is given, and returns what a test needs to check the readers and ingest:
labels, expected quarantine reasons, patient ids, and the header values that must never reach
any output. Everything is tiny (images <= 300 px, volumes <= 64^3) so tests stay fast.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy import ndimage

__all__ = [
    "KAGGLE_CLASSES",
    "FigshareRecord",
    "VolumeSet",
    "add_bad_images",
    "brain_image",
    "brain_volume",
    "make_dicom_series",
    "make_figshare_files",
    "make_folder_tree",
    "make_kaggle_tree",
    "make_nifti_set",
    "write_dicom_file",
]

KAGGLE_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
_SIZES = ((200, 180), (256, 256), (240, 300))  # (height, width)


@dataclass
class FigshareRecord:
    """What a fixture .mat file holds: MATLAB label code, patient id, image as MATLAB sees it."""

    label_code: int
    pid: str
    image: np.ndarray


@dataclass
class VolumeSet:
    """A NIfTI or DICOM fixture tree.

    Attributes:
        labels: rel_path -> class name, for every labelled input (bad ones included).
        patients: rel_path -> patient id the reader should report.
        bad: rel_path -> quarantine reason slug, for the inputs that must be quarantined.
        headers: Header field -> value written into the files; none may appear in any output.
    """

    labels: dict[str, str] = field(default_factory=dict)
    patients: dict[str, str] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def _ellipse(
    shape: tuple[int, int],
    center: tuple[float, float],
    radii: tuple[float, float],
    angle: float = 0.0,
) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    y, x = yy - center[0], xx - center[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * y + s * x, -s * y + c * x
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 <= 1.0


def brain_image(height: int, width: int, class_name: str, rng: np.random.Generator) -> np.ndarray:
    """A brain-like 2-D image in [0, 255]: bright textured ellipse, skull rim, class lesion.

    Lesions: glioma an irregular blob in a hemisphere, meningioma a round mass at the edge,
    pituitary a small midline blob low in the head, notumor none. Random size, position,
    rotation and texture keep images of one class from being (near) duplicates.
    """
    shape = (height, width)
    cy = height / 2 + rng.uniform(-0.1, 0.1) * height
    cx = width / 2 + rng.uniform(-0.1, 0.1) * width
    ry, rx = height * rng.uniform(0.26, 0.42), width * rng.uniform(0.24, 0.4)
    angle = rng.uniform(-0.5, 0.5)
    head = _ellipse(shape, (cy, cx), (ry, rx), angle)
    inner = _ellipse(shape, (cy, cx), (ry * 0.9, rx * 0.9), angle)
    # Coarse random texture: it dominates the low frequencies a perceptual hash looks at, so
    # two fixture images are never near duplicates by accident.
    texture = ndimage.gaussian_filter(rng.normal(size=shape), min(shape) / 10)
    texture /= np.abs(texture).max() + 1e-9
    img = rng.uniform(0, 12, size=shape)
    img[head] = 170
    img[inner] = 100 + 70 * texture[inner]
    lesion = np.zeros(shape, dtype=bool)
    if class_name == "glioma":
        side = rng.choice([-1, 1])
        for _ in range(3):
            c = (cy + rng.uniform(-0.3, 0.3) * ry, cx + side * rng.uniform(0.2, 0.5) * rx)
            lesion |= _ellipse(shape, c, (ry * rng.uniform(0.1, 0.2), rx * rng.uniform(0.1, 0.2)))
    elif class_name == "meningioma":
        theta = rng.uniform(0, 2 * np.pi)
        c = (cy + 0.75 * ry * np.sin(theta), cx + 0.75 * rx * np.cos(theta))
        lesion = _ellipse(shape, c, (ry * 0.18, ry * 0.18)) & inner
    elif class_name == "pituitary":
        c = (cy + 0.35 * ry, cx + rng.uniform(-0.03, 0.03) * rx)
        lesion = _ellipse(shape, c, (ry * 0.09, rx * 0.11))
    img[lesion] = 225
    img += rng.normal(0, 3, size=shape)
    return np.clip(img, 0, 255)


def _save_jpeg(path: Path, pixels: np.ndarray, mode: str) -> None:
    gray = Image.fromarray(pixels.astype(np.uint8), mode="L")
    image = gray if mode == "L" else gray.convert("RGB")
    image.save(path, format="JPEG", quality=92)


def make_kaggle_tree(root: Path, per_class: int = 3, seed: int = 0) -> dict[str, str]:
    """Write a Kaggle-layout tree: ``Training/<class>/`` and ``Testing/<class>/`` JPEGs.

    Sizes cycle through 180x200, 256x256 and 300x240 (width x height), modes alternate L and
    RGB. ``Testing/`` gets ``max(1, per_class // 2)`` images per class.

    Returns:
        rel_path (forward slashes) -> class name, for every image written.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    written: dict[str, str] = {}
    counter = 0
    for split, count in (("Training", per_class), ("Testing", max(1, per_class // 2))):
        for name in KAGGLE_CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = _SIZES[counter % len(_SIZES)]
                mode = "L" if counter % 2 == 0 else "RGB"
                counter += 1
                file = folder / f"{split[:2]}_{name[:2]}_{i:04d}.jpg"
                _save_jpeg(file, brain_image(h, w, name, rng), mode)
                written[file.relative_to(root).as_posix()] = name
    return written


def add_bad_images(class_dir: Path) -> dict[str, str]:
    """Add one bad input of each kind to a class folder.

    Returns:
        file name -> the quarantine reason slug it must get (``too_small`` and ``blank`` are
        found by ``preprocess.check_slice``, after the reader returned the pixels).
    """
    class_dir = Path(class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(123)
    (class_dir / "bad_empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(brain_image(200, 180, "glioma", rng).astype(np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    (class_dir / "bad_truncated.jpg").write_bytes(data[: len(data) // 2])
    (class_dir / "bad_text.jpg").write_text("this is not an image\n" * 20)
    tiny = brain_image(20, 20, "notumor", rng).astype(np.uint8)
    Image.fromarray(tiny).save(class_dir / "bad_tiny.jpg", "JPEG")
    Image.new("L", (128, 128), 0).save(class_dir / "bad_black.jpg", "JPEG")
    return {
        "bad_empty.jpg": "empty_file",
        "bad_truncated.jpg": "truncated",
        "bad_text.jpg": "not_an_image",
        "bad_tiny.jpg": "too_small",
        "bad_black.jpg": "blank",
    }


def make_folder_tree(root: Path, seed: int = 0) -> dict[str, str]:
    """Write a class-per-folder tree mixing 8-bit PNG, 16-bit PNG, JPEG and 16-bit TIFF.

    16-bit files hold values up to about 4000 so a reader that drops to 8 bits is caught.

    Returns:
        rel_path -> class name.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    plan = [
        ("glioma/scan_a.png", "glioma", "png8"),
        ("glioma/site1/scan_b.png", "glioma", "png16"),
        ("glioma/site1/scan_c.jpg", "glioma", "jpeg"),
        ("meningioma/scan_d.tif", "meningioma", "tiff16"),
        ("meningioma/scan_e.JPEG", "meningioma", "jpeg"),
        ("notumor/deep/er/scan_f.tiff", "notumor", "tiff16"),
        ("notumor/scan_g.png", "notumor", "png16"),
    ]
    written: dict[str, str] = {}
    for i, (rel, name, kind) in enumerate(plan):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        h, w = _SIZES[i % len(_SIZES)]
        pixels = brain_image(h // 2, w // 2, name, rng)
        if kind.endswith("16"):
            image = Image.fromarray((pixels * 16).astype(np.uint16))
            image.save(path, format="PNG" if kind == "png16" else "TIFF")
        elif kind == "png8":
            Image.fromarray(pixels.astype(np.uint8)).save(path, format="PNG")
        else:
            _save_jpeg(path, pixels, "RGB")
        written[rel] = name
    return written


def _matlab_header(path: Path) -> None:
    """Write the 128-byte MATLAB 7.3 text header into the file's 512-byte HDF5 user block."""
    text = (
        b"MATLAB 7.3 MAT-file, Platform: GLNXA64, "
        b"Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    )
    header = text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    with path.open("r+b") as fh:
        fh.write(header)


def _matlab_dataset(group: h5py.Group, name: str, value: np.ndarray, matlab_class: str) -> None:
    # MATLAB is column-major: HDF5 holds the transpose of every matrix.
    ds = group.create_dataset(name, data=np.asarray(value).T)
    ds.attrs["MATLAB_class"] = np.bytes_(matlab_class)
    if matlab_class == "char":
        ds.attrs["MATLAB_int_decode"] = np.int32(2)


def make_figshare_files(root: Path, n: int = 6, seed: int = 0) -> dict[str, FigshareRecord]:
    """Write ``n`` Cheng et al.-style MATLAB v7.3 .mat files (HDF5) in nested folders.

    Files cycle over 3 patients, each with one tumour type (label code 1, 2, 3). Images are
    96 rows x 80 columns int16 (non-square) with a bright marker in the top-left corner, so a
    reader that forgets MATLAB's transpose is caught.

    Returns:
        rel_path -> :class:`FigshareRecord` (the image as MATLAB shows it, rows x columns).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    pids = ("100360", "112649", "MR040237")
    names = {1: "meningioma", 2: "glioma", 3: "pituitary"}
    written: dict[str, FigshareRecord] = {}
    for k in range(n):
        folder = root / ("brainTumorDataPublic_1" if k < n / 2 else "brainTumorDataPublic_2")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{k + 1}.mat"
        code = k % 3 + 1
        image = (brain_image(96, 80, names[code], rng) * 4).astype(np.int16)
        image[4:12, 4:24] = 1500  # asymmetric marker: top-left, wider than tall
        mask = (image > 800).astype(np.uint8)
        with h5py.File(path, "w", userblock_size=512) as f:
            cj = f.create_group("cjdata")
            cj.attrs["MATLAB_class"] = np.bytes_("struct")
            _matlab_dataset(cj, "image", image, "int16")
            _matlab_dataset(cj, "label", np.array([[float(code)]]), "double")
            pid = pids[k % 3]
            _matlab_dataset(cj, "PID", np.array([[ord(c) for c in pid]], np.uint16), "char")
            _matlab_dataset(cj, "tumorMask", mask, "logical")
            _matlab_dataset(cj, "tumorBorder", np.array([[10.0, 12.0, 14.0, 16.0]]), "double")
        _matlab_header(path)
        written[path.relative_to(root).as_posix()] = FigshareRecord(code, pid, image)
    return written


def brain_volume(
    shape: tuple[int, int, int], class_name: str, rng: np.random.Generator
) -> np.ndarray:
    """A brain-like RAS volume: an ellipsoid over the middle slices, a bright anterior marker.

    The ellipsoid spans about 60% of the last (superior) axis so some slices hold no brain;
    the marker sits at high y (anterior), so orientation mistakes are visible.
    """
    nx, ny, nz = shape
    x, y, z = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    c = (nx / 2, ny / 2, nz / 2)
    r = (nx * 0.38, ny * 0.4, nz * 0.3)
    inside = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1
    vol = rng.normal(5, 2, size=shape).astype(np.float32)
    vol[inside] = 400 + rng.normal(0, 20, size=int(inside.sum()))
    marker = inside & (y > c[1] + r[1] * 0.6) & (np.abs(x - c[0]) < 3)
    vol[marker] = 900
    if class_name != "notumor":
        off = {"glioma": (-0.4, 0.0), "meningioma": (0.6, -0.2), "pituitary": (0.0, -0.5)}
        dx, dy = off.get(class_name, (0.3, 0.3))
        blob = ((x - c[0] - dx * r[0]) ** 2 + (y - c[1] - dy * r[1]) ** 2) <= (nx * 0.08) ** 2
        vol[blob & inside] = 700
    return vol


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, headers: dict[str, str]) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header["descrip"] = headers["descrip"].encode()
    img.header["aux_file"] = headers["aux_file"].encode()
    nib.save(img, str(path))


def make_nifti_set(root: Path, seed: int = 0) -> VolumeSet:
    """Write NIfTI volumes (40x48x32) plus ``labels.csv`` (file,label,patient,slices).

    Volumes: two .nii.gz (one stored with flipped x/y axes and affine, so only canonical
    reordering gives the same view), one plain .nii with listed slices, and bad ones: 4-D,
    NaNs, and a truncated .nii.gz. Two volumes share patient P01.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    shape = (40, 48, 32)
    headers = {"descrip": "Doe^Jane 19700101 scan", "aux_file": "PAT-12345"}
    ras = np.diag([1.5, 1.5, 2.0, 1.0])
    flipped = np.diag([-1.5, -1.5, 2.0, 1.0])
    flipped[:3, 3] = [1.5 * (shape[0] - 1), 1.5 * (shape[1] - 1), 0]
    out = VolumeSet(headers=dict(headers))
    rows: list[tuple[str, str, str, str]] = []

    def add(rel: str, label: str, patient: str, slices: str = "", bad: str | None = None) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        rows.append((rel, label, patient, slices))
        out.labels[rel] = label
        out.patients[rel] = patient
        if bad:
            out.bad[rel] = bad

    add("sub-01/anat/sub-01_T1w.nii.gz", "glioma", "P01")
    _save_nifti(root / rows[-1][0], brain_volume(shape, "glioma", rng), ras, headers)
    add("sub-02/anat/sub-02_T1w.nii.gz", "notumor", "P01")
    data = brain_volume(shape, "notumor", rng)[::-1, ::-1, :]
    _save_nifti(root / rows[-1][0], np.ascontiguousarray(data), flipped, headers)
    add("sub-03.nii", "meningioma", "P02", "10;14;18")
    _save_nifti(root / rows[-1][0], brain_volume(shape, "meningioma", rng), ras, headers)
    add("bad/four_d.nii.gz", "pituitary", "P03", bad="not_3d")
    four_d = np.stack([brain_volume((16, 16, 16), "pituitary", rng)] * 3, axis=-1)
    _save_nifti(root / rows[-1][0], four_d, ras, headers)
    add("bad/with_nan.nii.gz", "pituitary", "P03", bad="non_finite")
    nan_vol = brain_volume(shape, "pituitary", rng)
    nan_vol[10:14, 10:14, 12:16] = np.nan
    _save_nifti(root / rows[-1][0], nan_vol, ras, headers)
    add("bad/corrupt.nii.gz", "glioma", "P04", bad="unreadable")
    _save_nifti(root / rows[-1][0], brain_volume(shape, "glioma", rng), ras, headers)
    raw = (root / rows[-1][0]).read_bytes()
    (root / rows[-1][0]).write_bytes(raw[: len(raw) // 2])
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label", "patient", "slices"])
        writer.writerows(rows)
    return out


def write_dicom_file(
    path: Path,
    pixels: np.ndarray,
    *,
    instance: int,
    position_z: float,
    patient_name: str = "Doe^Jane",
    patient_id: str = "PAT-12345",
    series_uid: str | None = None,
    slope: float = 1.0,
    intercept: float = 0.0,
    photometric: str = "MONOCHROME2",
    with_pixels: bool = True,
    extra: dict[str, str] | None = None,
) -> None:
    """Write one MR image instance (Explicit VR Little Endian, uint16 pixels) with pydicom.

    The slice is axial (ImageOrientationPatient 1,0,0,0,1,0) at z = ``position_z``.
    ``extra`` adds more text header fields (e.g. InstitutionName).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "MR"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, float(position_z)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 5.0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    arr = np.ascontiguousarray(pixels, dtype=np.uint16)
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if with_pixels:
        ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _series(
    folder: Path,
    count: int,
    rng: np.random.Generator,
    names: Sequence[str],
    missing_pixels_at: int | None = None,
    **fields: object,
) -> None:
    """Write ``count`` slices whose centre brightness grows with z; file names out of order."""
    uid = generate_uid()
    order = rng.permutation(count)
    for n in range(count):
        pixels = np.full((48, 40), 20, dtype=np.float32)
        disk = _ellipse((48, 40), (24, 20), (18, 15))
        pixels[disk] = 300 + 100 * n + rng.normal(0, 5, size=int(disk.sum()))
        write_dicom_file(
            folder / names[int(order[n])],
            pixels,
            instance=n + 1,
            position_z=-20.0 + 5.0 * n,
            series_uid=uid,
            with_pixels=n != missing_pixels_at,
            **fields,  # type: ignore[arg-type]
        )


def make_dicom_series(root: Path, seed: int = 0) -> VolumeSet:
    """Write three DICOM series folders plus ``labels.csv`` (series,label).

    ``PAT-A/series1``: 5 slices and a stray text file (skipped); ``PAT-B/series2``: 4 slices
    with RescaleSlope 2, RescaleIntercept -100, another patient; ``PAT-A/series3``: 3 slices,
    one without PixelData (quarantined ``no_pixel_data``). Slice ``n`` along z has centre
    value ``300 + 100 n`` (before rescale); file names do not follow the slice order.

    Returns:
        The set; ``headers`` holds every identifying value written (names, ids, dates, ...).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    extra = {
        "PatientBirthDate": "19700101",
        "InstitutionName": "Springfield General Hospital",
        "ReferringPhysicianName": "House^Gregory",
        "AccessionNumber": "ACC778899",
        "StudyDate": "20240315",
    }
    names = [f"IM{i:04d}.dcm" for i in range(8)]
    s1, s2, s3 = "PAT-A/series1", "PAT-B/series2", "PAT-A/series3"
    _series(root / s1, 5, rng, names, extra=extra)
    (root / s1 / "notes.txt").write_text("scanner notes, not DICOM\n")
    _series(
        root / s2,
        4,
        rng,
        names,
        patient_name="Roe^John",
        patient_id="PAT-67890",
        slope=2.0,
        intercept=-100.0,
        extra=extra,
    )
    _series(root / s3, 3, rng, names, missing_pixels_at=1, extra=extra)
    out = VolumeSet(
        labels={s1: "glioma", s2: "meningioma", s3: "notumor"},
        patients={s1: "PAT-12345", s2: "PAT-67890", s3: "PAT-12345"},
        bad={s3: "no_pixel_data"},
        headers={
            "PatientName": "Doe^Jane",
            "PatientID": "PAT-12345",
            "PatientName2": "Roe^John",
            "PatientID2": "PAT-67890",
            **extra,
        },
    )
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["series", "label"])
        writer.writerows(sorted(out.labels.items()))
    return out
