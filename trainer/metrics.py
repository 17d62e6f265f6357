"""Validation metrics for both tasks, built on torchmetrics and synchronised across ranks.

torchmetrics keeps per-rank states and, when ``compute()`` runs under an initialised
torch.distributed process group, reduces them across ranks first (sums for counts, gathers for
the per-sample lists behind ROC-AUC and calibration). Each rank must therefore update with its
own, disjoint samples (the loader's exactly-once mode, padding rows marked invalid) and every
rank must call ``compute()``: it is a collective operation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.functional.image import structural_similarity_index_measure

__all__ = ["ClassificationMetrics", "SRMetrics", "brain_mask", "masked_psnr", "masked_ssim"]

# PSNR of a perfect reconstruction is infinite, which JSON cannot hold; an MSE floor of 1e-10
# caps it at 100 dB, far above anything a real reconstruction reaches.
_MSE_FLOOR = 1e-10

# Metrics whose update accepts a batch of zero rows (the stat-score ones reject it).
_EMPTY_SAFE = ("class_auroc", "ece", "confusion_matrix")


class ClassificationMetrics:
    """Multiclass metrics over a validation pass: accuracy, balanced accuracy, macro and
    per-class precision/recall/F1, confusion matrix, one-vs-rest ROC-AUC and ECE (15 bins).

    Args:
        num_classes: Number of classes C.
        class_names: C names, used as keys of ``per_class``.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str]) -> None:
        if num_classes < 2:
            raise ValueError(f"ClassificationMetrics needs at least 2 classes, got {num_classes}")
        if len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} names for {num_classes} classes: "
                f"{list(class_names)}"
            )
        self.num_classes = num_classes
        self.class_names = list(class_names)
        c = num_classes
        self.collection = MetricCollection(
            {
                "accuracy": MulticlassAccuracy(c, average="micro"),
                # Balanced accuracy is by definition the macro-averaged recall.
                "macro_recall": MulticlassRecall(c, average="macro"),
                "macro_precision": MulticlassPrecision(c, average="macro"),
                "macro_f1": MulticlassF1Score(c, average="macro"),
                "class_precision": MulticlassPrecision(c, average=None),
                "class_recall": MulticlassRecall(c, average=None),
                "class_f1": MulticlassF1Score(c, average=None),
                "confusion_matrix": MulticlassConfusionMatrix(c),
                # Per class, so a class absent from the targets can be left out of the mean
                # (torchmetrics' macro average would count it as an AUROC of 0).
                "class_auroc": MulticlassAUROC(c, average=None),
                "ece": MulticlassCalibrationError(c, n_bins=15, norm="l1"),
            },
            # Keep every metric's own states: the grouping would share stat-scores states and
            # is only a speed-up.
            compute_groups=False,
        )
        self._prime()

    def _prime(self) -> None:
        """Give the list-state metrics an empty, correctly shaped entry.

        A rank that sees no valid sample would otherwise hold empty lists, which torchmetrics
        replaces with a 1-D float tensor at sync time, and the gather across ranks then meets
        mismatched shapes and dtypes.
        """
        probs = torch.empty(0, self.num_classes, device=self.collection["ece"].device)
        target = torch.empty(0, dtype=torch.long, device=probs.device)
        for name in _EMPTY_SAFE:
            self.collection[name].update(probs, target)

    def to(self, device: torch.device | str) -> ClassificationMetrics:
        """Move the metric states to ``device`` (the model's); returns self."""
        self.collection.to(device)
        return self

    def reset(self) -> None:
        """Forget everything seen so far (call at the start of each validation pass)."""
        self.collection.reset()
        self._prime()

    def update(self, logits: Tensor, target: Tensor, valid: Tensor | None = None) -> None:
        """Add one batch.

        Args:
            logits: FloatTensor[B, C] raw model outputs (softmax is applied here).
            target: LongTensor[B] class indices.
            valid: BoolTensor[B]; False marks padding rows, which are not counted. None: all.
        """
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must be [B, {self.num_classes}], got shape {tuple(logits.shape)}"
            )
        if target.shape != logits.shape[:1]:
            raise ValueError(f"target must be [{logits.shape[0]}], got {tuple(target.shape)}")
        if valid is not None:
            logits, target = logits[valid.bool()], target[valid.bool()]
        if logits.shape[0] == 0:
            return
        probs = F.softmax(logits.detach().float(), dim=1)
        self.collection.update(probs, target.long())

    def compute(self) -> dict[str, Any]:
        """Reduce across ranks (collective: call on every rank) and return plain Python values.

        Returns:
            A JSON-serialisable dict with ``accuracy``, ``balanced_accuracy``,
            ``macro_precision``, ``macro_recall``, ``macro_f1``, ``per_class`` ({name:
            {precision, recall, f1, support}}), ``confusion_matrix`` (rows: true class, columns:
            predicted), ``roc_auc`` (one-vs-rest macro over classes with both positives and
            negatives; nan when there are none), ``roc_auc_note`` (which classes were left out,
            or None), ``ece`` and ``n`` (samples counted). Scalars are nan when n is 0.
        """
        with warnings.catch_warnings():
            # torchmetrics warns about absent classes and unused metrics; handled below.
            warnings.simplefilter("ignore", UserWarning)
            cm = self.collection["confusion_matrix"].compute().long().cpu()
            n = int(cm.sum())
            # n is the global count, so every rank takes the same branch (no hang).
            raw = self.collection.compute() if n else {}
        support = cm.sum(dim=1)
        names = self.class_names

        def scalar(name: str) -> float:
            return float(raw[name])

        if not n:
            return self._empty_result(cm)
        per_class = {
            name: {
                "precision": float(raw["class_precision"][i]),
                "recall": float(raw["class_recall"][i]),
                "f1": float(raw["class_f1"][i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        }
        # One-vs-rest AUROC is defined only for a class with both positives and negatives.
        usable = [i for i in range(self.num_classes) if 0 < int(support[i]) < n]
        auroc = raw["class_auroc"].cpu()
        roc_auc = float(auroc[usable].mean()) if usable else math.nan
        left_out = [names[i] for i in range(self.num_classes) if i not in usable]
        note = (
            f"ROC-AUC averaged without {', '.join(left_out)} (no positive or no negative samples)"
            if left_out
            else None
        )
        return {
            "accuracy": scalar("accuracy"),
            "balanced_accuracy": scalar("macro_recall"),
            "macro_precision": scalar("macro_precision"),
            "macro_recall": scalar("macro_recall"),
            "macro_f1": scalar("macro_f1"),
            "per_class": per_class,
            "confusion_matrix": cm.tolist(),
            "roc_auc": roc_auc,
            "roc_auc_note": note,
            "ece": scalar("ece"),
            "n": n,
        }

    def _empty_result(self, cm: Tensor) -> dict[str, Any]:
        """The result of a pass that counted no sample: nan scores, zero support."""
        nan = math.nan
        return {
            "accuracy": nan,
            "balanced_accuracy": nan,
            "macro_precision": nan,
            "macro_recall": nan,
            "macro_f1": nan,
            "per_class": {
                name: {"precision": nan, "recall": nan, "f1": nan, "support": 0}
                for name in self.class_names
            },
            "confusion_matrix": cm.tolist(),
            "roc_auc": nan,
            "roc_auc_note": "no samples counted",
            "ece": nan,
            "n": 0,
        }


def brain_mask(hr: Tensor, threshold: float = 0.05) -> Tensor:
    """The pixels of a normalised HR image that belong to the head.

    A threshold on intensity, then a 5x5 morphological closing so that dark structures inside
    the head (CSF, sulci) stay in the mask. The SR model and both baselines are scored with the
    same mask, computed from the HR image.

    Args:
        hr: FloatTensor[B, 1, H, W] (or [1, H, W] / [H, W]) in [0, 1].
        threshold: Intensity above which a pixel counts as head.

    Returns:
        BoolTensor of the same shape.
    """
    shape = hr.shape
    x = (hr.reshape(-1, 1, *shape[-2:]) > threshold).float()
    dilated = F.max_pool2d(x, kernel_size=5, stride=1, padding=2)
    closed = -F.max_pool2d(-dilated, kernel_size=5, stride=1, padding=2)
    return (closed > 0.5).reshape(shape)


def masked_psnr(pred: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    """Per-image PSNR in dB (data range 1) from the MSE over the masked pixels.

    Args:
        pred: FloatTensor[B, 1, H, W].
        target: FloatTensor[B, 1, H, W].
        mask: BoolTensor[B, 1, H, W] or None for the whole image.

    Returns:
        FloatTensor[B] (float64), capped at 100 dB; nan for an image whose mask is empty.
    """
    err = (pred.double() - target.double()) ** 2
    m = torch.ones_like(err) if mask is None else mask.double()
    count = m.sum(dim=(1, 2, 3))
    mse = (err * m).sum(dim=(1, 2, 3)) / count.clamp_min(1)
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(_MSE_FLOOR))
    return torch.where(count > 0, psnr, torch.full_like(psnr, math.nan))


def masked_ssim(pred: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    """Per-image SSIM (data range 1): the mean of torchmetrics' SSIM map over the mask.

    Args:
        pred: FloatTensor[B, 1, H, W].
        target: FloatTensor[B, 1, H, W].
        mask: BoolTensor[B, 1, H, W] or None for the whole image.

    Returns:
        FloatTensor[B] (float64); nan for an image whose mask is empty.
    """
    _, ssim_map = structural_similarity_index_measure(
        pred.float(), target.float(), data_range=1.0, reduction="none", return_full_image=True
    )
    ssim_map = ssim_map.double()
    m = torch.ones_like(ssim_map) if mask is None else mask.double()
    count = m.sum(dim=(1, 2, 3))
    ssim = (ssim_map * m).sum(dim=(1, 2, 3)) / count.clamp_min(1)
    return torch.where(count > 0, ssim, torch.full_like(ssim, math.nan))


class SRMetrics(Metric):
    """PSNR and SSIM inside a brain mask for several reconstructions of the same HR images.

    PSNR is computed per image from the MSE over the masked pixels; SSIM is the mean of the
    SSIM map (11x11 Gaussian window) over the masked pixels. Both are averaged over images.
    Images whose mask is empty are not counted. States are sums and counts, so ranks reduce
    by summing and each image counts once across ranks.

    Args:
        methods: Names of the reconstructions scored, e.g. ``("sr", "bicubic", "zero_fill")``.
    """

    full_state_update = False

    def __init__(self, methods: Sequence[str] = ("sr", "bicubic", "zero_fill")) -> None:
        super().__init__()
        if not methods or len(set(methods)) != len(methods):
            raise ValueError(f"SRMetrics needs distinct method names, got {list(methods)}")
        self.methods = list(methods)
        m = len(self.methods)
        z = torch.zeros(m, dtype=torch.float64)
        self.add_state("psnr_sum", default=z.clone(), dist_reduce_fx="sum")
        self.add_state("ssim_sum", default=z.clone(), dist_reduce_fx="sum")
        self.add_state("count", default=z.clone(), dist_reduce_fx="sum")

    def update(  # type: ignore[override]
        self,
        outputs: Mapping[str, Tensor],
        target: Tensor,
        mask: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> None:
        """Add one batch.

        Args:
            outputs: Method name -> FloatTensor[B, 1, H, W] in [0, 1]; any subset of methods.
            target: HR FloatTensor[B, 1, H, W].
            mask: BoolTensor[B, 1, H, W] (see :func:`brain_mask`) or None for whole images.
            valid: BoolTensor[B]; False marks padding rows. None: all rows count.
        """
        unknown = set(outputs) - set(self.methods)
        if unknown:
            raise ValueError(f"SRMetrics got unknown methods {sorted(unknown)}; has {self.methods}")
        if target.ndim != 4 or target.shape[1] != 1:
            raise ValueError(f"target must be [B, 1, H, W], got {tuple(target.shape)}")
        if valid is not None:
            keep = valid.bool()
            target = target[keep]
            mask = None if mask is None else mask[keep]
            outputs = {k: v[keep] for k, v in outputs.items()}
        if target.shape[0] == 0:
            return
        for name, pred in outputs.items():
            if pred.shape != target.shape:
                raise ValueError(
                    f"SRMetrics: '{name}' has shape {tuple(pred.shape)}, "
                    f"target {tuple(target.shape)}"
                )
            i = self.methods.index(name)
            psnr = masked_psnr(pred.detach(), target, mask)
            ssim = masked_ssim(pred.detach(), target, mask)
            ok = ~torch.isnan(psnr)
            self.psnr_sum[i] += psnr[ok].sum()
            self.ssim_sum[i] += ssim[ok].sum()
            self.count[i] += ok.sum()

    def compute(self) -> dict[str, dict[str, float | int]]:  # type: ignore[override]
        """Return ``{method: {"psnr": dB, "ssim": value, "n": images}}`` (nan where n is 0)."""
        out: dict[str, dict[str, float | int]] = {}
        for i, name in enumerate(self.methods):
            n = float(self.count[i])
            out[name] = {
                "psnr": float(self.psnr_sum[i] / n) if n else math.nan,
                "ssim": float(self.ssim_sum[i] / n) if n else math.nan,
                "n": int(n),
            }
        return out
