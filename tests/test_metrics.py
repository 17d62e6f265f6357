"""trainer.metrics against scikit-learn, across 2 real gloo ranks, and SR PSNR/SSIM in a mask."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_distributed

from trainer.metrics import ClassificationMetrics, SRMetrics, brain_mask, masked_psnr
from trainer.plots import plot_confusion, plot_curves, plot_sr_examples

NAMES = ["glioma", "meningioma", "notumor", "pituitary"]


def random_predictions(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits that are somewhat informative, targets, and a validity mask with padding rows."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 4, (n,), generator=g)
    logits = torch.randn(n, 4, generator=g) + 1.5 * torch.nn.functional.one_hot(target, 4)
    valid = torch.rand(n, generator=g) > 0.25
    # Padding rows carry garbage that would change every metric if it were counted.
    logits[~valid] = torch.tensor([50.0, -50.0, -50.0, -50.0])
    target[~valid] = 3
    return logits, target, valid


def sklearn_reference(logits: torch.Tensor, target: torch.Tensor) -> dict[str, object]:
    # Imported here, not at module level: the spawned gloo ranks import this module, and
    # scikit-learn would add seconds to each of them.
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    t = target.numpy()
    probs = logits.softmax(1).double().numpy()
    p = probs.argmax(1)
    return {
        "accuracy": accuracy_score(t, p),
        "balanced_accuracy": balanced_accuracy_score(t, p),
        "macro_precision": precision_score(t, p, average="macro"),
        "macro_recall": recall_score(t, p, average="macro"),
        "macro_f1": f1_score(t, p, average="macro"),
        "class_f1": f1_score(t, p, average=None),
        "confusion_matrix": confusion_matrix(t, p, labels=range(4)).tolist(),
        "roc_auc": roc_auc_score(t, probs, multi_class="ovr", average="macro"),
        "n": len(t),
    }


def assert_matches(result: dict, ref: dict) -> None:
    for key in ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1"):
        assert result[key] == pytest.approx(ref[key], abs=1e-6), key
    assert result["roc_auc"] == pytest.approx(ref["roc_auc"], abs=1e-6)
    assert result["confusion_matrix"] == ref["confusion_matrix"]
    assert result["n"] == ref["n"]
    for i, name in enumerate(NAMES):
        assert result["per_class"][name]["f1"] == pytest.approx(ref["class_f1"][i], abs=1e-6)
        assert result["per_class"][name]["support"] == sum(ref["confusion_matrix"][i])


def test_classification_matches_sklearn_and_drops_padding_rows() -> None:
    logits, target, valid = random_predictions(300, seed=0)
    metrics = ClassificationMetrics(4, NAMES)
    for start in range(0, 300, 64):  # several batches, the last one partial
        sl = slice(start, start + 64)
        metrics.update(logits[sl], target[sl], valid[sl])
    result = metrics.compute()
    assert_matches(result, sklearn_reference(logits[valid], target[valid]))
    assert 0.0 <= result["ece"] <= 1.0 and result["roc_auc_note"] is None
    json.dumps(result)  # plain Python values only
    metrics.reset()
    assert metrics.compute()["n"] == 0


def test_ece_is_zero_for_confident_correct_and_large_for_confident_wrong() -> None:
    target = torch.arange(40) % 4
    sure = torch.nn.functional.one_hot(target, 4).float() * 30
    metrics = ClassificationMetrics(4, NAMES)
    metrics.update(sure, target)
    assert metrics.compute()["ece"] == pytest.approx(0.0, abs=1e-4)
    metrics.reset()
    metrics.update(sure, (target + 1) % 4)
    assert metrics.compute()["ece"] == pytest.approx(1.0, abs=1e-4)


def test_auroc_with_a_class_absent_from_targets() -> None:
    from sklearn.metrics import roc_auc_score

    logits, target, _ = random_predictions(200, seed=1)
    keep = target != 2
    metrics = ClassificationMetrics(4, NAMES)
    metrics.update(logits[keep], target[keep])
    result = metrics.compute()
    assert "notumor" in result["roc_auc_note"]
    assert result["per_class"]["notumor"]["support"] == 0
    probs = logits[keep].softmax(1).double().numpy()
    t = target[keep].numpy()
    per_class = [roc_auc_score(t == c, probs[:, c]) for c in (0, 1, 3)]
    assert result["roc_auc"] == pytest.approx(float(np.mean(per_class)), abs=1e-6)


def test_bad_shapes_and_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="class_names"):
        ClassificationMetrics(4, NAMES[:3])
    metrics = ClassificationMetrics(4, NAMES)
    with pytest.raises(ValueError, match="logits"):
        metrics.update(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long))


def _ranked_update(rank: int, world: int, out_dir: str) -> None:
    """Each rank scores a disjoint part (rank 1 an empty batch too); rank 0 saves the result."""
    torch.set_num_threads(1)
    logits, target, valid = random_predictions(300, seed=0)
    metrics = ClassificationMetrics(4, NAMES)
    # Uneven split: rank 0 gets rows 0..179, rank 1 rows 180..299, in different batch sizes.
    bounds = [(0, 180), (180, 300)][rank]
    step = 50 if rank == 0 else 17
    for start in range(bounds[0], bounds[1], step):
        stop = min(start + step, bounds[1])
        metrics.update(logits[start:stop], target[start:stop], valid[start:stop])
    metrics.update(logits[:0], target[:0], valid[:0])
    result = metrics.compute()

    # A rank whose every row is padding still takes part in the sync and adds nothing.
    lonely = ClassificationMetrics(4, NAMES)
    rows = slice(0, 100)
    lonely.update(logits[rows], target[rows], valid[rows] & (rank == 0))
    lonely_result = lonely.compute()

    sr = SRMetrics(methods=("sr", "bicubic"))
    hr, noisy = _sr_pair(8, seed=2)
    part = slice(0, 3) if rank == 0 else slice(3, 8)
    sr.update({"sr": noisy[part], "bicubic": hr[part]}, hr[part], mask=brain_mask(hr[part]))
    sr_result = sr.compute()
    if rank == 0:
        Path(out_dir, "result.json").write_text(
            json.dumps({"cls": result, "lonely": lonely_result, "sr": sr_result})
        )


def _sr_pair(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HR phantoms (bright disc on black) and a copy with Gaussian noise of std 0.05."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    disc = (((yy - 24) ** 2 + (xx - 24) ** 2) < 18**2).float()
    hr = (0.4 + 0.4 * torch.rand(n, 1, 48, 48, generator=g)) * disc
    noisy = hr + 0.05 * torch.randn(hr.shape, generator=g)
    return hr, noisy


def test_two_gloo_ranks_count_each_sample_once(tmp_path: Path) -> None:
    run_distributed(_ranked_update, 2, str(tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    logits, target, valid = random_predictions(300, seed=0)
    assert_matches(result["cls"], sklearn_reference(logits[valid], target[valid]))
    first = valid.clone()
    first[100:] = False
    assert_matches(result["lonely"], sklearn_reference(logits[first], target[first]))

    hr, noisy = _sr_pair(8, seed=2)
    single = SRMetrics(methods=("sr", "bicubic"))
    single.update({"sr": noisy, "bicubic": hr}, hr, mask=brain_mask(hr))
    expected = single.compute()
    assert result["sr"]["sr"]["n"] == 8
    assert result["sr"]["sr"]["psnr"] == pytest.approx(expected["sr"]["psnr"], rel=1e-9)
    assert result["sr"]["sr"]["ssim"] == pytest.approx(expected["sr"]["ssim"], rel=1e-9)


def test_sr_identical_images_and_known_noise() -> None:
    hr, noisy = _sr_pair(4, seed=0)
    mask = brain_mask(hr)
    assert mask.dtype == torch.bool and mask.shape == hr.shape
    metrics = SRMetrics(methods=("sr", "bicubic", "zero_fill"))
    valid = torch.tensor([True, True, True, False])
    garbage = noisy.clone()
    garbage[3] = 1.0  # a padding row: would ruin the averages if it were counted
    metrics.update({"sr": hr, "bicubic": garbage}, hr, mask=mask, valid=valid)
    result = metrics.compute()
    assert result["sr"]["psnr"] >= 99.0 and result["sr"]["ssim"] == pytest.approx(1.0)
    # Noise of std 0.05 inside the mask: PSNR = 10 log10(1 / 0.05^2) = 26.02 dB.
    assert result["bicubic"]["psnr"] == pytest.approx(26.02, abs=0.3)
    assert result["bicubic"]["n"] == 3
    assert 0.2 < result["bicubic"]["ssim"] < 0.95
    assert math.isnan(result["zero_fill"]["psnr"]) and result["zero_fill"]["n"] == 0


def test_psnr_is_computed_inside_the_mask_only() -> None:
    hr, _ = _sr_pair(2, seed=3)
    pred = hr.clone()
    mask = brain_mask(hr)
    pred[~mask] = 1.0  # errors only outside the brain
    assert float(masked_psnr(pred, hr, mask).min()) >= 99.0
    assert float(masked_psnr(pred, hr, None).max()) < 20.0
    with pytest.raises(ValueError, match="unknown methods"):
        SRMetrics(methods=("sr",)).update({"gan": hr}, hr)


def test_plots_write_pngs(tmp_path: Path) -> None:
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_accuracy": 0.2 * e, "lr": 1e-3}
        for e in range(1, 5)
    ]
    hr, noisy = _sr_pair(2, seed=4)
    paths = [
        plot_curves(history, tmp_path / "curves.png"),
        plot_confusion(
            [[5, 1, 0, 0], [0, 4, 2, 0], [0, 0, 6, 0], [1, 0, 0, 3]],
            NAMES,
            tmp_path / "confusion.png",
        ),
        plot_sr_examples(
            [
                {
                    "lr": hr[i, 0, ::4, ::4].numpy(),
                    "sr": noisy[i, 0].numpy(),
                    "hr": hr[i, 0].numpy(),
                }
                for i in range(2)
            ],
            tmp_path / "sr.png",
        ),
    ]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png", "curves.png", "sr.png"]
    with pytest.raises(ValueError, match="shape"):
        plot_confusion([[1, 2], [3, 4]], NAMES, tmp_path / "bad.png")
