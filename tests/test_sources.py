"""Source readers against real files of every format (built by tests/input_trees.py)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import input_trees as fx
import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from shards.preprocess import check_slice
from shards.sources import (
    QuarantineError,
    SourceError,
    dicom,
    figshare,
    folder,
    kaggle,
    nifti,
    read_dicom_series,
    read_image_file,
    read_nifti_volume,
    reader_for,
    select_slices,
)

CLASSES = list(fx.KAGGLE_CLASSES)


def slug(exc: QuarantineError) -> str:
    """The reason's machine part, checking the ``slug: detail`` shape on the way."""
    head, sep, detail = exc.reason.partition(": ")
    assert sep and detail, exc.reason
    return head


def quarantine_slug(fn, *args) -> str:
    with pytest.raises(QuarantineError) as info:
        fn(*args)
    return slug(info.value)


# ---------------------------------------------------------------- kaggle and image files


def test_kaggle_lists_and_loads_every_image(tmp_path: Path) -> None:
    written = fx.make_kaggle_tree(tmp_path, per_class=3, seed=1)
    items = kaggle.list_items(tmp_path, CLASSES)
    assert [i.rel_path for i in items] == sorted(written)
    assert items == kaggle.list_items(tmp_path, CLASSES)  # deterministic
    shapes = set()
    for item in items:
        assert item.label == CLASSES.index(written[item.rel_path])
        assert item.split_hint == ("test" if item.rel_path.startswith("Testing/") else None)
        (piece,) = kaggle.load_item(item)
        assert piece.image.dtype == np.float32 and piece.image.ndim == 2
        with Image.open(item.path) as img:
            assert piece.image.shape == (img.height, img.width)
        shapes.add(piece.image.shape)
        check_slice(piece.image)  # good images pass the quality checks
    assert shapes == {(200, 180), (256, 256), (240, 300)}
    assert sum(i.split_hint == "test" for i in items) == 4


def test_bad_images_get_their_reason(tmp_path: Path) -> None:
    fx.make_kaggle_tree(tmp_path, per_class=1)
    expected = fx.add_bad_images(tmp_path / "Training" / "glioma")
    by_name = {Path(i.rel_path).name: i for i in kaggle.list_items(tmp_path, CLASSES)}
    for name, reason in expected.items():
        try:
            (piece,) = kaggle.load_item(by_name[name])
            check_slice(piece.image)  # readers return tiny and black images; QC catches them
        except QuarantineError as exc:
            assert slug(exc) == reason, (name, exc.reason)
        else:
            pytest.fail(f"{name} was not quarantined")


