"""trainer.predict on real JPEG, PNG, NIfTI and DICOM files with a tiny timm model."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import timm
import torch
from input_trees import brain_image, brain_volume, make_dicom_series
from PIL import Image

from shards.preprocess import PreprocessConfig, preprocess
from shards.sources import (
    axial_slice,
    read_dicom_series,
    read_image_file,
    read_nifti_volume,
    select_slices,
)
from trainer.predict import predict_paths, write_predictions_csv

NAMES = ["glioma", "meningioma", "notumor", "pituitary"]
CFG = PreprocessConfig(size=32)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", in_chans=1, num_classes=len(NAMES))
    return net.eval()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict_inputs")
    rng = np.random.default_rng(0)
    jpeg = root / "images" / "scan.jpg"
    jpeg.parent.mkdir()
    Image.fromarray(brain_image(120, 100, "glioma", rng).astype(np.uint8)).convert("RGB").save(
        jpeg, quality=92
    )
    png = root / "images" / "nested" / "scan16.png"
    png.parent.mkdir()
    Image.fromarray((brain_image(90, 110, "pituitary", rng) * 16).astype(np.uint16)).save(png)
    nifti = root / "vol.nii.gz"
    nib.save(nib.Nifti1Image(brain_volume((40, 48, 20), "meningioma", rng), np.eye(4)), nifti)
    dicom_root = root / "dicom"
    make_dicom_series(dicom_root)
    bad = root / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return {
        "jpeg": jpeg,
        "png": png,
        "nifti": nifti,
        "dicom": dicom_root / "PAT-A" / "series1",
        "dicom_root": dicom_root,
        "bad": bad,
        "images": root / "images",
    }


def direct(model: torch.nn.Module, slices: list[np.ndarray]) -> np.ndarray:
    """Class probabilities from running the model on preprocess() output, one slice at a time."""
    with torch.no_grad():
        rows = [
            torch.softmax(model(torch.from_numpy(preprocess(s, CFG)[0])[None, None]), 1)[0]
            for s in slices
        ]
    return torch.stack(rows).double().numpy()


def probs_of(row: dict) -> np.ndarray:
    return np.array([row[f"prob_{n}"] for n in NAMES])


def test_images_match_the_model_on_preprocessed_pixels(model, inputs) -> None:
    rows = predict_paths(model, [inputs["jpeg"], inputs["png"]], NAMES, CFG, "cpu", batch_size=2)
    assert [r["kind"] for r in rows] == ["image", "image"]
    expected = direct(model, [read_image_file(inputs["jpeg"]), read_image_file(inputs["png"])])
    for row, exp in zip(rows, expected):
        assert row["error"] is None and row["slice"] is None
        assert probs_of(row).sum() == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(probs_of(row), exp, atol=1e-5)
        assert row["predicted"] == NAMES[int(np.argmax(exp))]


def test_nifti_volume_gives_slice_rows_and_a_mean_row(model, inputs) -> None:
    rows = predict_paths(model, [inputs["nifti"]], NAMES, CFG, "cpu", batch_size=5)
    volume = read_nifti_volume(inputs["nifti"])
    chosen = select_slices(volume, None)
    assert 0 < len(chosen) < volume.shape[-1]  # slices without brain are skipped, as at ingest
    slice_rows, (summary,) = rows[:-1], rows[-1:]
    assert [r["slice"] for r in slice_rows] == chosen
    assert all(r["kind"] == "slice" for r in slice_rows) and summary["kind"] == "volume"
    expected = direct(model, [axial_slice(volume, k) for k in chosen])
    got = np.stack([probs_of(r) for r in slice_rows])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(probs_of(summary), expected.mean(0), atol=1e-5)
    assert probs_of(summary).sum() == pytest.approx(1.0, abs=1e-6)


def test_dicom_series_and_no_patient_id_in_output(model, inputs, tmp_path: Path) -> None:
    rows = predict_paths(model, [inputs["dicom"]], NAMES, CFG, "cpu")
    volume, _ = read_dicom_series(inputs["dicom"])
    chosen = select_slices(volume, None)
    slice_rows = [r for r in rows if r["kind"] == "slice"]
    assert [r["slice"] for r in slice_rows] == chosen
    np.testing.assert_allclose(
        np.stack([probs_of(r) for r in slice_rows]),
        direct(model, [axial_slice(volume, k) for k in chosen]),
        atol=1e-5,
    )
    assert rows[-1]["kind"] == "volume" and rows[-1]["error"] is None
    # The whole tree: three series, one of them broken (an instance without pixel data).
    tree = predict_paths(model, [inputs["dicom_root"]], NAMES, CFG, "cpu")
    failed = [r for r in tree if r["error"]]
    assert len(failed) == 1 and "no_pixel_data" in failed[0]["error"]
    assert failed[0]["path"].endswith("series3")
    assert len([r for r in tree if r["kind"] == "volume" and not r["error"]]) == 2
    out = write_predictions_csv(tree, tmp_path / "preds.csv")
    text = out.read_text()
    for secret in ("PAT-12345", "PAT-67890", "Doe^Jane", "Roe^John"):
        assert secret not in text


def test_folders_bad_files_and_csv(model, inputs, tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    rows = predict_paths(
        model, [inputs["images"], inputs["bad"], missing], NAMES, CFG, "cpu", batch_size=3
    )
    assert [Path(r["path"]).name for r in rows] == [
        "scan16.png",  # images/nested/scan16.png sorts before images/scan.jpg
        "scan.jpg",
        "broken.jpg",
        "nope.png",
    ]
    assert rows[2]["error"].startswith(("not_an_image", "truncated", "unreadable"))
    assert "broken.jpg" in rows[2]["error"] and rows[2]["predicted"] is None
    assert rows[3]["error"].startswith("not_found")
    out = write_predictions_csv(rows, tmp_path / "out" / "preds.csv")
    with out.open(newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == [
        "path",
        "kind",
        "slice",
        "predicted",
        *[f"prob_{n}" for n in NAMES],
        "error",
    ]
    assert len(table) == 4 and table[0]["error"] == "" and table[2]["prob_glioma"] == ""
    assert float(table[1]["prob_glioma"]) == pytest.approx(rows[1]["prob_glioma"])


def test_input_transform_runs_before_the_model(model, inputs) -> None:
    model.train()
    rows = predict_paths(
        model, [inputs["jpeg"]], NAMES, CFG, "cpu", input_transform=lambda x: 1.0 - x
    )
    assert model.training  # the caller's mode is restored
    model.eval()
    image = preprocess(read_image_file(inputs["jpeg"]), CFG)[0]
    with torch.no_grad():
        expected = torch.softmax(model(1.0 - torch.from_numpy(image)[None, None]), 1)[0]
    np.testing.assert_allclose(probs_of(rows[0]), expected.double().numpy(), atol=1e-5)


def test_a_class_list_in_another_order_is_refused(tmp_path: Path) -> None:
    from helpers import make_shard_set

    from trainer.predict import check_class_order, dataset_preprocess

    root = tmp_path / "shards"
    make_shard_set(root, {"train": [4], "val": [4], "test": [4]}, size=32, classes=NAMES)
    assert dataset_preprocess(root, NAMES).size == 32
    swapped = [NAMES[1], NAMES[0], *NAMES[2:]]
    with pytest.raises(ValueError, match="another order") as caught:
        dataset_preprocess(root, swapped)  # a checkpoint whose first two outputs are swapped
    assert str(NAMES) in str(caught.value) and str(swapped) in str(caught.value)
    with pytest.raises(ValueError, match=r"differs.*'tumour'"):
        check_class_order(NAMES, [*NAMES[:3], "tumour"], "--classes")
