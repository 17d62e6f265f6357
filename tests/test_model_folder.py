"""Exported model folders: ONNX, TorchScript, model card, and prediction from the folder alone.

One tiny world is built once, laid out as the pipeline lays it out (``OUT/data``,
``OUT/data-sr``, ``OUT/runs/sr`` and one classifier run per input kind in ``OUT/runs``): a toy
shard set, a tiny SR run and its enhanced set, and ``test_resnet`` classifiers trained for two
steps and evaluated on the test split. The degradations add Rician noise, so the per-sample
draws (seeded from each image's digest) must match for predictions to match evaluation.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import TINY_SGD_RUN, make_shard_set
from input_trees import brain_image, brain_volume, make_dicom_series
from PIL import Image

from shards.loader import create_loader
from trainer.__main__ import main
from trainer.config import load_train_config
from trainer.experiment.enhance import enhance_with_checkpoint
from trainer.inference import classifier_from_checkpoint, classifier_from_folder
from trainer.input_kind import path_safe
from trainer.loop import evaluate, fit
from trainer.model_folder import ModelFolderError, read_model_folder

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("hr", "lr", "sr", "lr+sr", "lr|sr")
NOISE = "data.degrade.noise_sigma=0.02"


def _run_name(arm: str) -> str:
    return f"{path_safe(arm)}-seed0"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``OUT`` with data, SR run, SR set and one evaluated classifier per input kind."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("world") / "out"
    data, sr_data, runs = out / "data", out / "data-sr", out / "runs"
    make_shard_set(data, {"train": [16], "val": [8], "test": [8]}, size=32)
    sr_cfg = load_train_config(
        ROOT / "configs" / "sr-debug.yaml",
        [
            f"data.root={data}",
            f"out_dir={runs}",
            "name=sr",
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
            "sr.examples=0",
            NOISE,
        ],
    )
    fit(sr_cfg)
    enhance_with_checkpoint(runs / "sr", data, sr_data, batch_size=8, device="cpu")
    for arm in ARMS:
        cfg = load_train_config(
            ROOT / "configs" / "debug.yaml",
            [
                *TINY_SGD_RUN,
                "train.max_steps_per_epoch=2",
                f"data.root={data}",
                f"data.sr_root={sr_data}",
                f"data.inputs={arm}",
                f"out_dir={runs}",
                f"name={_run_name(arm)}",
                NOISE,
            ],
        )
        fit(cfg)
        evaluate(runs / _run_name(arm), "test")
    return out


@pytest.fixture(scope="module")
def folders(world: Path) -> dict[str, Path]:
    """One exported folder per input kind (hr and lr|sr with ONNX and TorchScript too)."""
    made = {}
    for arm in ARMS:
        folder = world.parent / "exported" / _run_name(arm)
        extra = ["--format", "onnx", "torchscript"] if arm in ("hr", "lr|sr") else []
        run = str(world / "runs" / _run_name(arm))
        assert main(["export", "--checkpoint", run, "--out", str(folder), *extra]) == 0
        made[arm] = folder
    return made


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A JPEG, a 16-bit PNG, a NIfTI volume and a DICOM series to classify."""
    root = tmp_path_factory.mktemp("model_folder_inputs")
    rng = np.random.default_rng(1)
    jpeg = root / "scan.jpg"
    grey = brain_image(120, 100, "glioma", rng).astype(np.uint8)
    Image.fromarray(grey).convert("RGB").save(jpeg, quality=92)  # grey saved as RGB: accepted
    png = root / "scan16.png"
    Image.fromarray((brain_image(90, 110, "pituitary", rng) * 16).astype(np.uint16)).save(png)
    nifti = root / "vol.nii.gz"
    nib.save(nib.Nifti1Image(brain_volume((40, 48, 12), "meningioma", rng), np.eye(4)), nifti)
    make_dicom_series(root / "dicom")
    return {"jpeg": jpeg, "png": png, "nifti": nifti, "dicom": root / "dicom" / "PAT-A" / "series1"}


