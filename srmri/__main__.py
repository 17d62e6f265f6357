"""``python -m srmri``: what this environment offers srmri (versions, threads, devices)."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def main() -> int:
    """Print the environment report; returns the exit status."""
    import torch

    print(f"srmri {_version('srmri')} on Python {sys.version.split()[0]}")
    for name in ("torch", "timm", "webdataset", "monai", "deepspeed", "ray", "mlflow"):
        print(f"  {name:<11} {_version(name)}")
    print(f"  torch threads {torch.get_num_threads()}, interop {torch.get_num_interop_threads()}")
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"  CUDA devices {cuda}" + (f" ({torch.cuda.get_device_name(0)})" if cuda else ""))
    print("commands: srmri {pipeline,quickstart,enhance,shards,trainer,tune,launch} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
