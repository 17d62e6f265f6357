"""Classify image files, folders, NIfTI volumes and DICOM series with a trained model.

Pixels are read by the same readers ingest uses (``shards.sources``) and each 2-D slice goes
through ``shards.preprocess.preprocess`` with the run's preprocessing config, so the model sees
exactly what it saw in training. Inputs that cannot be read become rows with an ``error``
column instead of stopping the run. Patient identifiers read from DICOM headers are dropped on
the spot: no row carries one.

The class names label the model's outputs in order, so they must be the checkpoint's, in the
checkpoint's order: :func:`check_class_order` refuses any other list (the same names in another
order would silently swap the labels), and :func:`dataset_preprocess` applies it to the class
list of the data set whose preprocessing a prediction reuses.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shards.format import read_index
from shards.preprocess import PreprocessConfig, preprocess
from shards.sources import (
    IMAGE_SUFFIXES,
    QuarantineError,
    axial_slice,
    read_dicom_series,
    read_image_file,
    read_nifti_volume,
    select_slices,
)
from srmri.atomic import atomic_path
from srmri.config import config_from_dict
from trainer.modality import check_greyscale

__all__ = [
    "check_class_order",
    "dataset_preprocess",
    "find_inputs",
    "predict_paths",
    "write_predictions_csv",
]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Errors a reader or preprocessing raises for a bad input (not for a bug in this code).
_INPUT_ERRORS = (QuarantineError, OSError, ValueError)


def check_class_order(model_classes: Sequence[str], given: Sequence[str], source: str) -> None:
    """Refuse a class list that is not the model's, in the model's order.

    Args:
        model_classes: The checkpoint's classes, in its output order.
        given: The class list given to (or read by) predict.
        source: Where ``given`` came from, for the message (e.g. ``the data set at PATH``).

    Raises:
        ValueError: Naming both lists when they differ (other names, or the same in another
            order).
    """
    if list(given) == list(model_classes):
        return
    how = "lists them in another order" if sorted(given) == sorted(model_classes) else "differs"
    raise ValueError(
        f"{source} {how}: its classes are {list(given)}, but the checkpoint's outputs are "
        f"{list(model_classes)}; predictions would be labelled with the wrong names"
    )


def dataset_preprocess(data_root: str | Path, model_classes: Sequence[str]) -> PreprocessConfig:
    """The preprocessing of a run's shard set, after checking its classes against the model's.

    Args:
        data_root: The shard set the model was trained on (its ``index.json``).
        model_classes: The checkpoint's classes, in its output order.

    Returns:
        The ingest preprocessing config recorded in the index (else one of its image size).

    Raises:
        FileNotFoundError: If the shard set has no index.
        ValueError: If the data set's class list is not the checkpoint's (see
            :func:`check_class_order`).
    """
    index = read_index(data_root)
    check_class_order(model_classes, index.classes, f"the data set at {data_root}")
    prep = index.config.get("preprocess") if isinstance(index.config, dict) else None
    return config_from_dict(PreprocessConfig, prep or {"size": index.image_size})


@dataclass(frozen=True)
class _Input:
    """One thing to classify: an image file, a NIfTI file or a DICOM series folder."""

    kind: str  # "image" | "nifti" | "dicom"
    path: Path


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI_SUFFIXES)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file, or any file with the DICOM preamble magic at byte 128."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def find_inputs(path: Path) -> list[_Input]:
    """Expand one command-line path into the inputs it holds.

    A file is a NIfTI volume (``.nii``, ``.nii.gz``), a DICOM file (standing for its series
    folder) or else an image; a folder is searched recursively for images and volumes, and
    each folder that directly holds DICOM files counts as one series. Hidden entries and
    other files (CSV tables, notes) in folders are skipped.

    Args:
        path: A file or a folder.

    Returns:
        The inputs found, sorted by path (empty when none).
    """
    path = Path(path)
    if path.is_file():
        if _is_nifti(path):
            return [_Input("nifti", path)]
        if _is_dicom_file(path):
            return [_Input("dicom", path.parent)]
        return [_Input("image", path)]
    found: list[_Input] = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(folder)
        has_dicom = False
        for name in sorted(files):
            if name.startswith("."):
                continue
            file = here / name
            if _is_nifti(file):
                found.append(_Input("nifti", file))
            elif _is_image(file):
                found.append(_Input("image", file))
            elif not has_dicom and _is_dicom_file(file):
                has_dicom = True
        if has_dicom:
            found.append(_Input("dicom", here))
    return sorted(found, key=lambda item: str(item.path))


def _slices_of(item: _Input, max_slices: int | None) -> Iterator[tuple[int | None, np.ndarray]]:
    """Yield ``(slice index or None, raw 2-D slice)`` of one input, read as ingest reads it."""
    if item.kind == "image":
        check_greyscale(item.path)
        yield None, read_image_file(item.path)
        return
    if item.kind == "nifti":
        volume = read_nifti_volume(item.path)
    else:
        volume, _patient = read_dicom_series(item.path)
        del _patient  # never kept: predictions must not carry a patient identifier
    chosen = select_slices(volume, max_slices)
    if not chosen:
        raise QuarantineError(f"no_foreground: {item.path.name}: no slice contains brain")
    for k in chosen:
        yield k, axial_slice(volume, k)


def _row(path: Path, kind: str, index: int | None, class_names: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"path": str(path), "kind": kind, "slice": index, "predicted": None}
    row.update({f"prob_{name}": None for name in class_names})
    row["error"] = None
    return row


# Called after each forward pass with its rows, the model's input batch and the probabilities.
OnBatch = Callable[[list[dict[str, Any]], Tensor, np.ndarray], None]


class _Batcher:
    """Collects preprocessed slices and runs the model once a batch is full."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        batch_size: int,
        input_transform: Callable[[Tensor], Tensor] | None,
        on_batch: OnBatch | None = None,
    ) -> None:
        self.on_batch = on_batch
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self.input_transform = input_transform
        param = next(model.parameters(), None)
        self.dtype = param.dtype if param is not None else torch.float32
        self.pending: list[tuple[dict[str, Any], np.ndarray]] = []
        self.probs: dict[int, np.ndarray] = {}  # id(row) -> class probabilities

    def add(self, row: dict[str, Any], image: np.ndarray) -> None:
        self.pending.append((row, image))
        if len(self.pending) >= self.batch_size:
            self.flush()

    @torch.inference_mode()
    def flush(self) -> None:
        if not self.pending:
            return
        batch = torch.from_numpy(np.stack([img for _, img in self.pending])[:, None])
        x = batch.to(self.device)
        if self.input_transform is not None:
            x = self.input_transform(x)
        logits = self.model(x.to(self.dtype))
        probs = torch.softmax(logits.float(), dim=1).double().cpu().numpy()
        for (row, _), p in zip(self.pending, probs):
            self.probs[id(row)] = p
        if self.on_batch is not None:
            self.on_batch([row for row, _ in self.pending], x, probs)
        self.pending = []