def _predict(tmp: Path, source: list[str], paths: list[Path], *extra: str) -> list[dict]:
    out = tmp / f"preds-{len(list(tmp.glob('preds-*')))}.csv"
    args = ["predict", *source, "--out", str(out), *extra, *map(str, paths)]
    assert main(args) == 0
    with out.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _probs(rows: list[dict], classes: list[str]) -> np.ndarray:
    return np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows if not r["error"]])


@pytest.mark.parametrize("arm", ARMS)
def test_folder_reproduces_the_test_evaluation(world: Path, folders: dict, arm: str) -> None:
    """The folder's model input (degradation, SR model, quantisation) is evaluation's own."""
    clf = classifier_from_folder(folders[arm])
    run = world / "runs" / _run_name(arm)
    table = pq.read_table(run / "eval-test" / "predictions_test.parquet").to_pydict()
    want = {k: [table[f"prob_{c}"][i] for c in clf.classes] for i, k in enumerate(table["key"])}
    seen = 0
    with torch.no_grad():
        for batch in create_loader(world / "data", "test", 3, mode="eval"):
            probs = clf.model(clf.model_input(batch["image"])).softmax(1)
            for key, p, valid in zip(batch["key"], probs, batch["valid"]):
                if bool(valid):
                    np.testing.assert_allclose(p.numpy(), want[key], atol=1e-4, err_msg=key)
                    seen += 1
    assert seen == 8
    spec = read_model_folder(folders[arm])
    assert (spec["sr"] is not None) == (arm in ("sr", "lr+sr", "lr|sr"))
    assert (spec["lr"] is not None) == (arm in ("lr", "lr|sr"))
    if spec["sr"]:
        assert (folders[arm] / spec["sr"]["weights"]).is_file()
        sr_index = json.loads((world / "data-sr" / "index.json").read_text())
        assert spec["sr"]["model_id"] == sr_index["config"]["model"]


def test_onnx_and_torchscript_match_torch_on_real_images(world: Path, folders: dict) -> None:
    import onnxruntime as ort

    folder = folders["hr"]
    spec = read_model_folder(folder)
    assert spec["formats"] == {
        "safetensors": "model.safetensors",
        "onnx": "model.onnx",
        "torchscript": "model.torchscript.pt",
    }
    assert not (folders["lr"] / "model.onnx").exists()  # --format asked only for hr's
    clf = classifier_from_folder(folder)
    batch = next(iter(create_loader(world / "data", "test", 5, mode="eval")))["image"]
    with torch.no_grad():
        want = clf.model(batch).numpy()
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"image": batch.numpy()})  # batch 5: a dynamic axis
    np.testing.assert_allclose(got, want, atol=1e-4)
    traced = torch.jit.load(str(folder / "model.torchscript.pt"))
    with torch.no_grad():
        np.testing.assert_allclose(traced(batch[:2]).numpy(), want[:2], atol=1e-4)


def test_a_two_channel_folder_states_its_channels_and_its_onnx_takes_them(
    world: Path, folders: dict, tmp_path: Path
) -> None:
    """An lr|sr folder: two input channels (LR, then SR) in model.json, the card and ONNX."""
    import onnxruntime as ort

    folder = folders["lr|sr"]
    spec = read_model_folder(folder)
    assert spec["in_chans"] == spec["architecture"]["in_chans"] == spec["input"]["channels"] == 2
    assert spec["input"]["channel_images"] == ["lr", "sr"] and "in_chans=2" in spec["load_with"]
    card = (folder / "model_card.md").read_text()
    assert "2 input channels" in card and "1: the SR image" in card
    clf = classifier_from_folder(folder)
    batch = next(iter(create_loader(world / "data", "test", 5, mode="eval")))["image"]
    x = clf.model_input(batch)
    assert x.shape == (5, 2, 32, 32)
    with torch.no_grad():
        want = clf.model(x).numpy()
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"image": x.numpy()})
    np.testing.assert_allclose(got, want, atol=1e-4)
    # A folder whose recorded channels do not fit its input kind is refused, naming both
    # (re-sealed, so that only the channel count is wrong).
    from trainer.model_folder import write_model_json

    copy = tmp_path / "one-channel"
    shutil.copytree(folder, copy)
    edited = json.loads((copy / "model.json").read_text())
    for key in ("files", "self_sha256"):
        del edited[key]
    edited["architecture"]["in_chans"] = 1
    (copy / "model.json").unlink()
    write_model_json(copy, edited)
    with pytest.raises(ModelFolderError, match=r"1 input channel.*inputs=lr\|sr makes 2"):
        classifier_from_folder(copy)


