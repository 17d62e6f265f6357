"""Grad-CAM overlays for a trained classifier on a few correct and wrong test samples per class.

Uses MONAI's ``GradCAM`` on the ResNet's last stage (``layer4``), explaining the predicted class
of exactly the input the model saw (the run's own input transform, evaluation mode).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyarrow.parquet as pq
import torch

from shards.loader import create_loader
from trainer.checkpoint import resolve_checkpoint
from trainer.gradcam_overlay import TARGET_LAYER
from trainer.rundir import eval_dir_of, predictions_path
from trainer.task import create_task
from trainer.weights import checkpoint_config, load_fp32_weights

__all__ = ["gradcam_png", "pick_examples"]


def pick_examples(run_dir: Path, per_class: int) -> dict[str, tuple[int, int]]:
    """Test keys to show: per class up to ``per_class`` correct and as many wrong.

    Returns:
        key -> (true label, predicted label), in a stable order.
    """
    table = pq.read_table(predictions_path(eval_dir_of(run_dir, "test"), "test")).to_pydict()
    rows = sorted(zip(table["key"], table["label"], table["pred"]))
    chosen: dict[str, tuple[int, int]] = {}
    for label in sorted({r[1] for r in rows}):
        right = [r for r in rows if r[1] == label and r[2] == label][:per_class]
        wrong = [r for r in rows if r[1] == label and r[2] != label][:per_class]
        chosen.update({k: (t, p) for k, t, p in right + wrong})
    return chosen


def gradcam_png(run_dir: Path, data_root: Path, path: Path, per_class: int = 2) -> Path | None:
    """Write a grid of Grad-CAM overlays; None when the model has no ``layer4`` stage.

    Args:
        run_dir: A classifier run directory with ``eval-test`` predictions.
        data_root: The shard set it was evaluated on.
        path: Output PNG.
        per_class: Correct and wrong examples per class.
    """
    from monai.visualize import GradCAM

    ckpt = resolve_checkpoint(run_dir)
    cfg = checkpoint_config(ckpt)
    # create_task, not ClassificationTask: a tsr run's model is its SR network plus the
    # classifier (it has no layer4 at the top and gets no figure).
    task = create_task(cfg, ckpt.classes)
    model = task.build_model(pretrained=False)
    model.load_state_dict(load_fp32_weights(ckpt))
    model.eval()
    if not hasattr(model, "layer4"):
        return None
    chosen = pick_examples(run_dir, per_class)
    loader = create_loader(
        data_root,
        "test",
        32,
        mode="eval",
        rank=0,
        world_size=1,
        transform=task.transform(False),
        aligned_roots=task.aligned_roots(),
    )
    images: dict[str, torch.Tensor] = {}
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            if key in chosen and bool(batch["valid"][i]):
                images[key] = batch["image"][i]
    keys = [k for k in chosen if k in images]
    if not keys:
        return None
    x = torch.stack([images[k] for k in keys])
    pred = torch.tensor([chosen[k][1] for k in keys])
    maps = GradCAM(nn_module=model, target_layers=TARGET_LAYER)(x=x, class_idx=pred).detach()
    n_cls = len(ckpt.classes)
    cols = 2 * per_class
    fig, axes = plt.subplots(n_cls, cols, figsize=(2.0 * cols, 2.1 * n_cls), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    slots: dict[int, list[int]] = {c: [] for c in range(n_cls)}
    for i, k in enumerate(keys):
        slots[chosen[k][0]].append(i)
    for label, idx in slots.items():
        right = [i for i in idx if chosen[keys[i]][1] == label]
        wrong = [i for i in idx if chosen[keys[i]][1] != label]
        for col, i in [(j, i) for j, i in enumerate(right)] + [
            (per_class + j, i) for j, i in enumerate(wrong)
        ]:
            ax = axes[label][col]
            ax.imshow(x[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.imshow(maps[i, 0].numpy(), cmap="jet", alpha=0.35)
            true, got = ckpt.classes[label], ckpt.classes[chosen[keys[i]][1]]
            ax.set_title(f"{true} → {got}", fontsize=7, color="green" if true == got else "red")
    fig.suptitle("Grad-CAM (layer4): left correct, right wrong", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
