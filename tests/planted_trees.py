"""Input trees of every source with identifiers planted everywhere a PACS export puts them.

A patient name (``DOE_JANE`` / ``DOE^JANE``), a record number (``MRN12345``) and a birth date
(``19700101``) go into the input folder's own name, sub-folder names, file names and the
files' headers (JPEG comment, PNG text chunk, figshare ``PID``, NIfTI ``descrip``/``aux_file``,
DICOM PatientName/PatientID/PatientBirthDate), and into the inputs that get quarantined or
skipped (whose reasons would name them). :data:`TOKENS` must appear in no output byte: not
in shards, manifest, index, config, journal, logs or reports (see ``tests/test_privacy.py``).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from input_trees import (
    _matlab_dataset,
    _matlab_header,
    brain_image,
    brain_volume,
    write_dicom_file,
)
from PIL import Image
from PIL.PngImagePlugin import PngInfo

__all__ = ["PLANTED_SOURCES", "TOKENS", "Planted", "make_planted_tree"]

NAME, CARET, MRN, DOB = "DOE_JANE", "DOE^JANE", "MRN12345", "19700101"
# Searched lower-cased: 8 characters each, so random pixel bytes never match by chance.
TOKENS = ("doe_jane", "doe^jane", "mrn12345", "19700101")
PLANTED_SOURCES = ("kaggle", "folder", "figshare", "nifti", "dicom")
# Three patients, so that every split can be filled; the first is the planted one.
_PATIENTS = ((NAME, MRN), ("ROE_RICHARD", "MRN22222"), ("POE_EDGAR", "MRN33333"))
_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


@dataclass
class Planted:
    """A planted tree: its root (named after the patient) and its expected odd entries.

    Attributes:
        root: The input folder; its own name holds the name, record number and birth date.
        source: The reader to ingest it with.
        quarantined: How many entries must end quarantined (each named with identifiers).
        skipped: How many entries must end skipped (each named with identifiers).
    """

    root: Path
    source: str
    quarantined: int
    skipped: int


def _image(rng: np.random.Generator, cls: str) -> Image.Image:
    return Image.fromarray(brain_image(96, 80, cls, rng).astype(np.uint8))


def _kaggle(root: Path, rng: np.random.Generator) -> tuple[int, int]:
    comment = f"{CARET} {MRN} {DOB}".encode()
    for split, count in (("Training", 3), ("Testing", 1)):
        for cls in _CLASSES:
            folder = root / split / cls / f"{NAME}_{MRN}"
            folder.mkdir(parents=True)
            for i in range(count):
                path = folder / f"{DOB}_{NAME}_{cls}_{i}.jpg"
                _image(rng, cls).save(path, "JPEG", comment=comment)
    bad = root / "Training" / "glioma" / f"{NAME}_{MRN}"
    (bad / f"{MRN}_empty.jpg").write_bytes(b"")
    (bad / f"{NAME}_{DOB}_text.jpg").write_text(f"{CARET} is not an image\n")
    buf = io.BytesIO()
    _image(rng, "glioma").save(buf, "JPEG")
    (bad / f"{MRN}_{DOB}_cut.jpg").write_bytes(buf.getvalue()[:300])
    (bad / f"{NAME}_notes.txt").write_text(f"{CARET} {MRN}\n")
    _image(rng, "glioma").save(bad / f"{MRN}_{DOB}.bmp")
    return 3, 2


def _folder(root: Path, rng: np.random.Generator) -> tuple[int, int]:
    info = PngInfo()
    info.add_text("Patient", f"{CARET} {MRN} {DOB}")
    for cls in ("glioma", "notumor"):
        folder = root / cls / f"{NAME}_{MRN}"
        folder.mkdir(parents=True)
        for i in range(4):
            _image(rng, cls).save(folder / f"scan_{DOB}_{i}.png", pnginfo=info)
    (root / "glioma" / f"{NAME}_{MRN}" / f"{DOB}_empty.png").write_bytes(b"")
    _image(rng, "glioma").save(root / "glioma" / f"{NAME}_{DOB}.webp")
    return 1, 1


def _write_mat(path: Path, rng: np.random.Generator, code: int, pid: str) -> None:
    names = {1: "meningioma", 2: "glioma", 3: "pituitary"}
    image = (brain_image(96, 80, names[code], rng) * 4).astype(np.int16)
    with h5py.File(path, "w", userblock_size=512) as f:
        cj = f.create_group("cjdata")
        cj.attrs["MATLAB_class"] = np.bytes_("struct")
        _matlab_dataset(cj, "image", image, "int16")
        _matlab_dataset(cj, "label", np.array([[float(code)]]), "double")
        _matlab_dataset(cj, "PID", np.array([[ord(c) for c in pid]], np.uint16), "char")
    _matlab_header(path)


def _figshare(root: Path, rng: np.random.Generator) -> tuple[int, int]:
    for name, mrn in _PATIENTS:
        folder = root / f"{name}_{mrn}"
        folder.mkdir(parents=True)
        for k in range(3):
            _write_mat(folder / f"{DOB}_{mrn}_{k}.mat", rng, k + 1, mrn)
    (root / f"{NAME}_{MRN}" / f"{NAME}_broken.mat").write_bytes(f"{CARET} {MRN}".encode() * 9)
    (root / f"{NAME}_{MRN}" / f"{MRN}.mat.txt").write_text(CARET)
    return 1, 1


def _nifti(root: Path, rng: np.random.Generator) -> tuple[int, int]:
    rows = []
    for p, (name, mrn) in enumerate(_PATIENTS):
        rel = f"{name}_{mrn}/{DOB}_{mrn}_T1w.nii.gz"
        (root / rel).parent.mkdir(parents=True)
        img = nib.Nifti1Image(brain_volume((40, 48, 32), _CLASSES[p], rng), np.eye(4))
        img.header["descrip"] = f"{CARET} {DOB}".encode()
        img.header["aux_file"] = MRN.encode()
        nib.save(img, str(root / rel))
        rows.append([rel, _CLASSES[p], mrn])
    broken = f"{NAME}_{MRN}/{MRN}_{DOB}_broken.nii.gz"
    (root / broken).write_bytes(b"\x1f\x8b" + f"{CARET} {MRN}".encode() * 20)
    rows.append([broken, "glioma", MRN])
    (root / f"{NAME}_{MRN}" / f"{NAME}_report.pdf").write_bytes(b"%PDF " + MRN.encode())
    with (root / "labels.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["file", "label", "patient"], *rows])
    return 1, 2  # the labels table is skipped too


def _dicom(root: Path, rng: np.random.Generator) -> tuple[int, int]:
    rows = []
    for p, (name, mrn) in enumerate(_PATIENTS):
        rel = f"{name}_{mrn}/series_{DOB}"
        for n in range(4):
            pixels = np.full((48, 40), 20, dtype=np.float32)
            pixels[8:40, 8:32] = 300 + 100 * n + rng.normal(0, 5, size=(32, 24))
            write_dicom_file(
                root / rel / f"IM_{name}_{n:04d}.dcm",
                pixels,
                instance=n + 1,
                position_z=5.0 * n,
                patient_name=name.replace("_", "^"),
                patient_id=mrn,
                extra={"PatientBirthDate": DOB},
            )
        rows.append([rel, _CLASSES[p]])
    series = root / f"{NAME}_{MRN}" / f"series_{DOB}"
    (series / f"{MRN}_0009.dcm").write_bytes(b"")
    (series / f"{NAME}_notes.txt").write_text(f"{CARET} {MRN} {DOB}\n")
    with (root / "labels.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["series", "label"], *rows])
    return 1, 2  # the labels table is skipped too


def make_planted_tree(parent: Path, source: str, seed: int = 0) -> Planted:
    """Write a small tree of ``source`` under ``parent`` with identifiers planted everywhere.

    Args:
        parent: Folder to create the input folder in (itself free of identifiers).
        source: One of :data:`PLANTED_SOURCES`.
        seed: Seed of the image content.

    Returns:
        The :class:`Planted` tree.
    """
    root = Path(parent) / f"{NAME}_{MRN}_{DOB}_export"
    root.mkdir(parents=True)
    builder = {
        "kaggle": _kaggle,
        "folder": _folder,
        "figshare": _figshare,
        "nifti": _nifti,
        "dicom": _dicom,
    }[source]
    quarantined, skipped = builder(root, np.random.default_rng(seed))
    return Planted(root, source, quarantined, skipped)