@pytest.mark.parametrize("arm", ["hr", "lr+sr", "lr|sr"])
def test_predict_from_the_folder_alone_matches_the_checkpoint(
    world: Path, files: dict, tmp_path: Path, arm: str
) -> None:
    out = tmp_path / "out"
    shutil.copytree(world, out)  # this test deletes its run and data afterwards
    run = out / "runs" / _run_name(arm)
    inputs = [files["jpeg"], files["png"], files["nifti"], files["dicom"]]
    from_ckpt = _predict(tmp_path, ["--checkpoint", str(run)], inputs)
    folder = tmp_path / "made"
    assert main(["export", "--checkpoint", str(run), "--out", str(folder)]) == 0
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(folder, moved)
    shutil.rmtree(folder)
    shutil.rmtree(out)  # no run, no data, no SR set: only the folder is left
    from_folder = _predict(tmp_path, ["--model", str(moved)], inputs)
    classes = read_model_folder(moved)["classes"]
    assert [r["kind"] for r in from_folder] == [r["kind"] for r in from_ckpt]
    assert {"image", "slice", "volume"} <= {r["kind"] for r in from_folder}
    assert not any(r["error"] for r in from_folder)
    np.testing.assert_allclose(_probs(from_folder, classes), _probs(from_ckpt, classes), atol=1e-6)
    assert [r["predicted"] for r in from_folder] == [r["predicted"] for r in from_ckpt]
    text = "".join(json.dumps(r) for r in from_folder)
    assert "PAT-12345" not in text and "Doe^Jane" not in text


def test_model_json_and_card_state_the_facts_and_no_path(world: Path, folders: dict) -> None:
    folder = folders["lr+sr"]
    spec = read_model_folder(folder)
    index = json.loads((world / "data" / "index.json").read_text())
    assert spec["classes"] == index["classes"] and spec["inputs"] == "lr+sr"
    assert spec["input"]["size"] == 32 and spec["input"]["channels"] == 1
    assert spec["data"]["dataset_id"] == index["dataset_id"]
    ckpt = json.loads(
        next((world / "runs" / "lr-sr-seed0").glob("checkpoints/*/complete.json")).read_text()
    )
    assert spec["training"]["config_fingerprint"] == ckpt["config_fingerprint"]
    assert set(spec["files"]) == {p.name for p in folder.iterdir()} - {"model.json"}
    card = (folder / "model_card.md").read_text()
    test = spec["test"]
    assert test["status"] == "ok" and test["n"] == 8
    lo, hi = test["intervals"]["accuracy"]
    assert lo <= test["metrics"]["accuracy"] <= hi and 0 <= lo < hi <= 1
    for needle in (
        index["dataset_id"],
        ckpt["config_fingerprint"],
        "95% interval",
        "Wilson",
        "not a medical device",
        "Slice-level",
        "## Arms comparison",
        "did not come from the pipeline",
        spec["sr"]["model_id"],
    ):
        assert needle.lower() in card.lower(), needle
    tmp_root = str(world.parent)
    for text in (card, (folder / "model.json").read_text()):
        assert tmp_root not in text and world.parent.name not in text