def test_image_modes_and_other_failures(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gray = fx.brain_image(64, 48, "glioma", rng).astype(np.uint8)
    base = Image.fromarray(gray)
    for mode in ("L", "RGB", "RGBA", "P", "CMYK", "1", "LA"):
        path = tmp_path / f"m_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        base.convert(mode).save(path)
        image = read_image_file(path)
        assert image.shape == (64, 48) and image.dtype == np.float32, mode
        if mode in ("L", "RGB", "RGBA", "LA"):
            np.testing.assert_allclose(image, gray, atol=1.0)
    wide = (gray.astype(np.uint16) * 200).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "w16.png")
    np.testing.assert_array_equal(read_image_file(tmp_path / "w16.png"), wide)
    png = (tmp_path / "m_L.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    assert quarantine_slug(read_image_file, tmp_path / "cut.png") == "truncated"
    (tmp_path / "dir.png").mkdir()
    assert quarantine_slug(read_image_file, tmp_path / "dir.png") == "unreadable"
    assert quarantine_slug(read_image_file, tmp_path / "missing.png") == "unreadable"


def test_unknown_class_folder_and_class_map(tmp_path: Path) -> None:
    written = fx.make_kaggle_tree(tmp_path, per_class=1)
    shutil.copytree(tmp_path / "Training" / "notumor", tmp_path / "Training" / "no_tumor")
    with pytest.raises(SourceError) as info:
        kaggle.list_items(tmp_path, CLASSES)
    message = str(info.value)
    assert "no_tumor" in message and all(name in message for name in CLASSES)
    items = kaggle.list_items(tmp_path, CLASSES, class_map={"no_tumor": "notumor"})
    mapped = [i for i in items if "/no_tumor/" in i.rel_path]
    assert len(mapped) == 1 and mapped[0].label == CLASSES.index("notumor")
    assert len(items) == len(written) + 1
    with pytest.raises(SourceError, match="tumour"):
        kaggle.list_items(tmp_path, CLASSES, class_map={"no_tumor": "tumour"})


def test_kaggle_without_training_folder(tmp_path: Path) -> None:
    (tmp_path / "Testing" / "glioma").mkdir(parents=True)
    with pytest.raises(SourceError, match="Training"):
        kaggle.list_items(tmp_path, CLASSES)


# ---------------------------------------------------------------- folder


def test_folder_tree_formats_and_discovered_classes(tmp_path: Path) -> None:
    written = fx.make_folder_tree(tmp_path)
    found = sorted(set(written.values()))
    assert folder.class_names(tmp_path, []) == found
    items = folder.list_items(tmp_path, [])
    assert [i.rel_path for i in items] == sorted(written)
    for item in items:
        assert item.label == found.index(written[item.rel_path])
        (piece,) = folder.load_item(item)
        check_slice(piece.image)
        if item.rel_path.endswith((".tif", ".tiff")) or "scan_b" in item.rel_path:
            assert piece.image.max() > 255, "16-bit values must survive"
    with pytest.raises(SourceError, match="meningioma"):
        folder.list_items(tmp_path, ["glioma", "notumor"])
    mapped = folder.list_items(tmp_path, ["glioma", "notumor"], class_map={"meningioma": "glioma"})
    assert {i.label for i in mapped} == {0, 1} and len(mapped) == len(written)


# ---------------------------------------------------------------- figshare


def test_figshare_labels_pid_and_orientation(tmp_path: Path) -> None:
    records = fx.make_figshare_files(tmp_path, n=6)
    items = figshare.list_items(tmp_path, CLASSES)
    assert [i.rel_path for i in items] == sorted(records)
    assert items == figshare.list_items(tmp_path, CLASSES)
    code_to_class = {1: "meningioma", 2: "glioma", 3: "pituitary"}
    for item in items:
        assert item.label is None
        record = records[item.rel_path]
        (piece,) = figshare.load_item(item)
        assert piece.label == CLASSES.index(code_to_class[record.label_code])
        assert piece.patient == record.pid
        np.testing.assert_array_equal(piece.image, record.image.astype(np.float32))
        assert piece.image.shape == (96, 80)
        assert piece.image[4:12, 4:24].min() == 1500  # marker stays top-left
    assert len({records[i.rel_path].pid for i in items}) == 3


def test_figshare_bad_files_and_classes(tmp_path: Path) -> None:
    fx.make_figshare_files(tmp_path, n=3)
    (tmp_path / "old_v5.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 200)
    (tmp_path / "empty.mat").write_bytes(b"")
    by_name = {Path(i.rel_path).name: i for i in figshare.list_items(tmp_path, CLASSES)}
    assert quarantine_slug(figshare.load_item, by_name["old_v5.mat"]) == "unreadable"
    assert quarantine_slug(figshare.load_item, by_name["empty.mat"]) == "empty_file"
    with pytest.raises(SourceError, match="pituitary"):
        figshare.list_items(tmp_path, ["glioma", "meningioma", "notumor"])
    items = figshare.list_items(
        tmp_path,
        ["tumour_g", "tumour_m", "tumour_p"],
        class_map={"glioma": "tumour_g", "meningioma": "tumour_m", "pituitary": "tumour_p"},
    )
    labels = sorted(
        figshare.load_item(i)[0].label
        for i in items
        if i.rel_path.endswith(("1.mat", "2.mat", "3.mat"))
    )
    assert labels == [0, 1, 2]
    assert figshare.decode_matlab_string(np.array([[80], [49]], np.uint16)) == "P1"
    assert figshare.decode_matlab_string(np.array([0, 0], np.uint64)) is None


# ---------------------------------------------------------------- nifti


def test_nifti_volumes_slices_and_quarantine(tmp_path: Path) -> None:
    expected = fx.make_nifti_set(tmp_path)
    items = nifti.list_items(tmp_path, CLASSES)
    assert [i.rel_path for i in items] == sorted(expected.labels)
    assert items == nifti.list_items(tmp_path, CLASSES)
    for item in items:
        assert item.label == CLASSES.index(expected.labels[item.rel_path])
        if item.rel_path in expected.bad:
            got = quarantine_slug(nifti.load_item, item)
            assert got == expected.bad[item.rel_path], item.rel_path
            continue
        pieces = nifti.load_item(item)
        assert {p.patient for p in pieces} == {expected.patients[item.rel_path]}
        assert all(p.image.shape == (48, 40) for p in pieces)  # rows: y (A-P), cols: x
        indices = [p.index for p in pieces]
        if item.rel_path == "sub-03.nii":
            assert indices == [10, 14, 18]
        else:
            # The ellipsoid covers ~19 of 32 slices: 16 evenly spaced ones, ends included.
            assert len(indices) == 16 and indices == sorted(set(indices))
            assert 5 <= indices[0] <= 8 and 23 <= indices[-1] <= 26
        for p in pieces:
            check_slice(p.image)
        middle = pieces[len(pieces) // 2].image
        top, bottom = middle[:24], middle[24:]
        assert (top >= 900).sum() > 0 and (bottom >= 900).sum() == 0, "anterior must be up"


def test_nifti_canonical_orientation_matches_flipped_storage(tmp_path: Path) -> None:
    vol = fx.brain_volume((20, 24, 16), "glioma", np.random.default_rng(3))
    ras = np.diag([1.0, 1.0, 1.0, 1.0])
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = [19, 23, 0]
    nib.save(nib.Nifti1Image(vol, ras), str(tmp_path / "ras.nii.gz"))
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol[::-1, ::-1]), lps), str(tmp_path / "lps.nii"))
    a = read_nifti_volume(tmp_path / "ras.nii.gz")
    b = read_nifti_volume(tmp_path / "lps.nii")
    np.testing.assert_array_equal(a, b)
    # Radiological view: row 0 is the most anterior y, column 0 the patient's right (max x).
    np.testing.assert_array_equal(a[0, 0, :], vol[19, 23, :])
    np.testing.assert_array_equal(a[:, :, 5], vol[::-1, ::-1, 5].T)


