"""ONNX and TorchScript copies of a classifier, each checked against the torch model it came from.

ONNX uses ``torch.onnx.export(..., dynamo=False)``, the TorchScript-based exporter: it needs
only the ``onnx`` package and runs on the CPU, while the ``torch.export``-based default
(``dynamo=True``) also needs ``onnxscript``, which this project does not install. The batch axis
is dynamic (``dynamic_axes``); height and width are fixed at the training size, the only size
the network was trained and checked at. TorchScript uses ``torch.jit.trace`` (timm models trace
cleanly; ``script`` fails on some of their Python). After writing, each file is loaded again and
run on a probe batch of two sizes; an output more than :data:`TOLERANCE` away from the torch
model's fails the export, naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["ONNX_FILE", "TOLERANCE", "TORCHSCRIPT_FILE", "export_onnx", "export_torchscript"]

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
TOLERANCE = 1e-4
OPSET = 17


def _probes(size: int, in_chans: int) -> list[torch.Tensor]:
    """Fixed inputs of batch 1 and 3 (the second shows the batch axis is really dynamic)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(n, in_chans, size, size, generator=gen) for n in (1, 3)]


def _check(path: Path, got: np.ndarray, want: torch.Tensor) -> None:
    diff = float(np.abs(got - want.numpy()).max())
    if not diff <= TOLERANCE:
        raise ValueError(
            f"{path}: outputs differ from the torch model by {diff:.3g} (> {TOLERANCE:g}); "
            "not exported"
        )


def export_onnx(model: nn.Module, path: Path, size: int, in_chans: int = 1) -> Path:
    """Write ``model`` as ONNX with a dynamic batch axis and check it with onnxruntime.

    Args:
        model: The classifier (fp32, CPU); it is put in eval mode.
        path: Output ``.onnx`` file.
        size: Input height and width.
        in_chans: Input channels (2 for an ``lr|sr`` classifier: LR then SR).

    Returns:
        ``path``.

    Raises:
        ValueError: If onnxruntime's outputs differ from torch's by more than the tolerance.
    """
    import onnxruntime as ort

    model.eval()
    example = torch.zeros(1, in_chans, size, size)
    with warnings.catch_warnings():
        # The legacy exporter warns that it is not the default; it is chosen (see above).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for probe in _probes(size, in_chans):
            (got,) = session.run(["logits"], {"image": probe.numpy()})
            _check(path, got, model(probe))
    return path


def export_torchscript(model: nn.Module, path: Path, size: int, in_chans: int = 1) -> Path:
    """Write ``model`` traced as TorchScript and check the reloaded module.

    Args:
        model: The classifier (fp32, CPU); it is put in eval mode.
        path: Output file.
        size: Input height and width.
        in_chans: Input channels (2 for an ``lr|sr`` classifier: LR then SR).

    Returns:
        ``path``.

    Raises:
        ValueError: If the traced module's outputs differ from the model's.
    """
    model.eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.zeros(1, in_chans, size, size))
    traced.save(str(path))
    loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        for probe in _probes(size, in_chans):
            _check(path, loaded(probe).numpy(), model(probe))
    return path
