"""The exported model folder: written whole or not at all, read only when every file checks out.

A folder holds ``model.safetensors`` (fp32 weights, always), the other formats asked for
(``model.onnx``, ``model.torchscript.pt``), ``sr_model.safetensors`` for ``sr``, ``lr+sr`` and
``lr|sr`` models, ``model_card.md`` and ``model.json``, which describes the model and lists the
sha256 of every other file; its own ``self_sha256`` covers the rest of ``model.json``, so an
edited class list is caught like an edited weights file.

Writing: everything goes into a hidden sibling (``.NAME.partial-<pid>``), ``model.json`` last,
and the sibling is renamed onto ``NAME`` only when complete; a failure removes it. An ``out``
that already holds a model folder of the same weights (the same checkpoint exported again, e.g.
with another format) is replaced cleanly; one holding another model, or anything that is not a
model folder, is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shards.writer import file_sha256
from srmri.atomic import write_json
from srmri.fingerprint import fingerprint

__all__ = [
    "CARD_FILE",
    "FOLDER_FORMAT",
    "MODEL_JSON",
    "WEIGHTS_FILE",
    "ModelFolderError",
    "check_target",
    "publish",
    "read_model_folder",
    "staging",
    "write_model_json",
]

FOLDER_FORMAT = "srmri-model-folder/1"
MODEL_JSON = "model.json"
CARD_FILE = "model_card.md"
WEIGHTS_FILE = "model.safetensors"
_SELF = "self_sha256"


class ModelFolderError(ValueError):
    """A model folder that cannot be used or written; the message names it and the problem."""


def _self_hash(data: dict[str, Any]) -> str:
    return fingerprint({k: v for k, v in data.items() if k != _SELF})


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """Yield an empty hidden sibling of ``out`` to build the folder in; removed on error.

    Args:
        out: The folder to be written.

    Yields:
        The staging folder (pass it to :func:`publish` inside the block).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crashed export of this pid
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_model_json(folder: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Write ``model.json`` into ``folder``: ``data`` plus the sha256 of every file there.

    Args:
        folder: The staging folder, every other file already written.
        data: The model's description (no ``files`` or ``self_sha256`` key).

    Returns:
        What was written.
    """
    files = {
        p.name: file_sha256(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MODEL_JSON
    }
    full = {**data, "files": files}
    full[_SELF] = _self_hash(full)
    write_json(folder / MODEL_JSON, full)
    return full


def check_target(out: Path, weights_sha256: str) -> None:
    """Refuse to replace ``out`` unless it is absent, empty or a folder of the same weights."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ModelFolderError(f"{out}: exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return
    if not (out / MODEL_JSON).is_file():
        raise ModelFolderError(
            f"{out}: holds files but no {MODEL_JSON}; not a model folder, so it is not "
            "overwritten (choose another --out or empty it)"
        )
    try:
        old = json.loads((out / MODEL_JSON).read_text())
    except ValueError as exc:
        raise ModelFolderError(f"{out / MODEL_JSON}: not valid JSON ({exc})") from exc
    if old.get("weights_sha256") != weights_sha256:
        raise ModelFolderError(
            f"{out}: already holds another model ({old.get('model', '?')}, weights "
            f"{str(old.get('weights_sha256', '?'))[:12]}…); exporting these weights "
            f"({weights_sha256[:12]}…) would replace it: choose another --out or remove it"
        )


def publish(tmp: Path, out: Path, weights_sha256: str) -> Path:
    """Rename the finished staging folder onto ``out`` (see the module docstring).

    Args:
        tmp: The staging folder from :func:`staging`, ``model.json`` written.
        out: The target folder.
        weights_sha256: sha256 of the new ``model.safetensors`` (an old folder is replaced
            only when it holds the same).

    Returns:
        ``out``.

    Raises:
        ModelFolderError: If ``out`` holds another model or something else.
    """
    out = Path(out)
    check_target(out, weights_sha256)
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    if out.exists():
        out.rename(old)  # the same model: it goes only once the new one is in place
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def read_model_folder(folder: str | Path) -> dict[str, Any]:
    """``model.json`` of a model folder, after checking every file it lists.

    Args:
        folder: The exported folder.

    Returns:
        The parsed ``model.json``.

    Raises:
        ModelFolderError: Naming the folder or file: not a model folder, an edited
            ``model.json``, or a listed file that is missing or whose sha256 differs.
    """
    folder = Path(folder)
    path = folder / MODEL_JSON
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: model folder does not exist")
    if not path.is_file():
        raise ModelFolderError(
            f"{folder}: not a model folder (no {MODEL_JSON}; export it with "
            "`python -m trainer export`, or it is a partial export)"
        )
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelFolderError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FOLDER_FORMAT:
        raise ModelFolderError(f"{path}: not a {FOLDER_FORMAT} description")
    if data.get(_SELF) != _self_hash(data):
        raise ModelFolderError(f"{path}: was edited after export (its self_sha256 differs)")
    for name, sha in dict(data.get("files", {})).items():
        file = folder / name
        if not file.is_file():
            raise ModelFolderError(f"{file}: listed in {MODEL_JSON} but missing")
        if file_sha256(file) != sha:
            raise ModelFolderError(
                f"{file}: sha256 differs from the one in {MODEL_JSON} (edited or corrupt)"
            )
    return data