def test_nifti_options_and_table_errors(tmp_path: Path) -> None:
    fx.make_nifti_set(tmp_path)
    items = nifti.list_items(tmp_path, CLASSES, max_slices_per_volume=4)
    first = next(i for i in items if i.rel_path.startswith("sub-01"))
    assert len(nifti.load_item(first)) == 4
    rows = list(csv.reader((tmp_path / "labels.csv").open()))
    table = tmp_path / "other.csv"
    with table.open("w", newline="") as fh:
        csv.writer(fh).writerows([rows[0], *rows[2:], ["gone.nii.gz", "glioma", "", ""]])
    with pytest.raises(SourceError) as info:
        nifti.list_items(tmp_path, CLASSES, labels_csv=table)
    assert "gone.nii.gz" in str(info.value) and rows[1][0] in str(info.value)
    with table.open("w", newline="") as fh:
        csv.writer(fh).writerows([rows[0], *rows[1:-1], [rows[-1][0], "astrocytoma", "", ""]])
    with pytest.raises(SourceError, match=r"astrocytoma.*glioma, meningioma, notumor"):
        nifti.list_items(tmp_path, CLASSES, labels_csv=table)
    with pytest.raises(SourceError, match="labels table not found"):
        nifti.list_items(tmp_path, CLASSES, labels_csv=tmp_path / "none.csv")


def test_labels_table_rows_of_another_width_name_their_line(tmp_path: Path) -> None:
    fx.make_nifti_set(tmp_path)
    rows = list(csv.reader((tmp_path / "labels.csv").open()))
    table = tmp_path / "other.csv"
    # an unquoted comma in a value would silently cut the row: a row with a spare cell
    with table.open("w", newline="") as fh:
        csv.writer(fh).writerows([*rows[:3], [*rows[3], "spare"], *rows[4:]])
    with pytest.raises(SourceError, match=r"other\.csv line 4: 5 cells but the header names 4"):
        nifti.list_items(tmp_path, CLASSES, labels_csv=table)
    with table.open("w", newline="") as fh:
        csv.writer(fh).writerows([*rows[:2], rows[2][:2], *rows[3:]])
    with pytest.raises(SourceError, match=r"other\.csv line 3: 2 cells but the header names 4"):
        nifti.list_items(tmp_path, CLASSES, labels_csv=table)
    table.write_bytes(b"file,label\nsub-03.nii,m\xe9ningioma\n")
    with pytest.raises(SourceError, match=r"other\.csv: not UTF-8"):
        nifti.list_items(tmp_path, CLASSES, labels_csv=table)


