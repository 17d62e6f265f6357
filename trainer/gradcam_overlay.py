"""Grad-CAM overlays of the slices ``trainer predict --gradcam DIR`` classifies.

MONAI's ``GradCAM`` on the network's last ResNet stage (``layer4``, as the pipeline's report
uses), explaining the predicted class of exactly the input the network got (after the ``lr``
degradation or the SR model). The overlay is drawn on the input's first channel: the image
itself, or for a two-channel ``lr|sr`` input its LR channel (the map explains both channels).
One PNG per classified image or slice, named by its row number in the predictions CSV
(``row-00003.png``, never by the input's name, which may carry a patient's); the CSV's
``gradcam`` column names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from srmri.atomic import atomic_path

__all__ = ["GradcamWriter"]

TARGET_LAYER = "layer4"


class GradcamWriter:
    """An ``on_batch`` callback of :func:`trainer.predict.predict_paths` writing overlays.

    Args:
        model: The classifier (eval mode).
        classes: Class names in output order.
        folder: Where the PNGs go (created).

    Raises:
        ValueError: If the model has no ``layer4`` stage to explain.
    """

    def __init__(self, model: nn.Module, classes: list[str], folder: Path) -> None:
        if not hasattr(model, TARGET_LAYER):
            raise ValueError(
                f"--gradcam: the model ({type(model).__name__}) has no {TARGET_LAYER} stage; "
                "Grad-CAM overlays need a ResNet-like network"
            )
        self.model = model
        self.classes = classes
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def __call__(self, rows: list[dict[str, Any]], inputs: torch.Tensor, probs: np.ndarray) -> None:
        """Write one overlay per row and record its file name in the row's ``gradcam``."""
        from monai.visualize import GradCAM

        # predict runs under inference_mode; Grad-CAM needs gradients of normal tensors.
        with torch.inference_mode(False), torch.enable_grad():
            pred = torch.as_tensor(probs.argmax(axis=1), device=inputs.device)
            x = inputs.clone().float()
            maps = GradCAM(nn_module=self.model, target_layers=TARGET_LAYER)(x=x, class_idx=pred)
            maps = maps.detach().cpu().numpy()
            images = x.detach().cpu().numpy()
        for row, image, cam, label in zip(rows, images, maps, pred.tolist()):
            self.count += 1
            name = f"row-{self.count:05d}.png"
            self._save(self.folder / name, image[0], cam[0], self.classes[label])
            row["gradcam"] = name

    @staticmethod
    def _save(path: Path, image: np.ndarray, cam: np.ndarray, label: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(3, 3))
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.imshow(cam, cmap="jet", alpha=0.35)
        ax.set_title(f"Grad-CAM: {label}", fontsize=8)
        ax.axis("off")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
        plt.close(fig)