def _fill(row: dict[str, Any], probs: np.ndarray, class_names: Sequence[str]) -> None:
    row["predicted"] = class_names[int(np.argmax(probs))]
    for name, p in zip(class_names, probs):
        row[f"prob_{name}"] = float(p)


def predict_paths(
    model: torch.nn.Module,
    paths: Sequence[Path],
    class_names: list[str],
    preprocess_cfg: PreprocessConfig,
    device: torch.device | str,
    *,
    batch_size: int = 32,
    input_transform: Callable[[Tensor], Tensor] | None = None,
    max_slices: int | None = None,
    on_batch: OnBatch | None = None,
) -> list[dict[str, Any]]:
    """Classify every image, NIfTI volume and DICOM series reachable from ``paths``.

    Args:
        model: Classifier taking FloatTensor[B, C_in, H, W] and returning logits [B, classes];
            it is put in eval mode for the call and its mode restored afterwards.
        paths: Image files, NIfTI files, DICOM series folders or folders holding any of them
            (searched recursively, see :func:`find_inputs`).
        class_names: Class names in the model's output order (the checkpoint's classes; see
            :func:`check_class_order`).
        preprocess_cfg: The preprocessing config of the shards the model was trained on.
        device: Where the model runs.
        batch_size: Slices per forward pass.
        input_transform: Optional map applied on ``device`` to each batch FloatTensor[B, 1, H, W]
            of preprocessed slices before the model (e.g. the degradation for an ``lr`` model).
        max_slices: Most slices per volume, evenly spaced among those with brain (None: all
            slices with brain, chosen as ingest chooses them).
        on_batch: Optional ``(rows, inputs, probabilities)`` call after each forward pass
            (under ``torch.inference_mode``), e.g. to draw Grad-CAM overlays of its inputs.

    Returns:
        Rows in input order: ``path``, ``kind`` (``image``, ``slice`` or ``volume``), ``slice``
        (index in the volume, None for images and volume rows), ``predicted`` (class name),
        ``prob_<class>`` per class, and ``error`` (None, or the reason an input or slice could
        not be used; its other fields are then None). After the slice rows of a volume comes
        one ``volume`` row holding the mean of their probabilities.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    batcher = _Batcher(model, device, batch_size, input_transform, on_batch)
    try:
        rows, volumes = _queue_paths(paths, class_names, preprocess_cfg, max_slices, batcher)
        batcher.flush()
    finally:
        model.train(was_training)

    for row in rows:
        probs = batcher.probs.get(id(row))
        if probs is not None:
            _fill(row, probs, class_names)
    for summary, slice_rows in volumes:
        done = [batcher.probs[id(r)] for r in slice_rows if id(r) in batcher.probs]
        if done:
            _fill(summary, np.mean(done, axis=0), class_names)
        else:
            failed = [r["error"] for r in slice_rows if r["error"]]
            summary["error"] = failed[0] if failed else "no_slices: nothing to classify"
    return rows


# A volume's summary row and the rows of its slices.
_Volume = tuple[dict[str, Any], list[dict[str, Any]]]


def _queue_paths(
    paths: Sequence[Path],
    class_names: Sequence[str],
    cfg: PreprocessConfig,
    max_slices: int | None,
    batcher: _Batcher,
) -> tuple[list[dict[str, Any]], list[_Volume]]:
    """Rows for every input under ``paths`` (slices queued in ``batcher``) and the volumes."""
    rows: list[dict[str, Any]] = []
    volumes: list[_Volume] = []
    for given in paths:
        given = Path(given)
        if not given.exists():
            row = _row(given, "image", None, class_names)
            row["error"] = f"not_found: {given} does not exist"
            rows.append(row)
            continue
        inputs = find_inputs(given)
        if not inputs:
            row = _row(given, "image", None, class_names)
            row["error"] = f"no_input: no image, NIfTI volume or DICOM series in {given}"
            rows.append(row)
            continue
        for item in inputs:
            item_rows = _read_input(item, class_names, cfg, max_slices, batcher)
            rows.extend(item_rows)
            if any(r["kind"] == "slice" for r in item_rows):
                summary = _row(item.path, "volume", None, class_names)
                rows.append(summary)
                volumes.append((summary, item_rows))
    return rows, volumes


def _read_input(
    item: _Input,
    class_names: Sequence[str],
    cfg: PreprocessConfig,
    max_slices: int | None,
    batcher: _Batcher,
) -> list[dict[str, Any]]:
    """Rows for one input's slices, each queued in ``batcher`` or carrying an error."""
    kind = "image" if item.kind == "image" else "slice"
    rows: list[dict[str, Any]] = []
    try:
        for index, raw in _slices_of(item, max_slices):
            row = _row(item.path, kind, index, class_names)
            rows.append(row)
            try:
                image, _ = preprocess(raw, cfg)
            except _INPUT_ERRORS as exc:
                row["error"] = _describe(exc, item.path, index)
                continue
            batcher.add(row, image)
    except _INPUT_ERRORS as exc:
        # The input as a whole failed: one row for it (a volume if it is one).
        row = _row(item.path, "image" if item.kind == "image" else "volume", None, class_names)
        row["error"] = _describe(exc, item.path, None)
        rows.append(row)
    return rows


def _describe(exc: Exception, path: Path, index: int | None) -> str:
    """The error text of a row: the reader's reason, naming the file (and slice)."""
    text = exc.reason if isinstance(exc, QuarantineError) else f"{type(exc).__name__}: {exc}"
    where = path.name if index is None else f"{path.name} slice {index}"
    return text if path.name in text else f"{text} ({where})"


def write_predictions_csv(rows: Sequence[dict[str, Any]], out_path: str | Path) -> Path:
    """Write prediction rows as CSV, atomically (temp file + rename).

    Args:
        rows: Rows from :func:`predict_paths`.
        out_path: The CSV file; parent folders are created.

    Returns:
        The written path.
    """
    out = Path(out_path)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    if "error" in columns:  # keep the error column last, after the probabilities
        columns.remove("error")
        columns.append("error")
    with atomic_path(out) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    return out