def test_select_slices() -> None:
    vol = np.zeros((8, 8, 30), np.float32)
    vol[2:6, 2:6, 5:25] = 1.0
    assert select_slices(vol, 0) == list(range(5, 25))
    picked = select_slices(vol, 5)
    # Evenly spaced over slices 5..24, both ends kept.
    assert len(picked) == 5 and picked[0] == 5 and picked[-1] == 24
    assert set(np.diff(picked)) <= {4, 5}
    assert select_slices(vol, 5, listed=[7, 3, 7]) == [3, 7]
    with pytest.raises(QuarantineError, match="bad_slice_index"):
        select_slices(vol, 5, listed=[30])
    assert select_slices(np.zeros((8, 8, 4)), 5) == []


# ---------------------------------------------------------------- dicom


def test_dicom_series_order_rescale_and_patient(tmp_path: Path) -> None:
    expected = fx.make_dicom_series(tmp_path)
    items = dicom.list_items(tmp_path, CLASSES)
    assert [i.rel_path for i in items] == sorted(expected.labels)
    assert items == dicom.list_items(tmp_path, CLASSES)
    loaded = {}
    for item in items:
        assert item.label == CLASSES.index(expected.labels[item.rel_path])
        if item.rel_path in expected.bad:
            assert quarantine_slug(dicom.load_item, item) == expected.bad[item.rel_path]
            continue
        pieces = dicom.load_item(item)  # series1's notes.txt is skipped
        assert {p.patient for p in pieces} == {expected.patients[item.rel_path]}
        loaded[item.rel_path] = [float(p.image[24, 20]) for p in pieces]
    # Slice n along z has raw centre ~300 + 100 n, whatever the file names' order.
    np.testing.assert_allclose(loaded["PAT-A/series1"], [300, 400, 500, 600, 700], atol=25)
    # series2: RescaleSlope 2, RescaleIntercept -100.
    np.testing.assert_allclose(loaded["PAT-B/series2"], [500, 700, 900, 1100], atol=50)
    raw = pydicom.dcmread(next((tmp_path / "PAT-B/series2").glob("*.dcm")))
    volume, _ = read_dicom_series(tmp_path / "PAT-B/series2")
    position = [k for k in range(4) if abs(-20 + 5 * k - float(raw.ImagePositionPatient[2])) < 1]
    np.testing.assert_array_equal(volume[:, :, position[0]], raw.pixel_array * 2.0 - 100.0)


def test_dicom_monochrome1_and_unreadable_series(tmp_path: Path) -> None:
    pixels = np.full((40, 40), 100, np.uint16)
    pixels[10:30, 10:30] = 1000
    for n in range(3):
        fx.write_dicom_file(
            tmp_path / "mono1" / f"{n}.dcm",
            pixels,
            instance=n + 1,
            position_z=n,
            photometric="MONOCHROME1",
        )
    volume, patient = read_dicom_series(tmp_path / "mono1")
    assert patient == "PAT-12345"
    assert volume[20, 20, 0] == 100 and volume[0, 0, 0] == 1000  # inverted
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.dcm").write_text("not a DICOM file at all\n" * 10)
    assert quarantine_slug(read_dicom_series, tmp_path / "junk") == "unreadable"


def test_dicom_table_must_match_folders(tmp_path: Path) -> None:
    fx.make_dicom_series(tmp_path)
    (tmp_path / "labels.csv").write_text("series,label\nPAT-A/series1,glioma\n")
    with pytest.raises(SourceError) as info:
        dicom.list_items(tmp_path, CLASSES)
    assert "PAT-B/series2" in str(info.value) and "PAT-A/series3" in str(info.value)


def test_reader_for() -> None:
    assert reader_for("nifti") is nifti
    with pytest.raises(SourceError, match="kaggle"):
        reader_for("analyze")
