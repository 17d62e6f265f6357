import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests import their helpers as a module; the packages themselves come from the install.
sys.path.insert(0, str(Path(__file__).parent))

# Before any test module loads torch: OpenMP threads that spin idle slow a loaded laptop down.
import srmri  # noqa: F401


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (tests/test_cuda.py)")


@pytest.fixture(scope="module")
def restore_threads() -> Iterator[None]:
    """Give torch's CPU thread count back after a module whose runs set ``train.threads``."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
