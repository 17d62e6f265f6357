"""Where the device check runs: the checkout, the installed versions, the GPU's state.

Read-only probes of the machine, written into ``results.json``'s ``meta``; none imports torch.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil
import subprocess
from pathlib import Path

__all__ = ["PAPER", "ROOT", "git_commit", "nvidia_smi", "versions"]

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "configs" / "paper.yaml"


def versions() -> dict[str, str]:
    """Installed versions of what the check leans on, from package metadata (no imports)."""
    out: dict[str, str] = {"python": platform.python_version()}
    names = [
        "torch",
        "timm",
        "torchmetrics",
        "numpy",
        "webdataset",
        "monai",
        "nibabel",
        "nilearn",
        "pydicom",
        "imagehash",
        "xxhash",
        "deepspeed",
        "ray",
    ]
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            # Carried wheels installed with --target have metadata too; a module without it
            # (a source checkout on the path) still counts as there.
            out[name] = "?" if importlib.util.find_spec(name) else "missing"
    return out


def _output(cmd: list[str], timeout: float) -> str:
    """What ``cmd`` printed, stripped ('' if it could not run)."""
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
        return proc.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    """The checkout's commit, read-only ('' where there is no git, as on the device)."""
    return _output(["git", "rev-parse", "HEAD"], timeout=10)


def nvidia_smi() -> str:
    """``nvidia-smi`` clocks, power and temperature as they read now ('' where there is none)."""
    if shutil.which("nvidia-smi") is None:
        return ""
    q = "name,driver_version,memory.total,clocks.sm,clocks.mem,power.draw,temperature.gpu"
    return _output(["nvidia-smi", f"--query-gpu={q}", "--format=csv"], timeout=30)