def test_the_card_states_the_pipeline_comparison_or_its_absence(
    world: Path, tmp_path: Path
) -> None:
    from trainer.experiment.results import ArmResults, ReportProtocol, Results, RunProvenance
    from trainer.experiment.stats import McNemarResult, PairedComparison

    out = tmp_path / "out"
    shutil.copytree(world, out)
    (out / "stages.json").write_text("{}")
    run = out / "runs" / "sr-seed0"
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "a")]) == 0
    assert "report (`results.json`) is absent" in (tmp_path / "a" / "model_card.md").read_text()
    index = json.loads((out / "data" / "index.json").read_text())
    ckpt_name = json.loads((run / "eval-test" / "metrics_test.json").read_text())["checkpoint"]
    arm = ArmResults(
        [0],
        {"accuracy": (0.625, 0.0), "balanced_accuracy": (0.5, 0.0), "macro_f1": (0.4, 0.0)},
        {},
        [],
    )
    res = Results(
        classes=index["classes"],
        source="synth",
        train_samples=16,
        test_samples=8,
        test_keys_sha256=index["test_keys_sha256"],
        dataset_id=index["dataset_id"],
        arms={"hr": arm, "sr": arm},
        comparisons=[
            PairedComparison(
                "sr", "hr", 0.125, -0.25, 0.5, "samples", [McNemarResult(2, 1, 1.0)], [1.0]
            )
        ],
        protocol=ReportProtocol([0], "test", "bootstrap", "mcnemar"),
        provenance=[RunProvenance("classify/sr-seed0", "sr-seed0", "f", Path(ckpt_name).name, "w")],
    )
    (out / "results.json").write_text(json.dumps(res.to_json()))
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "b")]) == 0
    card = (tmp_path / "b" / "model_card.md").read_text()
    assert "| sr − hr | 0.125 | [-0.250, 0.500] | samples | 1 |" in card
    assert "| hr | 1 | 0.625 ± 0.000" in card
    # Results of other weights are not stated as this model's.
    res.provenance[0].checkpoint = "step-99999999"
    (out / "results.json").write_text(json.dumps(res.to_json()))
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "c")]) == 0
    assert "reports other weights" in (tmp_path / "c" / "model_card.md").read_text()


