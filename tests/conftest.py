import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Tests import their helpers as a module; the packages themselves come from the install.
sys.path.insert(0, str(Path(__file__).parent))

# Before any test module loads torch: OpenMP threads that spin idle slow a loaded laptop down.
import srmri  # noqa: F401


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A real Ray head + worker (1 CPU each) on loopback for the session (tests/ray_cluster.py).

    Yields:
        The :class:`ray_cluster.RayCluster` (shared by every module that asks for it).
    """
    from ray_cluster import ENV, start_ray, stop_ray

    if shutil.which("ray", path=ENV["PATH"]) is None:
        pytest.fail("the ray command is missing: install ray[default] (pyproject lists it)")
    cluster = start_ray()
    try:
        yield cluster
    finally:
        stop_ray(cluster)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (tests/test_cuda.py)")


@pytest.fixture(scope="module")
def restore_threads() -> Iterator[None]:
    """Give torch's CPU thread count back after a module whose runs set ``train.threads``."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