def test_export_refuses_another_model_and_redoes_the_same_cleanly(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = world / "runs"
    target = tmp_path / "model"
    assert main(["export", "--checkpoint", str(runs / "hr-seed0"), "--out", str(target)]) == 0
    before = read_model_folder(target)
    assert "onnx" not in before["formats"]
    args = ["export", "--checkpoint", str(runs / "hr-seed0"), "--out", str(target)]
    assert main([*args, "--format", "onnx"]) == 0  # the same weights: replaced, format added
    again = read_model_folder(target)
    assert again["weights_sha256"] == before["weights_sha256"] and "onnx" in again["formats"]
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(runs / "lr-seed0"), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "already holds another model" in err
    assert read_model_folder(target) == again  # untouched
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(runs / "hr-seed0"), "--out", str(other)]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert (other / "todo.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".*"))  # no staging folder left behind


def test_a_failed_export_leaves_nothing_that_looks_finished(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(world, out)
    run = out / "runs" / "hr-seed0"
    (run / "eval-test" / "metrics_test.json").write_text("{ half a file")
    target = tmp_path / "model"
    assert main(["export", "--checkpoint", str(run), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "eval-test" in err and "unreadable test evaluation" in err
    assert not target.exists() and not list(tmp_path.glob(".model*"))


def test_a_missing_or_edited_file_is_refused(
    folders: dict, files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(name: str) -> Path:
        copy = tmp_path / name.replace(".", "_")
        shutil.copytree(folders["sr"], copy)
        return copy

    cases = []
    gone = broken("sr_model.safetensors")
    (gone / "sr_model.safetensors").unlink()
    cases.append((gone, "sr_model.safetensors", "missing"))
    edited = broken("model_card.md")
    (edited / "model_card.md").write_text("# a better card\n")
    cases.append((edited, "model_card.md", "sha256 differs"))
    relabelled = broken("model.json")
    spec = json.loads((relabelled / "model.json").read_text())
    spec["classes"] = spec["classes"][::-1]
    (relabelled / "model.json").write_text(json.dumps(spec))
    cases.append((relabelled, "model.json", "edited after export"))
    cases.append((tmp_path, str(tmp_path), "not a model folder"))
    for folder, name, why in cases:
        with pytest.raises(ModelFolderError, match=why) as caught:
            classifier_from_folder(folder)
        assert name in str(caught.value)
        args = [
            "predict",
            "--model",
            str(folder),
            "--out",
            str(tmp_path / "p.csv"),
            str(files["png"]),
        ]
        assert main(args) == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_a_colour_photo_and_a_tiny_image_are_refused_by_name(
    folders: dict, files: dict, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    photo = tmp_path / "holiday.jpg"
    colour = np.zeros((80, 80, 3), np.uint8)
    colour[..., 0] = 200  # a red picture with a green square: not an MRI slice
    colour[20:60, 20:60] = (30, 180, 40)
    Image.fromarray(colour).save(photo)
    tiny = tmp_path / "thumb.png"
    Image.fromarray(brain_image(12, 12, "glioma", rng).astype(np.uint8)).save(tiny)
    rows = _predict(tmp_path, ["--model", str(folders["hr"])], [photo, tiny, files["jpeg"]])
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["holiday.jpg"]["error"].startswith("colour_image: holiday.jpg")
    assert "greyscale MRI" in by_name["holiday.jpg"]["error"]
    assert by_name["thumb.png"]["error"].startswith("too_small")
    assert "thumb.png" in by_name["thumb.png"]["error"]
    assert by_name["scan.jpg"]["error"] == "" and by_name["scan.jpg"]["predicted"]


@pytest.mark.parametrize("arm", ["lr+sr", "lr|sr"])
def test_gradcam_writes_one_overlay_per_classified_slice(
    folders: dict, files: dict, tmp_path: Path, arm: str
) -> None:
    overlays = tmp_path / "cams"
    inputs = [files["jpeg"], files["nifti"]]
    rows = _predict(tmp_path, ["--model", str(folders[arm])], inputs, "--gradcam", str(overlays))
    drawn = [r for r in rows if r["kind"] in ("image", "slice")]
    assert drawn and all(r["gradcam"] for r in drawn)
    assert sorted(p.name for p in overlays.glob("*.png")) == sorted(r["gradcam"] for r in drawn)
    assert all((overlays / r["gradcam"]).stat().st_size > 1000 for r in drawn)
    plain = _predict(tmp_path, ["--model", str(folders[arm])], inputs)
    assert "gradcam" not in plain[0]
    np.testing.assert_allclose(
        _probs(rows, read_model_folder(folders[arm])["classes"]),
        _probs(plain, read_model_folder(folders[arm])["classes"]),
        atol=1e-6,
    )


def test_sr_checkpoint_names_the_sr_run_when_it_is_not_beside(
    world: Path, files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alone = tmp_path / "mine" / "sr-seed0"
    shutil.copytree(world / "runs" / "sr-seed0", alone)  # no SR run beside it any more
    target = tmp_path / "model"
    args = ["export", "--checkpoint", str(alone), "--out", str(target)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--sr-checkpoint" in err and "sr-" in err and not target.exists()
    assert main([*args, "--sr-checkpoint", str(world / "runs" / "sr")]) == 0
    assert read_model_folder(target)["sr"]["weights"] == "sr_model.safetensors"
    predict = ["predict", "--checkpoint", str(alone), "--out", str(tmp_path / "p.csv")]
    assert main([*predict, str(files["png"])]) == 2
    assert "--sr-checkpoint" in capsys.readouterr().err
    assert main([*predict, "--sr-checkpoint", str(world / "runs" / "sr"), str(files["png"])]) == 0
    direct = classifier_from_checkpoint(alone, world / "runs" / "sr")
    assert (
        direct.sr is not None and direct.sr.model_id == read_model_folder(target)["sr"]["model_id"]
    )


def test_card_intervals_agree_with_statsmodels_and_sklearn() -> None:
    from sklearn.metrics import balanced_accuracy_score, f1_score

    from trainer.model_card import _macro_scores, wilson_interval

    low, high = wilson_interval(80, 100)
    assert (round(low, 4), round(high, 4)) == (0.7112, 0.8666)  # Wilson 1927, z = 1.96
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
    balanced, macro = _macro_scores(labels, preds, 4)
    assert balanced == pytest.approx(balanced_accuracy_score(labels, preds), abs=1e-12)
    assert macro == pytest.approx(f1_score(labels, preds, average="macro"), abs=1e-12)
